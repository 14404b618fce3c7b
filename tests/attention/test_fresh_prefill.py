"""A prompt into an empty cache (every row starting at position 0, `AttnContext.fresh`) attends causally over its own
new K/V (FlashAttention on CUDA, as in training) instead of a masked pass over the cache: same logits as the full
forward of each row alone, the cache written as before, and no cached keys read; a later call reads the cache."""
import pytest
import torch
from tests.infer.helpers import VARIANTS, tiny_model

from egmla.attention import decode_paths
from egmla.attention.cache import LayerCache

CASES = [(variant, path) for variant in VARIANTS for path in decode_paths(tiny_model(variant).config)]
KEYS = {"k", "v", "latent", "k_rope"}  # what attention would read back (not the norm statistics append reads)


@pytest.mark.parametrize("variant,path", CASES)
def test_fresh_prompt_equals_full_forward_without_reading_cached_keys(variant, path, monkeypatch):
    model = tiny_model(variant, seed=5)
    model.set_decode_path(path)
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (3, 9))
    n_new = torch.tensor([9, 4, 6])  # right-padded ragged prompts
    reads = []
    original = LayerCache.read
    monkeypatch.setattr(LayerCache, "read", lambda self, name, length: reads.append(name) or original(self, name, length))
    with torch.no_grad():
        cache = model.new_cache(3, max_len=16)
        logits = model(tokens, cache, n_new=n_new)
        assert not KEYS & set(reads), reads
        for row, length in enumerate(n_new.tolist()):
            alone = model(tokens[row:row + 1, :length])[0]
            err = ((logits[row, :length] - alone).norm() / alone.norm()).item()
            assert err < 1e-5, (row, err)
        assert cache.lengths.tolist() == n_new.tolist()
        step = model(tokens[:, :1], cache)  # one more token per row: a cached step, which reads the cache
        assert KEYS & set(reads)
        for row, length in enumerate(n_new.tolist()):
            alone = model(torch.cat([tokens[row, :length], tokens[row, :1]])[None])[0, -1]
            assert ((step[row, 0] - alone).norm() / alone.norm()).item() < 1e-5, row


def test_only_a_call_into_empty_rows_is_fresh():
    model = tiny_model("mla")
    cache = model.new_cache(2, max_len=16)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    assert model._cached_context(tokens, cache, None, capturable=False).fresh
    assert not model._cached_context(tokens, cache, None, capturable=True).fresh  # a graph step: never
    cache.advance(torch.tensor([0, 2]))  # one row holds positions: the other's prompt may be fresh, the call is not
    assert not model._cached_context(tokens, cache, None, capturable=False).fresh


def test_a_one_token_step_builds_the_lengths_its_layers_read_once():
    """The decode kernels' lengths (positions 0 .. the new token's) are built with the context, one tensor for every
    layer, in a one-token step only; a context built elsewhere still gets them from its positions."""
    model = tiny_model("mla")
    cache = model.new_cache(2, max_len=16)
    cache.advance(torch.tensor([3, 7]))
    step = model._cached_context(torch.zeros(2, 1, dtype=torch.long), cache, None, capturable=False)
    assert step.decode_lengths.tolist() == [4, 8] and step.seen_lengths() is step.decode_lengths
    prefill = model._cached_context(torch.zeros(2, 2, dtype=torch.long), cache, None, capturable=False)
    assert prefill.decode_lengths is None and prefill.seen_lengths().tolist() == [4, 8]
