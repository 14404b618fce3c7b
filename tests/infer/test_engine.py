"""Generation engine: decode paths agree with each other and with full recompute, ragged batches,
seeded sampling, stop conditions, streaming, bad input."""
import warnings

import pytest
import torch
from tests.infer.helpers import (VARIANTS, assert_log_probs_match, assert_served_log_probs_match,
                                 assert_steps_match_full_forward, full_forward_log_probs, relative_error, tiny_model)

from egmla.attention import decode_paths
from egmla.infer import GenerationEngine, SamplingParams
from egmla.infer.scheduler import Scheduler

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [120, 8], [33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45], [260]]


def greedy_full_recompute(model, prompt: list[int], new_tokens: int) -> list[int]:
    """The reference: no cache, the whole sequence through the training forward at every step."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    return sequence[len(prompt):]


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_same_on_every_path_and_as_full_recompute(variant, step_log_probs):
    """Every decode path gives the tokens of a full recompute, and at every step (prefill's included) the whole
    distribution, hence each generated token's log-probability, of one full forward of prompt + tokens, to fp32."""
    model = tiny_model(variant)
    expected = [greedy_full_recompute(model, prompt, 10) for prompt in PROMPTS]
    assert len({tuple(tokens) for tokens in expected}) > 1  # the prompts lead to different outputs
    reference = torch.stack([full_forward_log_probs(model, p, t) for p, t in zip(PROMPTS, expected)])
    tokens = torch.tensor(expected)
    for path in decode_paths(model.config):
        step_log_probs.clear()
        results = GenerationEngine(model, decode_path=path).generate(PROMPTS, max_new_tokens=10)
        assert [r.token_ids for r in results] == expected, path
        assert all(r.finish_reason == "length" for r in results)
        # every sequence runs to the end: one [4, vocab] set of logits per token, rows in prompt order
        assert_log_probs_match(torch.stack(step_log_probs, dim=1), reference, tokens, path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_served_logprobs_are_the_full_forwards_on_every_path(variant):
    """The log-probabilities the engine serves (Scheduler logprobs=k, what the server returns as OpenAI's logprobs):
    on every decode path, for ragged prompts sharing the batch and ending at different steps, each generated token's
    and the step's k most likely tokens' are those of one full forward of prompt + tokens, to fp32."""
    model = tiny_model(variant, seed=5)
    new = [10, 4, 7, 1]
    for path in decode_paths(model.config):
        scheduler = Scheduler(GenerationEngine(model, decode_path=path), max_batch=len(PROMPTS))
        handles = [scheduler.submit(p, max_new_tokens=n, logprobs=2) for p, n in zip(PROMPTS, new)]
        while scheduler.step():
            pass
        for handle, n in zip(handles, new):
            result = handle.result()
            assert len(result.token_ids) == len(result.logprobs) == n, path
            reference = full_forward_log_probs(model, handle.prompt_ids, result.token_ids)
            chosen = reference.gather(-1, torch.tensor(result.token_ids)[:, None])[:, 0]
            assert result.token_ids == reference.argmax(dim=-1).tolist(), path  # greedy
            served = torch.tensor(result.logprobs)
            assert torch.isfinite(served).all() and relative_error(served, chosen) < 1e-4, \
                (path, relative_error(served, chosen))
            top = torch.tensor([list(t.values()) for t in result.top_logprobs])
            assert [list(t) for t in result.top_logprobs] == reference.topk(2).indices.tolist(), path
            assert relative_error(top, reference.topk(2).values) < 1e-4, path


# every variant and path; the Triton 'kernel' path (slow in the CPU interpreter) once per kernel
ALL_PATHS = [(variant, path) for variant in VARIANTS for path in decode_paths(tiny_model(variant).config)
             if path != "kernel" or variant in ("mla", "eg-mla")]


@pytest.mark.parametrize("variant,path", ALL_PATHS)
def test_ragged_batch_with_early_finish_equals_each_alone(variant, path, step_log_probs):
    """Sequences that finish early stop appending and, once the rest fit a smaller batch bucket, their
    cache rows are dropped; the others must not notice, with or without bucket padding: the same tokens as each
    prompt alone, and at every step each live sequence's whole distribution that of the full forward, to fp32."""
    model = tiny_model(variant, seed=1)
    engine = GenerationEngine(model, decode_path=path)
    free_run = engine.generate(PROMPTS, max_new_tokens=12)
    eos = free_run[0].token_ids[3]  # sequence 0 stops at step 4 at the latest
    alone = []
    for prompt in PROMPTS:
        step_log_probs.clear()
        alone.append(engine.generate([prompt], max_new_tokens=12, eos_token_id=eos)[0])
        assert_steps_match_full_forward(model, [prompt], alone[-1:], step_log_probs, (path, "alone"))
    assert alone[0].finish_reason == "eos" and len(alone[0].token_ids) <= 4
    assert any(r.finish_reason == "length" for r in alone)  # someone outlives sequence 0
    for buckets in ((), (1, 2, 3, 8)):  # exact batches; padded 4 -> 8, then 3 live rows compacted to 3
        step_log_probs.clear()
        batch = GenerationEngine(model, decode_path=path, batch_buckets=buckets).generate(
            PROMPTS, max_new_tokens=12, eos_token_id=eos)
        assert [r.token_ids for r in batch] == [r.token_ids for r in alone], buckets
        assert [r.finish_reason for r in batch] == [r.finish_reason for r in alone], buckets
        assert_steps_match_full_forward(model, PROMPTS, batch, step_log_probs, (path, buckets))


def test_auto_path_is_chosen_per_call_and_changes_nothing_but_speed(monkeypatch):
    """decode_path="auto" picks the path for each call from its batch and cache length (on CUDA: EG-MLA's grouped
    decode for large steps). Here, on the CPU, a stand-in rule (grouped from 3 sequences, gate-table below) drives
    the same switching: each call runs the path chosen for it, on one cache of the grouped layout kept across the
    changes of path, and gives the tokens of an engine fixed to that path."""
    import egmla.infer.engine as engine_module

    model = tiny_model("eg-mla", seed=2)
    fixed = {path: GenerationEngine(model, decode_path=path).generate(PROMPTS, max_new_tokens=6)
             for path in ("gate-table", "grouped")}
    chosen = []

    def rule(config, device, batch_size=None, context=None):
        chosen.append((batch_size, context))
        return "grouped" if batch_size and batch_size >= 3 else "gate-table"

    monkeypatch.setattr(engine_module, "fastest_decode_path", rule)
    monkeypatch.setattr(engine_module, "device_free_bytes", lambda device: 1 << 40)  # room for the grouped path
    engine = GenerationEngine(model, decode_path="auto")
    engine.auto_path = True  # as on CUDA without an offload
    kept = []
    for prompts, path in ((PROMPTS, "grouped"), (PROMPTS[:2], "gate-table"), (PROMPTS, "grouped"),
                          ([PROMPTS[2], PROMPTS[0]], "gate-table")):
        results = engine.generate(prompts, max_new_tokens=6)
        assert engine.decode_path == model.decode_path == engine.last_stats.decode_path == path
        assert engine._cache.token_groups is not None  # the grouped layout, whatever the path
        assert [r.token_ids for r in results] == [r.token_ids for r in fixed[path][:len(prompts)]] if path == "grouped" \
            else [r.token_ids for r in results] == [r.token_ids for r in GenerationEngine(model, decode_path=path)
                                                     .generate(prompts, max_new_tokens=6)], path
        kept.append(engine._cache)
    assert chosen[-4:] == [(4, 18), (2, 12), (4, 18), (2, 18)]  # batch, and the longest prompt + new tokens - 1
    assert kept[2] is kept[3]  # the same length: one cache across the change of path (not kept for 12 positions)
    apart = GenerationEngine(model, decode_path="auto", share_cache_across_paths=False)
    apart.auto_path = True
    apart.generate(PROMPTS, max_new_tokens=6)
    first = apart._cache
    apart.generate([PROMPTS[2], PROMPTS[0]], max_new_tokens=6)  # 'gate-table': its own layout, made again
    assert apart._cache is not first and apart._cache.token_groups is None


def test_auto_keeps_steps_across_paths_unless_a_gate_table_is_rebuilt(monkeypatch):
    """Under "auto" a change of path keeps the decode steps (graphs, on CUDA) of the other path, which read the gate
    tables by address; where a table was rebuilt (the model's path set behind the engine, with or without a change),
    the steps go with it, and the tokens are still those of a fresh engine."""
    import egmla.infer.engine as engine_module

    model = tiny_model("eg-mla", seed=2)
    monkeypatch.setattr(engine_module, "fastest_decode_path",
                        lambda config, device, batch_size=None, context=None: "grouped" if batch_size >= 3 else "gate-table")
    monkeypatch.setattr(engine_module, "device_free_bytes", lambda device: 1 << 40)
    engine = GenerationEngine(model, decode_path="auto")
    engine.auto_path = True
    engine.generate(PROMPTS, max_new_tokens=4)
    grouped_steps = dict(engine._steps)
    engine.generate([PROMPTS[2], PROMPTS[0]], max_new_tokens=4)  # 'gate-table', same cache length
    assert grouped_steps and all(engine._steps[key] is step for key, step in grouped_steps.items())
    model.set_decode_path("naive")  # behind the engine's back: the gate tables are dropped
    results = engine.generate(PROMPTS, max_new_tokens=4)  # 'grouped' again, its table rebuilt
    assert not any(engine._steps.get(key) is step for key, step in grouped_steps.items())
    fresh = GenerationEngine(model, decode_path="grouped").generate(PROMPTS, max_new_tokens=4)
    assert [r.token_ids for r in results] == [r.token_ids for r in fresh]
    kept = dict(engine._steps)
    model.set_decode_path("grouped")  # the same path, its tables rebuilt (as after a weight change)
    engine.generate(PROMPTS, max_new_tokens=4)
    assert kept and not any(engine._steps.get(key) is step for key, step in kept.items())


def test_engine_keeps_its_cache_between_calls_of_one_shape():
    model = tiny_model("mla")
    engine = GenerationEngine(model, decode_path="absorbed")
    assert engine.kept_cache_len is None
    first = engine.generate(PROMPTS, max_new_tokens=5)
    cache = engine._cache
    assert engine.kept_cache_len == cache.max_len == max(len(p) for p in PROMPTS) + 5 - 1
    again = engine.generate(PROMPTS, max_new_tokens=5)
    assert engine._cache is cache and [r.token_ids for r in again] == [r.token_ids for r in first]
    engine.generate(PROMPTS[:1], max_new_tokens=9)  # another length: a new cache
    assert engine._cache is not cache and engine.kept_cache_len == engine._cache.max_len
    engine.release()
    assert engine._cache is None and engine.kept_cache_len is None


def test_prefill_in_row_groups_and_chunks_equals_one_call(step_log_probs):
    """Prefill split by prefill_token_budget (later chunks at later positions, rows in groups) gives the tokens of one
    call and, at every step (the prefill's included), the full forward's distributions, to fp32."""
    model = tiny_model("eg-mla")
    expected = [r.token_ids for r in GenerationEngine(model).generate(PROMPTS, max_new_tokens=6)]
    for budget in (1, 7, 20):  # one token per call; chunks of long prompts; groups of short ones
        engine = GenerationEngine(model, prefill_token_budget=budget)
        step_log_probs.clear()
        results = engine.generate(PROMPTS, max_new_tokens=6)
        assert [r.token_ids for r in results] == expected, budget
        assert_steps_match_full_forward(model, PROMPTS, results, step_log_probs, budget)


@pytest.mark.parametrize("variant,path", [("mha", "naive"), ("eg-mla", "grouped"), ("mla", "absorbed")])
def test_repeated_prompts_are_prefilled_once_and_copied(variant, path):
    model = tiny_model(variant)
    engine = GenerationEngine(model, decode_path=path)
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    alone = {i: engine.generate([PROMPTS[i]], max_new_tokens=7)[0].token_ids for i in range(3)}
    batch = engine.generate(prompts, max_new_tokens=7)
    assert [r.token_ids for r in batch] == [alone[PROMPTS.index(p)] for p in prompts]


def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        GenerationEngine(tiny_model("mla"), cuda_graphs=True)
    assert not GenerationEngine(tiny_model("mla")).cuda_graphs  # CPU: the same step, eagerly


def test_context_limit_ends_with_length():
    model = tiny_model("mla")
    context = model.config.max_seq_len
    prompt = list(range(1, context - 2))  # room for 3 more cached tokens, so 4 new ones at most
    result = GenerationEngine(model).generate([prompt, [1, 2]], max_new_tokens=20)
    assert len(result[0].token_ids) == 4 and result[0].finish_reason == "length"
    assert len(result[1].token_ids) == 20
    full = GenerationEngine(model).generate([list(range(1, context + 1))], max_new_tokens=5)[0]
    assert len(full.token_ids) == 1  # a prompt filling the context still gets its one next token


def test_same_seed_same_samples_different_seed_differs():
    model = tiny_model("eg-mla")
    engine = GenerationEngine(model, decode_path="gate-table")

    def sample(seed):
        params = SamplingParams(temperature=1.5, top_k=100, top_p=0.98, seed=seed)
        return [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=16, sampling=params)]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert first != [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=16)]  # not greedy


