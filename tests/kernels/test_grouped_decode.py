"""Grouped EG-MLA decode kernels vs the PyTorch reference (on CPU through Triton's interpreter, tiny
shapes): random and heavily repeated ids, ragged lengths (1 and 0 included), odd head dims, LayerNorm
and RMSNorm, several chunk sizes, poisoned outputs; the per-step plan; bad inputs; the model path."""
import pytest
import torch

from tests.kernels.conftest import (kernel_device, nan_past, needs_cuda, poisoned, rel_err, requires_triton,
                                   resident_rows)

pytestmark = requires_triton


def make_case(batch, heads, d_n, d_v, d_c, d_r, lengths, vocab, dtype, device, norm="layernorm", high=None,
              tokens=None):
    """Inputs of grouped_decode_ref / grouped_decode, the token groups registered from random ids (ids < high), or
    from `tokens` [batch, max(lengths) + 3] where given."""
    from egmla.attention.cache import TokenGroups
    from egmla.kernels.egmla_decode_ref import layernorm_stats

    max_len, width = max(lengths) + 3, heads * (d_n + d_v)

    def randn(*shape, mean=0.0, std=1.0):
        return (mean + std * torch.randn(*shape)).to(dtype=dtype, device=device)

    ids = torch.randint(0, high or vocab, (batch, max_len), device=device) if tokens is None else tokens.to(device)
    groups = TokenGroups(batch, max_len, device)
    groups.append(ids, torch.arange(max_len, device=device).expand(batch, -1), torch.tensor(lengths, device=device))
    latent, table = randn(batch, max_len, d_c), randn(vocab, width, mean=1.0, std=0.5)
    wkv_b = randn(width, d_c, std=d_c ** -0.5)
    case = dict(q_nope=randn(batch, heads, d_n), q_pe=randn(batch, heads, d_r), latent=latent,
                k_rope=randn(batch, max_len, d_r), gate_table=table, wkv_b=wkv_b,
                ln_stats=layernorm_stats(latent, table[ids], wkv_b, 1e-6, "mul", norm),
                norm_weight=randn(width, mean=1.0, std=0.3),
                norm_bias=randn(width, std=0.3) if norm == "layernorm" else None, scale=0.2)
    return case, groups


def run_both(case, groups, block_t=16, kernel="three", **kernel_args):
    """(kernel output, reference). kernel="three": grouped_decode (three launches, chunks of block_t);
    "fused": grouped_fused.grouped_decode_fused (tiles of block_t positions); "scratch":
    grouped_scratch.grouped_decode_scratch (ranges of grouped positions, chunks of block_t)."""
    from egmla.kernels.grouped_decode import grouped_decode, make_plan
    from egmla.kernels.grouped_decode_ref import grouped_decode_ref
    from egmla.kernels.studies.grouped_fused import grouped_decode_fused
    from egmla.kernels.studies.grouped_scratch import grouped_decode_scratch

    ref = grouped_decode_ref(slots=groups.slots, distinct_ids=groups.distinct_ids, lengths=groups.lengths, **case)
    plan = make_plan(groups, block_t)
    out = poisoned(ref.shape, case["latent"].dtype, case["latent"].device)
    if kernel == "fused":
        grouped_decode_fused(plan=plan, out=out, block_t=block_t, **case, **kernel_args)
    elif kernel == "scratch":
        grouped_decode_scratch(plan=plan, out=out, **case, **kernel_args)
    else:
        grouped_decode(plan=plan, out=out, **case, **kernel_args)
    return out, ref


@pytest.mark.parametrize("ids,lengths,block_ids,block_t", [
    ("random", [40, 17, 1], 16, 16),      # mostly distinct: several id blocks per sequence
    ("repeated", [40, 33, 2], 16, 16),    # 3 ids: one block, many position tiles
    ("repeated", [70, 5, 0], 32, 32),     # an empty sequence (output 0), larger blocks
    ("one-id", [45, 16], 16, 16),         # one id fills the context
])
def test_fused_kernel_matches_reference(ids, lengths, block_ids, block_t):
    high = {"random": None, "repeated": 3, "one-id": 1}[ids]
    case, groups = make_case(3 if len(lengths) == 3 else 2, 6, 16, 8, 20, 8, lengths, 50, torch.float32,
                             kernel_device(), high=high)  # 6 heads: a full group of 4 and a partial one
    out, ref = run_both(case, groups, block_t, kernel="fused", block_ids=block_ids)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4
    if 0 in lengths:
        assert out[lengths.index(0)].abs().max() == 0


