"""The fixed-shape prefill of fresh prompts (egmla/infer/prefill_step.py: a CUDA graph per bucket on a GPU, the same
call eagerly here): prompts go into a scratch cache and their rows are copied into the serving cache, so the
logits, every cached tensor and the token groups must equal those of the eager prefill, on every variant's paths."""
import pytest
import torch
from tests.infer.helpers import (VARIANTS, GraphReplay, assert_steps_match_full_forward, forward_into_one_buffer,
                                 prefill_steps_as_graphs, tiny_model)

from egmla.attention import decode_paths
from egmla.attention.cache import TokenGroups
from egmla.infer import GenerationEngine
from egmla.infer.prefill_step import MIN_WIDTH, PREFILL_GRAPH_TOKENS, WIDTH_BUCKETS, PrefillStep, prefill_bucket

CASES = [(variant, path) for variant in VARIANTS for path in decode_paths(tiny_model(variant).config)]


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):  # few distinct ids, so that the token groups have repeats
        tokens[row, :length] = torch.randint(0, min(vocab, 12), (length,), generator=generator)
    return tokens, torch.tensor(lengths)


def _rows(cache, start: int, stop: int, lengths: list[int]) -> dict[str, list[torch.Tensor]]:
    """Every cached tensor of rows [start, stop) at the positions each row holds."""
    found: dict[str, list[torch.Tensor]] = {}
    named = [(f"layer{i}.{name}", t) for i, layer in enumerate(cache.layers) for name, t in layer.buffers.items()]
    if cache.token_ids is not None:
        named.append(("token_ids", cache.token_ids))
    if cache.token_groups is not None:
        groups = cache.token_groups
        named += [("slots", groups.slots), ("ranks", groups.ranks)]
        for row, length in zip(range(start, stop), lengths):
            count = int(groups.n_distinct[row])
            found.setdefault("distinct_ids", []).append(groups.distinct_ids[row, :count])
            found.setdefault("counts", []).append(groups.counts[row, :count])
        found["n_distinct"] = [groups.n_distinct[start:stop]]
        found["groups.lengths"] = [groups.lengths[start:stop]]
    for name, tensor in named:
        found[name] = [tensor[row, :length] for row, length in zip(range(start, stop), lengths)]
    found["lengths"] = [cache.lengths[start:stop]]
    return found


@pytest.mark.parametrize("variant,path", CASES)
def test_a_prefill_step_equals_the_eager_prefill(variant, path):
    """Ragged prompts into rows 1-3 of a 5-row cache whose other rows hold a sequence: the same last logits, the same
    cache contents and token groups, and the untouched rows unchanged."""
    model = tiny_model(variant, seed=7)
    lengths = [9, 3, 14]
    tokens, n_new = _prompts(model.config.vocab_size, lengths)
    caches, logits = [], []
    for use_step in (False, True):
        engine = GenerationEngine(model, decode_path=path, prefill_graphs=use_step)
        with torch.no_grad():
            cache = engine._cache_for(5, 40)
            other, other_n = _prompts(model.config.vocab_size, [6] * 5, seed=1)
            model(other, cache, n_new=other_n)  # every row holds 6 positions; rows 1-3 are then emptied
            cache.reset_rows(1, 4)
            step = engine.prefill_step(3, tokens.shape[1], cache.max_len)
            if use_step:
                assert step is not None and (step.rows, step.width) == (3, 16)
                for _ in range(2):  # the second time over what the first left in the scratch and the rows
                    cache.reset_rows(1, 4)
                    out = step.prefill(cache, 1, tokens, n_new, engine.reads_token_groups())
            else:
                out = model(tokens, cache.rows(1, 4), n_new=n_new, logits_at=n_new - 1)[:, 0]
        caches.append(cache)
        logits.append(out)
    assert (logits[1] - logits[0]).norm() / logits[0].norm() < 1e-5
    for start, stop, held in ((1, 4, lengths), (0, 1, [6]), (4, 5, [6])):
        eager, stepped = _rows(caches[0], start, stop, held), _rows(caches[1], start, stop, held)
        assert eager.keys() == stepped.keys()
        for name in eager:
            for a, b in zip(eager[name], stepped[name]):
                assert torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, atol=1e-6), name
    if caches[1].token_groups is not None and path in ("grouped", "absorbed"):
        assert caches[1].token_groups.host.distinct_bound == caches[0].token_groups.host.distinct_bound


@pytest.mark.parametrize("variant,path", [("mla", "absorbed"), ("eg-mla", "grouped"), ("mha", "naive"),
                                          ("eg-mla-bias-v", "absorbed")])