def test_streaming_events_rebuild_the_text_and_stop_strings_cut(tokenizer):
    model = tiny_model("eg-mla", vocab_size=tokenizer.get_vocab_size())
    engine = GenerationEngine(model, tokenizer)
    prompts = ["To be, or not", "whether 'tis"]
    plain = engine.generate(prompts, max_new_tokens=20)
    events = []
    streamed = engine.generate(prompts, max_new_tokens=20, on_token=events.append)
    for result in streamed:
        mine = [e for e in events if e.index == result.index]
        assert [e.token_id for e in mine] == result.token_ids
        assert "".join(e.text for e in mine) == result.text == tokenizer.decode(result.token_ids)
        assert mine[-1].finish_reason == "length" and all(e.finish_reason is None for e in mine[:-1])
    # without on_token the text is decoded once at the end: the same text as the streamed pieces
    assert [r.text for r in plain] == [r.text for r in streamed] and all(r.text for r in plain)
    text = plain[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip()
    events.clear()
    stopped = engine.generate(prompts[:1], max_new_tokens=20, stop_strings=[stop], on_token=events.append)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]
    assert "".join(e.text for e in events) == stopped.text  # no part of the stop string was streamed


def test_bad_input_raises_clear_value_errors(tokenizer):
    model = tiny_model("eg-mla")
    engine = GenerationEngine(model)
    with pytest.raises(ValueError, match="max_seq_len=48"):
        engine.generate([list(range(1, 50))])
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="prompts is empty"):
        engine.generate([])
    with pytest.raises(ValueError, match="vocab_size=300"):
        engine.generate([[1, 300]])
    with pytest.raises(ValueError, match=r"prompts\[0\]=1 is a token id, not a prompt: .* pass \[\[1, 2, 3\]\]"):
        engine.generate([1, 2, 3])  # one prompt of ids, unwrapped: was "'int' object is not iterable"
    with pytest.raises(ValueError, match="decode_path='absorbed'.*naive, gate-table"):
        GenerationEngine(model, decode_path="absorbed")
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate(["text"])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_stats_and_cache_size():
    model = tiny_model("eg-mla")
    engine = GenerationEngine(model)
    engine.generate(PROMPTS, max_new_tokens=6)
    stats = engine.last_stats
    assert stats.generated_tokens == 6 * len(PROMPTS) and stats.batch_size == len(PROMPTS)
    assert len(stats.step_seconds) == 5 and stats.decode_tokens_per_second > 0
    longest = max(len(p) for p in PROMPTS) + 5
    per_token = 2 * (16 + 8) * 4 + 4  # two layers of fp32 (latent + k_rope), one int32 id
    assert stats.cache_bytes == len(PROMPTS) * longest * per_token


