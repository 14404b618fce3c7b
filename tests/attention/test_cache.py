"""KVCache owns its rows: selecting, compacting, growing, viewing and truncating the cache carry every
buffer it holds (latents or K/V, RoPE keys, token ids, norm statistics, token groups), for every variant
and decode path, checked against the full forward of each row's own sequence."""
import pytest
import torch

from egmla.attention import decode_paths
from egmla.model import Transformer
from tests.conftest import VARIANTS, small_config

# Every variant and path; the Triton 'kernel' path (slow in the CPU interpreter) once per kernel: its
# cache layout is the same for the ablations of one variant.
CASES = [(name, path) for name, kw in VARIANTS.items() for path in decode_paths(small_config(**kw))
         if path != "kernel" or name in ("mla", "eg-mla", "eg-mla-latent")]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


class Rows:
    """Each cache row's token sequence so far, to check its logits against the full forward."""

    def __init__(self, model, tokens):
        self.model, self.tokens = model, tokens
        self.sequences: list[list[int]] = []

    def check(self, logits, rows=None):
        for row, sequence in enumerate(self.sequences):
            if rows is not None and row not in rows:
                continue
            full = self.model(torch.tensor([sequence]))[0, -1]
            assert rel_err(logits[row, -1], full) < 1e-4, (row, len(sequence))

    def step(self, cache, rows=None):
        """One decode step; each row appends its next token (rows not listed append nothing)."""
        nxt = [self.tokens[len(s) % self.tokens.shape[0]] for s in self.sequences]
        n_new = torch.tensor([int(rows is None or r in rows) for r in range(len(self.sequences))])
        for r, token in enumerate(nxt):
            if n_new[r]:
                self.sequences[r].append(int(token))
        logits = self.model(torch.tensor(nxt)[:, None], cache, n_new=n_new)
        self.check(logits, rows)


@pytest.mark.parametrize("variant,path", CASES)
def test_every_buffer_follows_select_grow_compact_truncate(variant, path):
    config = small_config(**VARIANTS[variant])
    model = Transformer(config).eval()
    model.set_decode_path(path)
    tokens = torch.randint(0, config.vocab_size, (40,))
    rows = Rows(model, tokens)
    with torch.no_grad():
        cache = model.new_cache(3, max_len=12)
        prompt_lens = torch.tensor([5, 9, 3])
        rows.sequences = [tokens[:n].tolist() for n in prompt_lens.tolist()]
        model(tokens[:9].expand(3, -1).clone(), cache, n_new=prompt_lens)
        rows.step(cache)
        cache.select_rows(torch.tensor([2, 0, 0, 1]))  # beam-search style: reorder and repeat
        rows.sequences = [list(rows.sequences[r]) for r in (2, 0, 0, 1)]
        assert cache.batch_size == 4
        rows.step(cache, rows={0, 1, 3})  # row 2 appends nothing: it must not disturb row 1, its twin
        cache.grow(40)  # from 12 positions: sequences of 11 must keep all they hold
        assert cache.max_len == 40
        for _ in range(3):
            rows.step(cache)
        cache.compact(torch.tensor([1, 3]))  # the engine drops finished sequences
        rows.sequences = [rows.sequences[1], rows.sequences[3]]
        rows.step(cache)
        cache.truncate(cache.lengths - torch.tensor([3, 1]))  # assisted decoding crops the last tokens
        rows.sequences = [rows.sequences[0][:-3], rows.sequences[1][:-1]]
        rows.step(cache)
        rows.step(cache)


@pytest.mark.parametrize("path", decode_paths(small_config()))
def test_row_views_share_storage(path):
    """cache.rows(start, stop) appends land in the parent: a prefill in row groups equals one call."""
    config = small_config()
    model = Transformer(config).eval()
    model.set_decode_path(path)
    tokens = torch.randint(0, config.vocab_size, (4, 7))
    with torch.no_grad():
        whole = model.new_cache(4, max_len=16)
        model(tokens, whole)
        parts = model.new_cache(4, max_len=16)
        model(tokens[:1], parts.rows(0, 1))
        model(tokens[1:], parts.rows(1, 4))
        assert parts.lengths.tolist() == [7] * 4
        step = tokens[:, :1]
        assert rel_err(model(step, parts), model(step, whole)) < 1e-5
    with pytest.raises(ValueError, match="rows\\(2, 5\\)"):
        parts.rows(2, 5)


@pytest.mark.parametrize("variant,path", CASES)
def test_capturable_step_equals_the_eager_step(variant, path):
    """The decode step the engine captures (whole cache, no host sync) gives the eager step's logits;
    a row appending nothing at a full cache stays inside it."""
    config = small_config(**VARIANTS[variant])
    model = Transformer(config).eval()
    model.set_decode_path(path)
    tokens = torch.randint(0, config.vocab_size, (3, 13))
    n_new = torch.tensor([1, 1, 0])
    with torch.no_grad():
        caches = [model.new_cache(3, max_len=13) for _ in range(2)]
        for cache in caches:
            model(tokens[:, :12], cache, n_new=torch.tensor([12, 5, 12]))
        eager = model(tokens[:, 12:], caches[0], n_new=n_new)
        static = model(tokens[:, 12:], caches[1], n_new=n_new, capturable=True)
        assert rel_err(static[:2], eager[:2]) < 1e-5
        assert torch.isfinite(static).all()
        assert caches[1].lengths.tolist() == caches[0].lengths.tolist() == [13, 6, 12]
        static = model(tokens[:, 12:], caches[1], n_new=torch.tensor([0, 1, 0]), capturable=True)  # row 0 is full
        assert torch.isfinite(static).all() and caches[1].lengths.tolist() == [13, 7, 12]