@pytest.mark.parametrize("ids,lengths,range_len,norm,dtype", [
    ("random", [70, 17, 1], 32, "layernorm", torch.float32),     # mostly distinct: slots straddle ranges
    ("repeated", [90, 33, 0], 16, "layernorm", torch.float32),   # 3 ids over many ranges, an empty sequence
    ("one-id", [64, 16], 32, "rmsnorm", torch.float32),          # one id fills the context; no norm bias
    ("distinct", [50, 49], 64, "layernorm", torch.float16),      # every id distinct, fp16
])
def test_scratch_kernel_matches_reference(ids, lengths, range_len, norm, dtype):
    """The one-launch kernel over ranges of grouped positions (intermediates read back from L2): ranges that cut
    an id's positions, several ranges per sequence, an empty and a one-position sequence."""
    high = {"random": None, "repeated": 3, "one-id": 1, "distinct": None}[ids]
    vocab = 400 if ids == "distinct" else 50
    case, groups = make_case(len(lengths), 5, 16, 8, 20, 8, lengths, vocab, dtype, kernel_device(), norm=norm,
                             high=high)
    if ids == "distinct":  # make every id of a sequence different
        from egmla.attention.cache import TokenGroups

        max_len = groups.slots.shape[1]
        tokens = torch.stack([torch.randperm(vocab)[:max_len] for _ in lengths]).to(kernel_device())
        groups = TokenGroups(len(lengths), max_len, kernel_device())
        groups.append(tokens, torch.arange(max_len, device=kernel_device()).expand(len(lengths), -1),
                      torch.tensor(lengths, device=kernel_device()))
        from egmla.kernels.egmla_decode_ref import layernorm_stats

        case["ln_stats"] = layernorm_stats(case["latent"], case["gate_table"][tokens], case["wkv_b"], 1e-6, "mul",
                                           norm)
    out, ref = run_both(case, groups, kernel="scratch", range_len=range_len)
    assert out.isfinite().all()
    assert rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 1e-2)
    if 0 in lengths:
        assert not out[lengths.index(0)].any()