def test_stats_say_graphs_only_where_the_steps_replayed_them(monkeypatch):
    """A batch above MAX_GRAPH_BATCH runs its steps eagerly even on an engine with graphs on: the stats (and the
    benchmark rows made from them) say so. Graph capture itself is GPU-only; here no step asks for it."""
    import egmla.infer.engine as engine_module

    engine = GenerationEngine(tiny_model("mla"))
    engine.cuda_graphs = True  # as on CUDA; with no step below the limit, nothing is captured
    monkeypatch.setattr(engine_module, "MAX_GRAPH_BATCH", 0)
    engine.generate(PROMPTS, max_new_tokens=4)
    assert not engine.last_stats.cuda_graphs and not engine.last_step.use_graph


@pytest.mark.parametrize("variant,path", [("gqa", "naive"), ("mla", "absorbed"), ("eg-mla", "gate-table")])
def test_chunked_prefill_equals_one_call(variant, path, step_log_probs):
    """Chunked prefill gives one call's tokens and, at every step, the full forward's distributions, to fp32."""
    model = tiny_model(variant, seed=2)
    one_call = GenerationEngine(model, decode_path=path).generate(PROMPTS, max_new_tokens=6)
    chunked = GenerationEngine(model, decode_path=path, prefill_token_budget=9)  # 2 tokens x 4 rows a call
    step_log_probs.clear()
    results = chunked.generate(PROMPTS, max_new_tokens=6)
    assert [r.token_ids for r in results] == [r.token_ids for r in one_call]
    assert_steps_match_full_forward(model, PROMPTS, results, step_log_probs, path)


