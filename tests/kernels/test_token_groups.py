"""The token-groups append kernel (one token per sequence, one launch) against its PyTorch reference: fresh random
histories of several id ranges (every id distinct, one id throughout, a few ids), rows appending nothing, row views
of a larger cache, walks across several blocks of distinct ids; and the model's grouped path through the kernel."""
import pytest
import torch

from tests.kernels.conftest import kernel_device, requires_triton

pytestmark = requires_triton

NAMES = ("distinct_ids", "n_distinct", "slots", "counts", "ranks", "lengths")


def history(batch, max_len, vocab, filled, device):
    """TokenGroups of `batch` sequences with filled[b] random ids registered (the prefill path)."""
    from egmla.attention.cache import TokenGroups

    groups = TokenGroups(batch, max_len, device)
    ids = torch.randint(0, vocab, (batch, max_len), device=device)
    groups.append(ids, torch.arange(max_len, device=device).expand(batch, -1), torch.tensor(filled, device=device))
    return groups


def state(groups):
    return [getattr(groups, name).clone() for name in NAMES]


@pytest.mark.parametrize("vocab", [1, 3, 1000])  # one id throughout, a few ids, (nearly) every id distinct
@pytest.mark.parametrize("block", [16, 1024])  # 16: the walk spans several blocks
def test_append_one_matches_reference(vocab, block, monkeypatch):
    import egmla.kernels.token_groups as kernel
    from egmla.kernels.token_groups_ref import append_one_ref

    monkeypatch.setattr(kernel, "BLOCK_IDS", block)
    device = kernel_device()
    torch.manual_seed(vocab + block)
    batch, max_len = 5, 64
    groups = history(batch, max_len, vocab, [0, 1, 37, 50, 58], device)
    for step in range(3):  # the kernel and the reference, each on its own copy of the same state
        before = state(groups)
        ids = torch.randint(0, vocab, (batch,), device=device)
        if step == 1 and vocab > 1:
            ids[2] = groups.distinct_ids[2, groups.n_distinct[2] - 1]  # the last distinct id: the walk's end
        n_new = torch.tensor([1, 0, 1, 1, 1], device=device)  # row 1 appends nothing
        positions = groups.lengths.clone()
        expected = [t.clone() for t in before]
        append_one_ref(*expected, ids, positions, n_new)
        kernel.append_one(*[getattr(groups, name) for name in NAMES], ids, positions, n_new)
        for name, got, want, old in zip(NAMES, state(groups), expected, before):
            assert torch.equal(got, want), (name, step)
            if name in ("n_distinct", "lengths"):
                assert got[1] == old[1]  # the row that appends nothing is untouched
        assert torch.equal(groups.lengths, positions + n_new)


def test_append_one_on_row_views_leaves_other_rows():
    """The engine steps a bucket of a larger cache's rows (KVCache.rows): strided rows, the rest untouched."""
    from egmla.kernels.token_groups import append_one
    from egmla.kernels.token_groups_ref import append_one_ref

    device = kernel_device()
    torch.manual_seed(1)
    groups = history(6, 40, 7, [10, 20, 30, 5, 0, 39], device)
    views = [getattr(groups, name)[:3] for name in NAMES]
    full_before = state(groups)
    ids, positions = torch.tensor([3, 6, 0], device=device), groups.lengths[:3].clone()
    n_new = torch.ones(3, dtype=torch.long, device=device)
    expected = [t[:3].clone() for t in full_before]
    append_one_ref(*expected, ids, positions, n_new)
    append_one(*views, ids, positions, n_new)
    for name, view, want, before in zip(NAMES, views, expected, full_before):
        assert torch.equal(view, want), name
        assert torch.equal(getattr(groups, name)[3:], before[3:]), name


def test_append_one_rejects_wrong_buffers():
    from egmla.kernels.token_groups import append_one

    groups = history(2, 8, 5, [3, 4], kernel_device())
    args = [getattr(groups, name) for name in NAMES]
    ids = positions = n_new = torch.ones(2, dtype=torch.long, device=args[0].device)
    with pytest.raises(ValueError, match="slots"):
        append_one(args[0], args[1], args[2].long(), *args[3:], ids, positions, n_new)
    with pytest.raises(ValueError, match="positions"):
        append_one(*args, ids, torch.ones(3, dtype=torch.long), n_new)


def test_token_groups_append_routes_through_the_kernel(monkeypatch):
    """TokenGroups.append of one token per sequence takes the kernel where forward-only kernels run (forced here
    as on a GPU) and registers what the reference registers."""
    import egmla.kernels
    import egmla.kernels.token_groups as kernel

    calls = []
    real = kernel.append_one
    monkeypatch.setattr(kernel, "append_one", lambda *a: calls.append(1) or real(*a))
    device = kernel_device()
    torch.manual_seed(2)
    routed, reference = history(3, 30, 9, [4, 9, 0], device), history(3, 30, 9, [4, 9, 0], device)
    for name in NAMES:  # the same history
        getattr(reference, name).copy_(getattr(routed, name))
    tokens = torch.tensor([[5], [8], [1]], device=device)
    positions = routed.lengths[:, None].clone()
    n_new = torch.tensor([1, 1, 0], device=device)
    reference.append(tokens, positions, n_new)  # the CPU route: the PyTorch reference
    assert not calls
    monkeypatch.setattr(egmla.kernels, "no_grad_kernel_can_run", lambda x: True)
    routed.append(tokens, positions, n_new)
    assert calls == [1]
    for name in NAMES:
        assert torch.equal(getattr(routed, name), getattr(reference, name)), name