def test_fused_kernel_every_id_distinct_rmsnorm_fp16():
    """Every position its own id (vocab much larger than the context), RMSNorm, odd dims; fp16 within 1e-2."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):
        case, groups = make_case(2, 5, 12, 10, 24, 6, [37, 9], 4096, dtype, kernel_device(), norm="rmsnorm")
        assert int(groups.n_distinct[0]) == 37 or int(groups.n_distinct[0]) > 30  # (random ids: almost all distinct)
        out, ref = run_both(case, groups, 16, kernel="fused", block_ids=16)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < tol


def test_fused_kernel_bounds_past_the_ids():
    """A plan sized by host bounds larger than the distinct ids (graph capture): the extra blocks are empty."""
    from egmla.kernels.grouped_decode import make_plan
    from egmla.kernels.grouped_decode_ref import grouped_decode_ref
    from egmla.kernels.studies.grouped_fused import grouped_decode_fused

    case, groups = make_case(2, 4, 16, 16, 16, 16, [20, 6], 30, torch.float32, kernel_device(), high=5)
    ref = grouped_decode_ref(slots=groups.slots, distinct_ids=groups.distinct_ids, lengths=groups.lengths, **case)
    plan = make_plan(groups, 16, bounds=(groups.slots.shape[1], groups.slots.shape[1]))
    out = poisoned(ref.shape, torch.float32, kernel_device())
    grouped_decode_fused(plan=plan, out=out, block_ids=16, block_t=16, **case)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("gate_dot", [True, False])
@pytest.mark.parametrize("splits", [None, 2])
@pytest.mark.parametrize("ids,lengths,block_t", [
    ("random", [40, 17, 1], 16),     # mostly distinct: many runs per chunk
    ("repeated", [40, 33, 2], 16),   # 3 ids: long runs crossing chunk boundaries
    ("repeated", [70, 5, 0], 32),    # an empty sequence (output 0), a larger chunk
])
def test_kernel_matches_reference(ids, lengths, block_t, splits, gate_dot):
    case, groups = make_case(3, 3, 16, 8, 20, 8, lengths, 50, torch.float32, kernel_device(),
                             high=3 if ids == "repeated" else None)
    # splits=2: atomic adds into a buffer the absorb launch zeroes, also for the empty sequence; both forms of the
    # up-projection (rows summed in the K of one dot, or W^V_h s per row)
    out, ref = run_both(case, groups, block_t, block_ids=16, block_rows=16, num_splits=splits, gate_dot=gate_dot)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4
    if 0 in lengths:
        assert out[lengths.index(0)].abs().max() == 0


def context_tokens(kind, batch, max_len, vocab):
    """[batch, max_len] ids of the grouped decode's four kinds of context: every id distinct (also across the
    sequences), one id filling every context, and sequences sharing ids (the second the first reversed, the third
    the first rotated: the same ids at other positions and slots); 'random' repeats a few ids at random."""
    if kind == "distinct":
        return torch.randperm(vocab)[:batch * max_len].view(batch, max_len)
    if kind == "one-id":
        return torch.full((batch, max_len), vocab - 1)
    first = torch.randint(0, 7, (max_len,))
    if kind == "shared":
        return torch.stack([first, first.flip(0), first.roll(5)][:batch])
    return torch.randint(0, 7, (batch, max_len))


@pytest.mark.parametrize("ids", ["distinct", "one-id", "shared"])
@pytest.mark.parametrize("splits,gate_dot", [(1, True), (2, False)])
def test_kernel_on_each_kind_of_context_never_reads_the_padding(ids, splits, gate_dot):
    """The three launches on the standard's contexts (every id distinct, one id filling the context, sequences
    sharing ids) with ragged lengths (37, a whole number of chunks 32, and 1), the cache's padding poisoned: NaN in
    the latent, RoPE key and statistics at every position past a sequence's length and past T."""
    from egmla.kernels.grouped_decode import grouped_decode, make_plan
    from egmla.kernels.grouped_decode_ref import grouped_decode_ref

    lengths = [37, 32, 1]
    tokens = context_tokens(ids, 3, max(lengths) + 3, 200)
    case, groups = make_case(3, 3, 16, 8, 20, 8, lengths, 200, torch.float32, kernel_device(), tokens=tokens)
    if ids == "distinct":
        assert groups.n_distinct.tolist() == lengths
    if ids == "one-id":
        assert groups.n_distinct.tolist() == [1, 1, 1]
    ref = grouped_decode_ref(slots=groups.slots, distinct_ids=groups.distinct_ids, lengths=groups.lengths, **case)
    lengths = groups.lengths
    padded = dict(case, **{name: nan_past(case[name], lengths) for name in ("latent", "k_rope", "ln_stats")})
    out = grouped_decode(plan=make_plan(groups, 16), out=poisoned(ref.shape, torch.float32, kernel_device()),
                         **padded, block_ids=16, block_rows=16, num_splits=splits, gate_dot=gate_dot)
    assert out.isfinite().all()
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.float16, 1e-2)])
@pytest.mark.parametrize("heads,d_n,d_v,d_c,d_r", [(16, 128, 128, 128, 64), (12, 64, 64, 256, 64)])  # paper-1b; kv256
def test_kernel_at_the_largest_preset_widths_at_batch_one(dtype, tol, heads, d_n, d_v, d_c, d_r):
    """The widest heads and latent the presets use, one sequence, the launch's default blocks (64 ids, 128 rows)."""
    case, groups = make_case(1, heads, d_n, d_v, d_c, d_r, [21], 50, dtype, kernel_device(), high=9)
    out, ref = run_both(case, groups, 16)
    assert out.isfinite().all()
    assert rel_err(out, ref) < tol


def test_many_chunks_per_warps_tuple():
    """1,100 positions in chunks of 16: the up-projection merges 69 chunks' softmax statistics, more than one
    block of 64 chunks, with per-launch warps."""
    case, groups = make_case(1, 2, 16, 16, 16, 16, [1100], 40, torch.float32, kernel_device(), high=30)
    out, ref = run_both(case, groups, 16, block_ids=16, block_rows=32, num_warps=(2, 2, 4))
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4