def test_a_longer_kept_cache_serves_shorter_calls_only_where_graphs_replay_a_length_bounded_path():
    """`_cache_for`: with CUDA graphs (set by hand here: the choice is host-side) and a path whose steps read only
    each sequence's positions, a shorter call keeps the cache (and so its graphs); a longer one, or a path whose
    attention spans the whole buffer, gets a cache of its own length; `reuse_longer_cache=False` turns reuse off."""
    model = tiny_model("mla")
    for path, reuse, kept in (("kernel", True, True), ("absorbed", True, False), ("kernel", False, False)):
        engine = GenerationEngine(model, decode_path=path, reuse_longer_cache=reuse)
        engine.cuda_graphs = True
        first = engine._cache_for(4, 30)
        shorter = engine._cache_for(2, 20)
        assert (shorter is first) == kept and shorter.max_len == (30 if kept else 20), (path, reuse)
        longer = engine._cache_for(2, 40)
        assert longer is not first and longer.max_len == 40
    engine = GenerationEngine(model, decode_path="kernel")  # no graphs (CPU): the length must match
    assert engine._cache_for(4, 20) is not engine._cache_for(4, 30) and engine._cache.max_len == 30


def test_a_kept_grouped_graph_sized_for_more_distinct_ids_serves_a_call_needing_fewer():
    """`decode_step` on a grouped cache with graphs (set by hand: steps are built, never run, here): a call needing a
    distinct-id bound at most that of a kept step reuses it (the smallest such), a call needing more gets its own."""
    model = tiny_model("eg-mla", max_seq_len=600)
    engine = GenerationEngine(model, decode_path="grouped")
    engine.cuda_graphs = True
    cache = engine._cache_for(2, 600)  # bounds round up to 256 distinct ids, at most the cache length
    groups = cache.token_groups
    groups.host.distinct_bound = 300
    large = engine.decode_step(cache, 2, new_tokens_bound=10)  # needs 311 -> 512
    assert groups.host.plan_distinct == 512
    groups.host.distinct_bound = 100
    assert engine.decode_step(cache, 2, new_tokens_bound=10) is large and groups.host.plan_distinct == 512  # needs 256
    groups.host.distinct_bound = 550
    assert engine.decode_step(cache, 2, new_tokens_bound=10) is not large and groups.host.plan_distinct == 600
    assert sorted(engine._steps) == [("grouped", 2, 512), ("grouped", 2, 600)]