def test_generate_through_prefill_steps_gives_the_eager_engines_tokens(variant, path, step_log_probs):
    """`generate` with the step (the engine's own prefill, rows of an emptied cache), and again with fewer and longer
    prompts (other buckets, the same scratch), gives the tokens of the eager prefill and, at every step (the prefill's
    included), the distributions of one full forward of prompt + tokens, to fp32."""
    model = tiny_model(variant, seed=3)
    batches = [[[5, 17, 42, 99, 3], [120, 8], [33, 34, 35, 33, 34, 35, 9, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9]],
               [[7, 7, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]]]
    eager = GenerationEngine(model, decode_path=path, prefill_graphs=False)
    stepped = GenerationEngine(model, decode_path=path, prefill_graphs=True)
    for prompts, bucket in zip(batches, [(3, 22), (1, 24)]):  # (22: the first call's cache length)
        want = [g.token_ids for g in eager.generate(prompts, max_new_tokens=6)]
        step_log_probs.clear()
        results = stepped.generate(prompts, max_new_tokens=6)
        assert [g.token_ids for g in results] == want
        assert_steps_match_full_forward(model, prompts, results, step_log_probs, bucket)
        assert [key[1:] for key in stepped._prefill_steps] == [bucket]  # (a cache of a new length drops the steps)


def test_logits_of_a_graph_replay_survive_the_next_replay(monkeypatch):
    """A replay writes the graph's one output tensor in place (emulated here: forward copies into a kept buffer): the
    logits a prefill returns must not be that buffer, else generate()'s second group of prompts in the same bucket
    overwrites the first group's (found by a randomized review with this emulation; on a GPU it gave wrong tokens)."""
    forward_into_one_buffer(monkeypatch)
    monkeypatch.setattr(PrefillStep, "capture", lambda self: setattr(self, "graph", GraphReplay(self)))
    prefill_steps_as_graphs(monkeypatch)  # the engine's steps as on a GPU: captured once, then replayed
    model = tiny_model("mla", seed=3)
    prompts = [[5 + i + 7 * j for j in range(20)] for i in range(4)]  # two groups of 2 x 20 tokens: one bucket
    settings = dict(decode_path="absorbed", prefill_token_budget=40)
    eager = GenerationEngine(model, prefill_graphs=False, **settings).generate(prompts, max_new_tokens=4)
    engine = GenerationEngine(model, prefill_graphs=True, **settings)
    stepped = engine.generate(prompts, max_new_tokens=4)
    assert [key[1:] for key in engine._prefill_steps] == [(2, 23)]  # (the cache holds 20 + 4 - 1 positions)
    assert [g.token_ids for g in stepped] == [g.token_ids for g in eager]


def test_register_prompts_equals_appending_them():
    """The host-side registration of a prefill's prompts gives the token groups a device append gives."""
    tokens, n_new = _prompts(300, [11, 4, 16, 1], seed=5)
    appended, registered = TokenGroups(4, 20), TokenGroups(6, 20)
    appended.append(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), n_new)
    registered.register_prompts(2, tokens, n_new)  # into rows 2-5
    for name in ("n_distinct", "lengths"):
        assert torch.equal(getattr(appended, name), getattr(registered, name)[2:]), name
    assert registered.n_distinct[:2].eq(0).all()
    for row, length in enumerate(n_new.tolist()):
        count = int(appended.n_distinct[row])
        for name, width in (("slots", length), ("ranks", length), ("distinct_ids", count), ("counts", count)):
            assert torch.equal(getattr(appended, name)[row, :width], getattr(registered, name)[row + 2, :width]), name
    assert registered.host.distinct_bound == appended.host.distinct_bound == int(appended.n_distinct.max())


def test_buckets_and_the_scratch_views():
    assert prefill_bucket(3, 17, 1024) == (3, 24) and prefill_bucket(5, 100, 1024) == (6, 128)
    assert prefill_bucket(1, 40, 32) is None  # wider than the cache
    assert prefill_bucket(3, 20, 20) == (3, 20)  # the width bucket capped at the cache's length
    assert prefill_bucket(128, 200, 1024) is None  # 128 x 256 > PREFILL_GRAPH_TOKENS
    assert WIDTH_BUCKETS[0] == 16 and WIDTH_BUCKETS[-1] == PREFILL_GRAPH_TOKENS
    model = tiny_model("eg-mla")
    model.set_decode_path("grouped")
    scratch = model.new_cache(8, max_len=16)
    view = scratch.reshaped(3, 40)  # 120 of the 128 positions, read as one run
    assert (view.batch_size, view.max_len) == (3, 40)
    latent = view.layers[0].buffers["latent"]
    assert latent.shape[:2] == (3, 40) and latent.data_ptr() == scratch.layers[0].buffers["latent"].data_ptr()
    latent[2, 39] = 1.0  # position 119 of the run: row 7, position 7 of the scratch
    assert scratch.layers[0].buffers["latent"][7, 7].eq(1.0).all()
    with pytest.raises(ValueError, match="rows x width"):
        scratch.reshaped(3, 50)
    target = model.new_cache(2, max_len=16)
    with pytest.raises(ValueError, match="take_rows"):
        target.take_rows(view, 1, 2, 16)  # rows [1, 3) of a 2-row cache
    with pytest.raises(ValueError, match="take_rows"):
        target.take_rows(view, 0, 2, 20)  # wider than the target