def test_kernel_rmsnorm_odd_dims():
    case, groups = make_case(2, 5, 12, 10, 24, 6, [23, 9], 40, torch.float32, kernel_device(), norm="rmsnorm", high=6)
    out, ref = run_both(case, groups, 16, block_ids=16, block_rows=16)
    assert rel_err(out, ref) < 1e-4


def test_plan_groups_by_slot_and_maps_rows():
    from egmla.kernels.grouped_decode import make_plan

    _, groups = make_case(2, 1, 16, 16, 16, 16, [37, 12], 9, torch.float32, kernel_device())
    plan = make_plan(groups, 16)
    for b, length in enumerate(groups.lengths.tolist()):
        order = plan.order[b, :length].long()
        assert sorted(order.tolist()) == list(range(length))  # a permutation of the registered positions
        sorted_slots = groups.slots[b, order]
        assert (sorted_slots[1:] >= sorted_slots[:-1]).all()
        assert plan.order_slots[b, :length].tolist() == sorted_slots.tolist()  # each entry's slot beside it
        expected = {(s + i // 16): i // 16 for i, s in enumerate(sorted_slots.tolist())}
        rows = {r: c for r, c in enumerate(plan.row_chunk[b].tolist()) if c >= 0}
        assert rows == expected
        tokens = {s + i // 16: int(groups.distinct_ids[b, s]) for i, s in enumerate(sorted_slots.tolist())}
        assert {r: int(plan.row_ids[b, r]) for r in rows} == tokens


def test_bad_inputs_are_clear_errors():
    from egmla.kernels.grouped_decode import grouped_decode, make_plan

    case, groups = make_case(2, 2, 16, 16, 16, 16, [5, 3], 9, torch.float32, kernel_device())
    with pytest.raises(ValueError, match="vocab_size=4"):
        make_plan(groups, 16, vocab_size=4)
    with pytest.raises(ValueError, match="block_t=24"):
        make_plan(groups, 24)
    plan = make_plan(groups, 16)
    with pytest.raises(ValueError, match="ln_stats"):
        grouped_decode(plan=plan, **{**case, "ln_stats": case["ln_stats"].half()})
    with pytest.raises(ValueError, match="gate_table"):
        grouped_decode(plan=plan, **{**case, "gate_table": case["gate_table"][:, :-1]})
    with pytest.raises(ValueError, match="wkv_b.stride"):  # the kernels step over rows only
        grouped_decode(plan=plan, **{**case, "wkv_b": case["wkv_b"].t().contiguous().t()})


def test_model_path_through_kernel():
    """Decode path 'grouped' with the kernel backend equals 'naive' for a few ragged decode steps."""
    from egmla.model import Transformer
    from tests.conftest import small_config

    device = kernel_device()
    model = Transformer(small_config(qk_nope_head_dim=16, v_head_dim=16, kv_lora_rank=16,
                                     qk_rope_head_dim=16)).to(device).eval()
    tokens = torch.randint(0, 5, (2, 12), device=device)
    logits = {}
    for path in ("naive", "grouped"):
        model.set_decode_path(path)
        for layer in model.layers:
            layer.attn.grouped_backend = "kernel"
        cache = model.new_cache(2, max_len=16)
        with torch.no_grad():
            model(tokens[:, :6], cache, n_new=torch.tensor([6, 2], device=device))
            logits[path] = [model(tokens[:, 6 + i:7 + i], cache) for i in range(3)]
    for a, b in zip(logits["naive"], logits["grouped"]):
        assert rel_err(b, a) < 1e-4


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel", ["three", "three-per-row", "three-specialized", "three-specialized-per-row",
                                    "fused", "scratch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu_paper_base_shapes(dtype, kernel):
    lengths = [1, 700, 2049, 4096]
    extra = {"gate_dot": False, "num_warps": (4, 1, 2)} if kernel == "three-per-row" else {}
    if "specialized" in kernel:  # Triton's automatic warp specialization of the up-projection: 8 warps on sm_90
        extra = {"warp_specialize": True, "num_warps": (4, 1, 8), "gate_dot": "per-row" not in kernel}
    for high in (None, 20, 1):  # mostly distinct, 20 ids, one id
        case, groups = make_case(4, 12, 64, 64, 64, 64, lengths, 32768, dtype, "cuda", high=high)
        out, ref = run_both(case, groups, 16 if kernel == "scratch" else 32, kernel=kernel.split("-")[0], **extra)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype,splits,gate_dot,batch_slice", [(torch.float32, None, True, None),
                                                               (torch.float32, 2, False, None),
                                                               (torch.float16, 2, True, 2)])
def test_id_to_row_reads_the_rows_it_maps(dtype, splits, gate_dot, batch_slice):
    """grouped_decode(..., id_to_row=map) over the rows of a gate-table offload (each id's row at its slot) equals the
    plain call over the whole table: grouped by id as before, the absorb and up-projection gathers through the map
    (both forms of the up-projection, atomic splits, batch slices)."""
    from egmla.kernels.grouped_decode import grouped_decode, make_plan

    case, groups = make_case(3, 3, 16, 8, 20, 8, [40, 17, 1], 50, dtype, kernel_device(), high=12)
    plan = make_plan(groups, 16)
    settings = dict(block_ids=16, block_rows=16, num_splits=splits, gate_dot=gate_dot, batch_slice=batch_slice)
    plain = grouped_decode(plan=plan, **case, **settings)
    rows, id_to_row = resident_rows(case["gate_table"])
    mapped = grouped_decode(plan=plan, **{**case, "gate_table": rows}, **settings, id_to_row=id_to_row,
                            out=poisoned(plain.shape, dtype, plain.device))
    assert torch.isfinite(mapped).all()
    if splits is None:  # one program per (head, sequence): the same sums in the same order
        assert torch.equal(mapped, plain)
    else:  # atomic adds of the splits: the same terms, in any order
        assert rel_err(mapped, plain) < (1e-6 if dtype == torch.float32 else 1e-3)


def test_batch_slices_give_the_same_output():
    case, groups = make_case(3, 2, 16, 16, 16, 16, [20, 7, 13], 30, torch.float32, kernel_device(), high=5)
    out, ref = run_both(case, groups, 16, batch_slice=2, block_ids=16, block_rows=16)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.float16, 1e-2)])