@pytest.mark.parametrize("cache_dtype", [None, "fp8", "fp8-keep-rope"])
def test_auto_takes_the_kernel_where_the_grouped_step_would_not_fit(monkeypatch, cache_dtype):
    """decode_path="auto" (forced on here, as on CUDA): where the rule says 'grouped' but its cache and working
    memory at the most distinct ids there can be exceed the device's free memory, the call runs the CUDA default
    ('kernel'), with a warning; with room it runs 'grouped'. Tokens are the same either way. Over an fp8 cache the
    working memory is still in the model's dtype (4 bytes here), as `egmla plan` counts it."""
    import egmla.infer.engine as engine_module
    from egmla.accounting import measured_cache_bytes_per_token
    from egmla.attention import cache_format, checked_cache_dtype
    from egmla.infer.plan import decode_workspace_bytes

    model = tiny_model("eg-mla", seed=2)
    monkeypatch.setattr(engine_module, "fastest_decode_path", lambda config, device, batch, context: "grouped")
    stored = cache_format(checked_cache_dtype(cache_dtype), torch.float32)
    per_token, _ = measured_cache_bytes_per_token(model.config, stored, "grouped")
    need = 4 * (per_token * 18 + decode_workspace_bytes(model.config, "grouped", 18, 4))  # 4 prompts, 18 positions
    results = {}
    for free, path in ((need, "grouped"), (need - 1, "kernel")):
        monkeypatch.setattr(engine_module, "device_free_bytes", lambda device: free)
        engine = GenerationEngine(model, decode_path="auto", batch_buckets=(), cache_dtype=cache_dtype)
        engine.auto_path = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[path] = [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=6)]
        assert engine.last_stats.decode_path == path
        assert any("do not fit the free device memory" in str(w.message) for w in caught) == (path == "kernel")
    assert results["grouped"] == results["kernel"]