def test_more_short_prompts_than_the_scratch_has_rows_prefill_eagerly():
    """A cache shorter than MIN_WIDTH caps the width bucket below it, so rows x width can stay within
    PREFILL_GRAPH_TOKENS while the rows pass the scratch's PREFILL_GRAPH_TOKENS // MIN_WIDTH: no bucket takes them
    (the scratch's `reshaped` refused such a view, failing the call), and the engine prefills them eagerly."""
    rows = PREFILL_GRAPH_TOKENS // MIN_WIDTH + 1
    assert prefill_bucket(rows, 2, 8) is None and prefill_bucket(rows - 1, 2, 8) == (rows - 1, 8)
    model = tiny_model("mha")
    vocab = model.config.vocab_size
    prompts = [[i // vocab, i % vocab] for i in range(rows)]  # distinct: a repeated prompt is prefilled once
    got = GenerationEngine(model, prefill_graphs=True).generate(prompts, max_new_tokens=1)
    want = GenerationEngine(model, prefill_graphs=False).generate(prompts, max_new_tokens=1)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_a_prefill_step_refuses_what_it_cannot_hold():
    model = tiny_model("mla")
    engine = GenerationEngine(model, decode_path="absorbed", prefill_graphs=True)
    cache = engine._cache_for(4, 40)
    step = engine.prefill_step(2, 10, cache.max_len)
    tokens, n_new = _prompts(model.config.vocab_size, [5, 0, 3])
    with pytest.raises(ValueError, match="at least one token"):
        step.prefill(cache, 0, tokens[:2], n_new[:2], False)
    with pytest.raises(ValueError, match="into a step of 2 x 16"):
        step.prefill(cache, 0, tokens, torch.tensor([5, 1, 3]), False)
    assert GenerationEngine(model, decode_path="absorbed").prefill_step(2, 10, 40) is None  # off without graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant,path", [("mla", "kernel"), ("eg-mla", "grouped"), ("eg-mla", "kernel"),
                                          ("mha", "kernel"), ("eg-mla-bias-v", "absorbed")])
def test_on_cuda_a_replayed_prefill_graph_equals_the_eager_prefill(variant, path):
    """bf16 on a GPU: the step captured once and replayed for prompts of other lengths and rows gives the eager
    prefill's logits and cache rows (each replay reads its new inputs), and then the same greedy tokens."""
    model = tiny_model(variant, seed=11, d_model=256, n_heads=4, max_seq_len=128).cuda().to(torch.bfloat16)
    stepped = GenerationEngine(model, decode_path=path)
    eager = GenerationEngine(model, decode_path=path, prefill_graphs=False)
    assert stepped.prefill_graphs and not eager.prefill_graphs
    for seed, lengths in enumerate(([30, 7, 19], [12, 31], [25, 25, 3])):
        tokens, n_new = _prompts(model.config.vocab_size, lengths, seed=seed)
        caches, logits = [], []
        for engine in (eager, stepped):
            with torch.no_grad():
                cache = engine._cache_for(4, 100)
                step = engine.prefill_step(len(lengths), tokens.shape[1], cache.max_len)
                if step is None:
                    out = model(tokens.cuda(), cache.rows(1, 1 + len(lengths)), n_new=n_new.cuda(),
                                logits_at=(n_new - 1).cuda())[:, 0]
                else:
                    out = step.prefill(cache, 1, tokens, n_new, engine.reads_token_groups())
            caches.append(cache)
            logits.append(out.float())
        assert step is not None and step.graph is not None and step.width == 32
        assert torch.isfinite(logits[1]).all()
        assert (logits[1] - logits[0]).norm() / logits[0].norm() < 1e-2, seed
        for layer_eager, layer_stepped in zip(caches[0].layers, caches[1].layers):
            for name, buffer in layer_eager.buffers.items():
                for row, length in enumerate(lengths, start=1):
                    a, b = buffer[row, :length].float(), layer_stepped.buffers[name][row, :length].float()
                    assert (a - b).norm() <= 1e-2 * a.norm() + 1e-6, (seed, name, row)
        assert caches[1].lengths[1:1 + len(lengths)].tolist() == lengths
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9]]
    want = [g.token_ids for g in eager.generate(prompts, max_new_tokens=8)]
    assert [g.token_ids for g in stepped.generate(prompts, max_new_tokens=8)] == want
    # a budget of 16 tokens: one prompt per group, both groups in bucket (1, 16), one graph replayed twice in a call
    stepped = GenerationEngine(model, decode_path=path, prefill_token_budget=16)
    assert [g.token_ids for g in stepped.generate(prompts, max_new_tokens=8)] == want
    assert [key[1:] for key in stepped._prefill_steps] == [(1, 16)]