def test_gate_dot_up_projection(dtype, tol):
    """The up-projection summing its rows in the K of one dot (gate_dot) equals the reference, with splits."""
    case, groups = make_case(3, 3, 16, 16, 16, 16, [45, 20, 0], 40, dtype, kernel_device(), high=9)
    for splits in (1, 2):
        out, ref = run_both(case, groups, 16, block_ids=16, block_rows=16, gate_dot=True, num_splits=splits)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < tol
        assert out[2].abs().max() == 0


def test_key_gather_variant():
    case, groups = make_case(2, 3, 16, 8, 20, 8, [33, 9], 30, torch.float32, kernel_device(), high=7)
    out, ref = run_both(case, groups, 16, key_gather=True, block_ids=16, block_rows=16)
    assert rel_err(out, ref) < 1e-4


def test_empty_groups_give_zero_output():
    case, groups = make_case(2, 2, 16, 16, 16, 16, [0, 0], 9, torch.float32, kernel_device())
    out, ref = run_both(case, groups, 16)
    assert out.abs().max() == 0 and ref.abs().max() == 0


def test_workspace_formula_matches_what_a_step_allocates():
    """egmla.kernels.grouped_workspace_bytes (the memory planner's number) equals the bytes make_plan and
    grouped_decode allocate for a step: every tensor factory call, the output excluded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from egmla.attention.cache import TokenGroups
    from egmla.kernels import grouped_workspace_bytes
    from egmla.kernels.egmla_decode_ref import layernorm_stats
    from egmla.kernels.grouped_decode import grouped_decode, make_plan

    batch, length, heads, d, vocab = 2, 40, 3, 16, 50
    device = kernel_device()  # the kernels' device: a GPU's tensors where there is one (no interpreter there)
    ids = torch.randint(0, 12, (batch, length), device=device)
    groups = TokenGroups(batch, length, device)
    groups.append(ids, torch.arange(length, device=device).expand(batch, -1),
                  torch.full((batch,), length, device=device))
    latent = torch.randn(batch, length, d, device=device)
    table = 1 + 0.5 * torch.randn(vocab, heads * 2 * d, device=device)
    wkv_b = torch.randn(heads * 2 * d, d, device=device) / d ** 0.5
    case = dict(q_nope=torch.randn(batch, heads, d, device=device), q_pe=torch.randn(batch, heads, d, device=device),
                latent=latent, k_rope=torch.randn(batch, length, d, device=device), gate_table=table, wkv_b=wkv_b,
                ln_stats=layernorm_stats(latent, table[ids], wkv_b, 1e-6, "mul", "layernorm"),
                norm_weight=torch.randn(heads * 2 * d, device=device),
                norm_bias=torch.randn(heads * 2 * d, device=device), scale=0.2)
    out = torch.empty(batch, heads, d, device=device)
    factories = {"empty", "empty_like", "full", "zeros", "zeros_like", "empty_strided", "new_empty", "new_zeros"}

    class Allocations(TorchDispatchMode):
        bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in factories and isinstance(result, torch.Tensor):
                Allocations.bytes += result.numel() * result.element_size()
            return result

    with Allocations():
        plan = make_plan(groups)
        grouped_decode(plan=plan, out=out, num_splits=2, **case)  # two splits: the fp32 output sums are allocated
    distinct = int(groups.n_distinct.max())
    assert Allocations.bytes > 0 and Allocations.bytes == batch * grouped_workspace_bytes(heads, d, d, length, distinct, 4)


@pytest.mark.parametrize("num_stages", [1, (2, 1, 3)])
def test_pipelining_stages_give_the_same_output(num_stages):
    case, groups = make_case(3, 2, 16, 16, 16, 16, [20, 7, 13], 30, torch.float32, kernel_device(), high=5)
    out, ref = run_both(case, groups, 16, num_stages=num_stages, block_ids=16, block_rows=16)
    assert rel_err(out, ref) < 1e-4


def test_warp_specialized_row_loop_gives_the_same_output():
    """The up-projection's row loop under Triton's automatic warp specialization (the interpreter runs it as a plain
    loop; the GPU test above compiles it), with two splits so that several row blocks meet in one program's loop."""
    case, groups = make_case(3, 2, 16, 16, 16, 16, [45, 7, 13], 30, torch.float32, kernel_device(), high=25)
    out, ref = run_both(case, groups, 16, warp_specialize=True, num_warps=(4, 1, 8), block_ids=16, block_rows=16,
                        num_splits=2)
    assert rel_err(out, ref) < 1e-4