@pytest.mark.parametrize("variant,path", [("mla", "absorbed"), ("eg-mla", "grouped"), ("mha", "naive")])
def test_steps_run_ahead_of_the_host_with_the_same_tokens(monkeypatch, variant, path):
    """overlap_host (the default) queues each decode step before reading back the tokens it takes: the same tokens,
    finish reasons and streamed events as reading first, for sequences ending by eos mid-way (their rows compacted
    into a smaller bucket), by length, by the context's end, and with seeded sampling. A step runs only where a row
    still appends: an eos ending every sequence at once costs one step that reading first does not run; ends by
    length cost none."""
    from egmla.infer.decode_step import DecodeStep

    runs = []
    original = DecodeStep.run
    monkeypatch.setattr(DecodeStep, "run", lambda self: runs.append(self.batch) or original(self))
    model = tiny_model(variant, seed=1)
    free = GenerationEngine(model, decode_path=path).generate(PROMPTS, max_new_tokens=10)
    eos = free[0].token_ids[3]
    context = model.config.max_seq_len
    # an eos one sequence reaches after two decode steps and no other does: the bucket shrinks after a step run ahead
    late = next(t for i, r in enumerate(free) for j, t in enumerate(r.token_ids) if j >= 2 and t not in r.token_ids[:j]
                and all(t not in other.token_ids for k, other in enumerate(free) if k != i))
    calls = [dict(prompts=PROMPTS, max_new_tokens=10, eos_token_id=eos),
             dict(prompts=PROMPTS, max_new_tokens=10, eos_token_id=late),
             dict(prompts=PROMPTS, max_new_tokens=10),
             dict(prompts=[list(range(1, context - 2)), [1, 2]], max_new_tokens=8),  # one ends at the context
             dict(prompts=PROMPTS, max_new_tokens=9, sampling=SamplingParams(temperature=1.3, top_k=50, seed=3))]
    for call in calls:
        outcome = {}
        for overlap in (False, True):
            events = []
            runs.clear()
            engine = GenerationEngine(model, decode_path=path, batch_buckets=(1, 2, 3, 8), overlap_host=overlap)
            results = engine.generate(call["prompts"], call["max_new_tokens"], call.get("sampling", SamplingParams()),
                                      call.get("eos_token_id"), on_token=events.append, logprobs=3)
            outcome[overlap] = ([(r.token_ids, r.finish_reason) for r in results], events, list(runs))
            # a step run ahead must not change the logits its tokens were picked from: each step's log-probabilities
            # (the chosen token's and the 3 most likely) are one full forward's, to fp32
            for prompt, result in zip(call["prompts"], results):
                assert_served_log_probs_match(model, prompt, result, (call, overlap, result.index))
        # the same events (their log-probabilities are checked above: a step run in a larger bucket may differ by
        # an ulp from one run in the compacted bucket)
        assert [(e.index, e.token_id, e.text, e.finish_reason) for e in outcome[True][1]] == \
            [(e.index, e.token_id, e.text, e.finish_reason) for e in outcome[False][1]], call
        assert outcome[True][0] == outcome[False][0], call
        if "eos_token_id" not in call:  # every sequence ends by length: the same steps, in the same buckets
            assert outcome[True][2] == outcome[False][2], call
    # an eos that both copies of one prompt reach at once, after at least one decode step
    prompt, everyone = next((PROMPTS[i], t) for i, r in enumerate(free) for j, t in enumerate(r.token_ids)
                            if j >= 1 and t not in r.token_ids[:j])
    counts = {}
    for overlap in (False, True):
        runs.clear()
        engine = GenerationEngine(model, decode_path=path, overlap_host=overlap)
        results = engine.generate([prompt] * 2, max_new_tokens=10, eos_token_id=everyone)
        assert [r.finish_reason for r in results] == ["eos", "eos"]
        counts[overlap] = len(runs)
    assert counts[True] == counts[False] + 1
