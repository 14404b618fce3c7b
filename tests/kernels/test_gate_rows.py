"""The gate-row claim kernel (egmla/kernels/gate_rows.py) against its reference (gate_rows_ref.py): the same ids get
rows, every id's row holds its host tables' rows, no two ids share a row, and ids past the capacity are counted."""
import pytest
import torch

from egmla.kernels.gate_rows_ref import claim_gate_rows_ref
from tests.kernels.conftest import kernel_device, needs_cuda, requires_triton

pytestmark = requires_triton

VOCAB = 97


def state(capacity: int, widths: tuple[int, ...], dtypes: tuple, device: str, seed: int = 0):
    """Host tables of the given widths and dtypes, their device rows (NaN: a row never written shows) and the maps."""
    torch.manual_seed(seed)
    pin = device == "cuda"
    host = [torch.randn(VOCAB, w, dtype=d) for w, d in zip(widths, dtypes)]
    host = [t.pin_memory() if pin else t for t in host]
    rows = [torch.full((capacity, w), float("nan"), dtype=d, device=device) for w, d in zip(widths, dtypes)]
    maps = (torch.zeros(VOCAB, dtype=torch.int32, device=device), torch.zeros(VOCAB, dtype=torch.int64, device=device),
            torch.zeros(1, dtype=torch.int32, device=device))
    return host, rows, maps


def run_kernel(ids, host, rows, maps, capacity):
    from egmla.kernels.gate_rows import GateRowTables, claim_gate_rows

    tables = GateRowTables.build(host, rows)
    claim_gate_rows(ids, *maps, capacity, tables)
    return tables


def served(ids: torch.Tensor, rows, maps) -> list[torch.Tensor]:
    """Each table's rows as served for ids: rows[slot_of_id[ids]]."""
    return [r[maps[1][ids.flatten()]].cpu() for r in rows]


@pytest.mark.parametrize("widths,dtypes", [((8, 24), (torch.float32, torch.float32)),
                                           ((6, 40), (torch.float16, torch.float32)),
                                           ((3, 5), (torch.float32, torch.float16))])  # 3 fp32 words, an odd count
def test_claimed_rows_hold_the_host_rows_as_the_reference_does(widths, dtypes):
    device = kernel_device()
    # repeats within a call, ids resident from the call before, every id of a small range, a 2-D batch of ids
    calls = [torch.tensor([3, 7, 3, 9, 7, 1]), torch.tensor([[9, 12], [3, 50]]), torch.arange(40, 60),
             torch.randint(0, VOCAB, (5, 4))]
    host, rows, maps = state(64, widths, dtypes, device)
    ref_host, ref_rows, ref_maps = state(64, widths, dtypes, "cpu")
    for count, ids in enumerate(calls, start=1):
        run_kernel(ids.to(device), host, rows, maps, 64)
        claim_gate_rows_ref(ids, *ref_maps, 64, ref_host, ref_rows)
        seen = torch.cat([c.flatten() for c in calls[:count]]).unique()
        assert torch.equal(maps[0].cpu(), ref_maps[0]) and int(maps[2]) == int(ref_maps[2]) == seen.numel()
        slots = maps[1][seen.to(device)].cpu()
        assert slots.unique().numel() == seen.numel() and int(slots.max()) < seen.numel()  # rows 0..n-1, one per id
        for got, want, table in zip(served(seen, rows, maps), served(seen, ref_rows, ref_maps), host):
            assert torch.equal(got, want) and torch.equal(got, table[seen].cpu())  # bit for bit: a copy


def test_ids_past_the_capacity_are_counted_and_get_no_row():
    device = kernel_device()
    host, rows, maps = state(4, (8,), (torch.float32,), device)
    ids = torch.arange(10, 16, device=device)
    run_kernel(ids, host, rows, maps, 4)
    assert int(maps[2]) == 6  # the caller sees 6 > 4 and raises (GateTableOffload.check)
    claimed = maps[1][ids].cpu()
    assert set(claimed.tolist()) == {0, 1, 2, 3}  # four ids got the four rows; the other two kept the map's 0
    assert not rows[0].isnan().any()  # the 4 rows were written, nothing past them (the buffer has no more)


def test_moved_rows_are_written_after_the_move():
    """After the device rows are reallocated, `moved` points the copy at the new ones: new ids land there."""
    device = kernel_device()
    host, rows, maps = state(8, (8,), (torch.float32,), device)
    tables = run_kernel(torch.tensor([1, 2], device=device), host, rows, maps, 8)
    from egmla.kernels.gate_rows import claim_gate_rows

    grown = [torch.full((16, 8), float("nan"), device=device)]
    grown[0][:8] = rows[0]
    tables.moved(grown)
    claim_gate_rows(torch.tensor([5, 1, 6], device=device), *maps, 16, tables)
    ids = torch.tensor([1, 2, 5, 6])
    assert torch.equal(served(ids, grown, maps)[0], host[0][ids])


@needs_cuda
@pytest.mark.gpu
def test_on_cuda_the_kernel_reads_pinned_host_tables_in_a_cuda_graph():
    """On a GPU the rows come from pinned host memory through unified addressing, inside a captured graph, with
    bf16 tables: replaying it for new ids claims and copies them."""
    from egmla.kernels.gate_rows import GateRowTables, claim_gate_rows

    host, rows, maps = state(64, (512, 1536), (torch.bfloat16, torch.bfloat16), "cuda")
    tables = GateRowTables.build(host, rows)
    ids = torch.zeros(32, dtype=torch.long, device="cuda")
    claim_gate_rows(ids, *maps, 64, tables)  # warm-up (compiles); claims id 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        claim_gate_rows(ids, *maps, 64, tables)
    seen = {0}
    for step in range(3):
        fresh = torch.randint(0, VOCAB, (32,))
        seen |= set(fresh.tolist())
        ids.copy_(fresh)
        graph.replay()
    torch.cuda.synchronize()
    assert int(maps[2]) == len(seen)
    every = torch.tensor(sorted(seen))
    for got, table in zip(served(every, rows, maps), host):
        assert torch.equal(got, table[every])