def fp8_intermediates_ref(case, groups, block_t, round_intermediates=True):
    from egmla.kernels import grouped_decode_ref as refs

    if round_intermediates:
        return refs.grouped_decode_fp8_intermediates_ref(slots=groups.slots, distinct_ids=groups.distinct_ids,
                                                         lengths=groups.lengths, block_t=block_t, **case)
    with pytest.MonkeyPatch.context() as patch:  # the same equations with the rounding taken out
        patch.setattr(refs, "e4m3", lambda x: x.float())
        return refs.grouped_decode_fp8_intermediates_ref(slots=groups.slots, distinct_ids=groups.distinct_ids,
                                                         lengths=groups.lengths, block_t=block_t, **case)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("ids,lengths,block_t", [("random", [40, 17, 1], 16), ("repeated", [70, 5, 0], 32)])
def test_the_fp8_intermediates_reference_without_its_rounding_is_the_exact_reference(ids, lengths, block_t, norm):
    """The chunked equations of `grouped_decode_fp8_intermediates_ref` are the grouped decode's: with the rounding
    taken out they give `grouped_decode_ref`'s output, so the reference differs from it by the rounding alone."""
    from egmla.kernels.grouped_decode_ref import grouped_decode_ref

    case, groups = make_case(3, 3, 16, 8, 20, 8, lengths, 50, torch.float32, "cpu", norm=norm,
                             high=3 if ids == "repeated" else None)
    exact = grouped_decode_ref(slots=groups.slots, distinct_ids=groups.distinct_ids, lengths=groups.lengths, **case)
    assert rel_err(fp8_intermediates_ref(case, groups, block_t, round_intermediates=False), exact) < 1e-5
    assert rel_err(fp8_intermediates_ref(case, groups, block_t), exact) > 1e-3  # the rounding shows