def test_reset_empties_every_sequence_and_zeroes_the_append_counters():
    """reset() keeps the storage (graphs read it by address) and leaves no state behind: lengths, token groups and
    the one-launch append's per-sequence arrival counters, which a fault mid-launch could leave nonzero."""
    config = small_config(**VARIANTS["eg-mla"])
    model = Transformer(config).eval()
    model.set_decode_path("grouped")
    cache = model.new_cache(3, max_len=8)
    counters, lengths = cache.stats_arrivals, cache.lengths
    cache.lengths.fill_(5)
    cache.stats_arrivals.fill_(2)
    cache.reset()
    assert cache.stats_arrivals is counters and cache.lengths is lengths
    assert cache.stats_arrivals.tolist() == [0, 0, 0] and cache.lengths.tolist() == [0, 0, 0]


@pytest.mark.parametrize("path", ["gate-table", "grouped"])
def test_reset_rows_empties_those_rows_only(path):
    """A row given to a new sequence (the serving scheduler) is prefilled as in a fresh cache; its neighbours keep
    their sequences and their logits."""
    config = small_config(**VARIANTS["eg-mla"])
    model = Transformer(config).eval()
    model.set_decode_path(path)
    tokens = torch.randint(0, config.vocab_size, (3, 9))
    fresh_prompt = torch.randint(0, config.vocab_size, (1, 5))
    with torch.no_grad():
        cache = model.new_cache(3, max_len=16)
        model(tokens, cache)
        cache.reset_rows(1, 2)
        assert cache.lengths.tolist() == [9, 0, 9]
        if cache.token_groups is not None:
            assert cache.token_groups.n_distinct[1] == 0 and cache.token_groups.counts[1].sum() == 0
            assert cache.token_groups.n_distinct[0] > 0
        model(fresh_prompt, cache.rows(1, 2))
        reference = model.new_cache(3, max_len=16)
        model(tokens, reference)
        alone = model.new_cache(1, max_len=16)
        model(fresh_prompt, alone)
        step = torch.randint(0, config.vocab_size, (3, 1))
        logits = model(step, cache)
        assert rel_err(logits[[0, 2]], model(step, reference)[[0, 2]]) < 1e-5
        assert rel_err(logits[1:2], model(step[1:2], alone)) < 1e-5


@pytest.mark.parametrize("variant,path", [("eg-mla", "grouped"), ("eg-mla", "gate-table"), ("mla", "absorbed")])
def test_reset_rows_at_equals_resetting_each_row(variant, path):
    """reset_rows_at(rows) (one launch per per-sequence tensor, the scheduler's admission of many requests) leaves
    every per-sequence tensor as reset_rows of each row in turn: scattered rows emptied, the others untouched."""
    config = small_config(**VARIANTS[variant])
    model = Transformer(config).eval()
    model.set_decode_path(path)
    tokens = torch.randint(0, config.vocab_size, (5, 7))
    with torch.no_grad():
        caches = [model.new_cache(5, max_len=12) for _ in range(2)]
        for cache in caches:
            model(tokens, cache)
        caches[0].reset_rows_at(torch.tensor([3, 0, 4]))
        for row in (3, 0, 4):
            caches[1].reset_rows(row, row + 1)

    def state(cache):
        groups = cache.token_groups
        return [cache.lengths, cache.stats_arrivals] + (
            [] if groups is None else [groups.counts, groups.n_distinct, groups.lengths])

    assert caches[0].lengths.tolist() == [0, 7, 7, 0, 0]
    for mine, each in zip(state(caches[0]), state(caches[1])):
        assert (mine is None and each is None) or torch.equal(mine, each)
    if caches[0].token_groups is not None:
        assert caches[0].token_groups.n_distinct[1] > 0 and caches[0].token_groups.n_distinct[0] == 0


@pytest.mark.parametrize("copied", [False, True])
def test_keep_prefix_leaves_the_row_as_a_fresh_prefill_of_the_prefix(copied):
    """keep_prefix(row, L): the row's length and token groups are those of a cache that was given only its first L
    tokens; the other rows and the host-side bounds stay."""
    config = small_config(**VARIANTS["eg-mla"])
    model = Transformer(config).eval()
    model.set_decode_path("grouped")
    tokens = torch.randint(0, 12, (2, 10))  # few ids: groups with several positions each
    with torch.no_grad():
        cache = model.new_cache(2, max_len=16)
        model(tokens, cache)
        bound = cache.token_groups.host.distinct_bound
        if copied:  # row 1 rebuilt from row 0's prefix after scrambling it: copy_prefix writes what it keeps
            cache.reset_rows(1, 2)
            model(tokens[1:] * 0 + 1, cache.rows(1, 2))
            tokens = tokens.clone()
            tokens[1] = tokens[0]
            cache.copy_prefix(0, 1, 6)
        else:
            cache.keep_prefix(1, 6)
        fresh = model.new_cache(1, max_len=16)
        model(tokens[1:, :6], fresh)
    groups, want = cache.token_groups, fresh.token_groups
    assert cache.lengths.tolist() == [10, 6] and groups.lengths.tolist() == [10, 6]
    n = int(want.n_distinct[0])
    assert int(groups.n_distinct[1]) == n and torch.equal(groups.distinct_ids[1, :n], want.distinct_ids[0, :n])
    assert torch.equal(groups.counts[1, :n], want.counts[0, :n]) and int(groups.counts[1].sum()) == 6
    assert torch.equal(groups.slots[1, :6], want.slots[0, :6]) and torch.equal(groups.ranks[1, :6], want.ranks[0, :6])
    assert int(groups.counts[0].sum()) == 10 and groups.host.distinct_bound >= bound