@pytest.mark.parametrize("gate_dot", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.float16, 1e-2)])
@pytest.mark.parametrize("ids,lengths,block_t,splits", [
    ("random", [40, 17, 1], 16, None),   # mostly distinct: many runs (and S rows) per chunk
    ("repeated", [40, 33, 2], 16, 2),    # 3 ids: long runs crossing chunk boundaries; atomic row splits
    ("repeated", [70, 5, 0], 32, None),  # an empty sequence (output 0), a larger chunk
    ("one-id", [45, 16], 16, 2),         # one id fills the context
])
def test_fp8_intermediates_match_their_reference(ids, lengths, block_t, splits, dtype, tol, gate_dot):
    """intermediates="fp8": A and S rows in e4m3 with a scale per (row, head). Against the reference that rounds the
    same rows, whose products take the same operands, and further from the unrounded equations than from it. fp32's
    tolerance is not 1e-4: the kernel's dots sum in another order than einsum, and a value within the last bit of an
    fp8 rounding boundary goes to the other neighbour now and then, ~6% of one element of A or S (the rounding itself
    moves the output by ~2% here)."""
    from egmla.kernels.grouped_decode import grouped_decode, make_plan
    from egmla.kernels.grouped_decode_ref import grouped_decode_ref

    tokens = None
    if ids == "one-id":
        tokens = torch.full((2, max(lengths) + 3), 7)
    case, groups = make_case(2 if ids == "one-id" else 3, 3, 16, 8, 20, 8, lengths, 50, dtype, kernel_device(),
                             high=3 if ids == "repeated" else None, tokens=tokens)
    ref = fp8_intermediates_ref(case, groups, block_t)
    exact = grouped_decode_ref(slots=groups.slots, distinct_ids=groups.distinct_ids, lengths=groups.lengths, **case)
    out = poisoned(ref.shape, dtype, case["latent"].device)
    grouped_decode(plan=make_plan(groups, block_t), out=out, intermediates="fp8", block_ids=16, block_rows=16,
                   num_splits=splits, gate_dot=gate_dot, **case)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < tol
    if dtype == torch.float32:
        assert rel_err(out, ref) < rel_err(out, exact) / 3
    if 0 in lengths:
        assert out[lengths.index(0)].abs().max() == 0


def test_fp8_intermediates_over_an_fp8_cache_and_bad_settings():
    """Both at once: the cache's latents and the intermediates in fp8 (the reference reads the cache as stored)."""
    from egmla.attention.cache import FP8, quantize
    from egmla.kernels.grouped_decode import grouped_decode, make_plan

    case, groups = make_case(3, 3, 16, 8, 20, 8, [40, 17, 1], 50, torch.float32, kernel_device())
    stored = {**case, "latent": quantize(case["latent"], FP8), "k_rope": quantize(case["k_rope"], FP8)}
    widened = {**case, "latent": stored["latent"].float(), "k_rope": stored["k_rope"].float()}
    ref = fp8_intermediates_ref(widened, groups, 16)
    out = grouped_decode(plan=make_plan(groups, 16), intermediates="fp8", block_ids=16, block_rows=16, **stored)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 2e-3
    with pytest.raises(ValueError, match="intermediates='bf16': None"):
        grouped_decode(plan=make_plan(groups, 16), intermediates="bf16", **case)
    with pytest.raises(ValueError, match="key_gather=True"):
        grouped_decode(plan=make_plan(groups, 16), intermediates="fp8", key_gather=True, **case)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("ids", ["random", "repeated"])
def test_fp8_intermediates_on_gpu_paper_base_shapes(ids):
    case, groups = make_case(4, 12, 64, 64, 64, 64, [300, 257, 1, 64], 2000, torch.bfloat16, "cuda",
                             high=40 if ids == "repeated" else None)
    from egmla.kernels.grouped_decode import grouped_decode, make_plan

    ref = fp8_intermediates_ref(case, groups, 16)
    out = grouped_decode(plan=make_plan(groups, 16), intermediates="fp8", **case)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-2
