"""Continuous batching (egmla/infer/scheduler.py): requests that join and leave a running batch get exactly the
tokens each gets alone, on every variant's paths; rows are reused and compacted; seeds, cancellation, errors."""
import threading

import pytest
import torch
from tests.infer.helpers import assert_served_log_probs_match, tiny_model

from egmla.attention import decode_paths
from egmla.infer import GenerationEngine, SamplingParams
from egmla.infer.scheduler import MAX_TOP_LOGPROBS, Scheduler

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [120, 8], [33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45], [260],
           [7, 7, 7, 9], [200, 201, 17, 5, 5, 5, 80, 81, 82]]
NEW = [9, 4, 12, 7, 3, 10]  # max_new_tokens of each request: they end at different steps

# every variant's paths; the Triton 'kernel' path (slow in the CPU interpreter) for MLA and EG-MLA only
CASES = [(variant, path) for variant in ("mha", "gqa", "mla", "eg-mla", "eg-mla-latent", "eg-mla-bias-v")
         for path in decode_paths(tiny_model(variant).config)
         if path != "kernel" or variant in ("mla", "eg-mla")]


def alone(engine, index, eos=None, sampling=SamplingParams()):
    return engine.generate([PROMPTS[index]], max_new_tokens=NEW[index], eos_token_id=eos, sampling=sampling)[0]


def staggered(scheduler, arrivals, eos=None, sampling=SamplingParams()):
    """Submit request i once `arrivals[i]` steps have run; step until all are done; handles in request order."""
    handles = {}
    steps = 0
    while len(handles) < len(PROMPTS) or any(not h.done for h in handles.values()):
        for i, at in enumerate(arrivals):
            if at == steps and i not in handles:
                handles[i] = scheduler.submit(PROMPTS[i], max_new_tokens=NEW[i], eos_token_id=eos, sampling=sampling)
        scheduler.step()
        steps += 1
        assert steps < 200
    return [handles[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("variant,path", CASES)
def test_requests_joining_and_leaving_get_the_tokens_they_get_alone(variant, path):
    """Six requests arrive at different steps into three rows: some wait, finished rows are emptied and reused by
    later prompts (shorter and longer than what the row held), and with buckets the live rows are compacted."""
    model = tiny_model(variant, seed=3)
    engine = GenerationEngine(model, decode_path=path)
    eos = alone(engine, 0).token_ids[2]  # some requests end on it, early
    expected = [alone(engine, i, eos) for i in range(len(PROMPTS))]
    assert any(r.finish_reason == "eos" for r in expected) and any(r.finish_reason == "length" for r in expected)
    # chunk 3: prompts fed over iterations; overlap: each step queued before the previous one's tokens are read;
    # prefill steps: fresh prompts through the fixed-shape step (a CUDA graph on a GPU, eager here), the rest not
    settings = (((), None, False, False), ((), None, True, True), ((1, 2, 4), None, True, False),
                ((1, 2, 4), 3, True, True))
    if path == "kernel":  # slow in the interpreter: the first and the last setting, which differ in everything
        settings = settings[::3]
    for buckets, chunk, overlap, prefill_steps in settings:
        engine = GenerationEngine(model, decode_path=path, batch_buckets=buckets, prefill_graphs=prefill_steps)
        scheduler = Scheduler(engine, max_batch=3, prefill_chunk=chunk, overlap_host=overlap)
        handles = staggered(scheduler, [0, 0, 1, 1, 3, 6], eos)
        results = [h.result() for h in handles]
        setting = (buckets, chunk, overlap, prefill_steps)
        stats = scheduler.stats
        assert (0 < stats.prefill_graph_calls < stats.prefill_calls if chunk and prefill_steps else
                stats.prefill_graph_calls == (stats.prefill_calls if prefill_steps else 0)), setting
        assert [r.token_ids for r in results] == [r.token_ids for r in expected], setting
        assert [r.finish_reason for r in results] == [r.finish_reason for r in expected], setting
        assert scheduler.stats.requests_finished == len(PROMPTS) and scheduler.running == 0
        assert scheduler.stats.generated_tokens == sum(len(r.token_ids) for r in expected)
        # every bucket's step reads the scheduler's next tokens in place (greedy rows' argmax written there): no copy
        steps = list(engine._steps.values())
        assert steps and all(s.tokens.data_ptr() == scheduler._next.data_ptr() for s in steps), setting


@pytest.mark.parametrize("variant,path", [("mla", "absorbed"), ("eg-mla", "grouped"), ("mha", "naive")])
@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8-keep-rope"])
def test_requests_over_an_fp8_cache_get_the_tokens_they_get_alone(variant, path, cache_dtype):
    """The scheduler over an fp8 and an fp8-keep-rope cache: staggered requests into reused, compacted rows get the
    tokens each gets alone from the engine over the same cache format (rows copied and moved as stored, uint8 and
    wide tensors alike)."""
    model = tiny_model(variant, seed=3)
    engine = GenerationEngine(model, decode_path=path, cache_dtype=cache_dtype, batch_buckets=(1, 2, 4))
    eos = alone(engine, 0).token_ids[2]
    expected = [alone(engine, i, eos) for i in range(len(PROMPTS))]
    scheduler = Scheduler(engine, max_batch=3)
    results = [h.result() for h in staggered(scheduler, [0, 0, 1, 1, 3, 6], eos)]
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    assert str(engine._cache.dtype) == str(engine.cache_dtype) and scheduler.running == 0


def test_rows_are_compacted_when_the_live_ones_fit_a_smaller_bucket():
    model = tiny_model("eg-mla", seed=4)
    engine = GenerationEngine(model, decode_path="grouped", batch_buckets=(1, 2, 4))
    expected = [alone(engine, i) for i in range(4)]
    scheduler = Scheduler(engine, max_batch=4)
    handles = [scheduler.submit(PROMPTS[i], max_new_tokens=NEW[i]) for i in range(4)]
    while scheduler.step():
        pass
    assert [h.result().token_ids for h in handles] == [r.token_ids for r in expected]
    assert scheduler.stats.compactions >= 1  # rows 0 and 3 outlive 1: moved to rows 0-1 for the bucket of 2


@pytest.mark.parametrize("variant,path", [("mla", "absorbed"), ("eg-mla", "grouped"), ("mha", "naive")])
@pytest.mark.parametrize("chunk", [None, 5])
def test_prompts_admitted_into_scattered_rows_are_prefilled_in_one_forward(variant, path, chunk):
    """Rows 1, 3 and 5 free up while 0, 2 and 4 run: the three prompts admitted together are swapped into adjacent
    rows (with the rows they displace, contents and all) and prefilled by one forward (chunk 5: the prompts fed
    over several iterations, a fresh one and a continued one in each, in forwards of their own); no token changes."""
    model = tiny_model(variant, seed=9)
    engine = GenerationEngine(model, decode_path=path)
    prompts = [PROMPTS[i % len(PROMPTS)][:6] + [30 + i] for i in range(9)]
    new_tokens = [14, 2, 14, 2, 14, 2, 6, 5, 4]
    expected = [engine.generate([p], max_new_tokens=n)[0].token_ids for p, n in zip(prompts, new_tokens)]
    scheduler = Scheduler(engine, max_batch=6, admit_batch=3, prefill_chunk=chunk)
    handles = [scheduler.submit(p, max_new_tokens=n) for p, n in zip(prompts, new_tokens)]
    while scheduler.step():
        pass
    assert [h.result().token_ids for h in handles] == expected
    if chunk is None:  # the first six in one forward, the last three in one
        assert scheduler.stats.rows_moved > 0 and scheduler.stats.prefill_calls == 2


@pytest.mark.parametrize("overlap", [True, False])
def test_requests_ending_on_their_first_token_above_a_free_row(overlap):
    """A request admitted above a free row (row 0 keeps a cached prefix) that ends on its first token: compaction is
    due when its prefill completes, and reading that token retires the only row; nothing is left to compact (this
    raised IndexError and failed every request) and the next requests run. Each gets its tokens alone and, at every
    step, the served log-probabilities (its token's and the 20 most likely) of one full forward, to fp32."""
    engine = GenerationEngine(tiny_model("mla", seed=3), decode_path="naive", batch_buckets=(1, 2))
    scheduler = Scheduler(engine, max_batch=2, prefix_cache_min=4, overlap_host=overlap)
    first = scheduler.submit([10, 11, 12, 13, 14, 15], max_new_tokens=1,  # leaves a cached prefix in row 0
                             logprobs=MAX_TOP_LOGPROBS)
    while scheduler.step():
        pass
    second = scheduler.submit([200, 201], max_new_tokens=1, logprobs=MAX_TOP_LOGPROBS)  # row 1: row 0's prefix spared
    while scheduler.step():
        pass
    third = scheduler.submit([200, 201, 5], max_new_tokens=3, logprobs=MAX_TOP_LOGPROBS)
    while scheduler.step():
        pass
    for handle, (prompt, new) in ((first, ([10, 11, 12, 13, 14, 15], 1)), (second, ([200, 201], 1)),
                                  (third, ([200, 201, 5], 3))):
        assert handle.result().token_ids == engine.generate([prompt], max_new_tokens=new)[0].token_ids
        assert_served_log_probs_match(engine.model, prompt, handle.result(), (overlap, prompt))
    assert scheduler.running == 0 and scheduler.stats.requests_finished == 3


@pytest.mark.parametrize("overlap", [True, False])
def test_a_prefills_first_token_is_read_with_the_next_steps_tokens(overlap):
    """With overlap_host, the first token a prefill samples is not read at once (a host sync that would wait for the
    step queued ahead of it) but with the next decode step's; without, each iteration reads all it queued. Either way
    the tokens are the engine's and the served log-probabilities (each token's and the 20 most likely) those of one
    full forward, to fp32."""
    model = tiny_model("mla", seed=5)
    engine = GenerationEngine(model)
    scheduler = Scheduler(engine, max_batch=2, overlap_host=overlap)
    handle = scheduler.submit(PROMPTS[0], max_new_tokens=4, logprobs=MAX_TOP_LOGPROBS)
    scheduler.step()  # prefill (first token) and the first decode step
    assert handle.pending_events() == (0 if overlap else 2)
    scheduler.step()
    assert handle.pending_events() == (2 if overlap else 3)
    while scheduler.step():
        pass
    assert handle.result().token_ids == engine.generate([PROMPTS[0]], max_new_tokens=4)[0].token_ids
    assert_served_log_probs_match(model, PROMPTS[0], handle.result(), overlap)


def test_a_finished_rows_old_contents_never_reach_its_next_request():
    """Row reuse must start from an empty row: a long sequence finishes, a short prompt takes its row."""
    model = tiny_model("mla", seed=5)
    engine = GenerationEngine(model, decode_path="absorbed")
    long_prompt, short_prompt = PROMPTS[2], PROMPTS[3]
    expected = engine.generate([short_prompt], max_new_tokens=8)[0].token_ids
    scheduler = Scheduler(engine, max_batch=1)
    first = scheduler.submit(long_prompt, max_new_tokens=10)
    second = scheduler.submit(short_prompt, max_new_tokens=8)
    while scheduler.step():
        pass
    assert first.result().finish_reason == "length"
    assert second.result().token_ids == expected


def test_a_seeded_request_samples_the_same_whatever_else_runs():
    model = tiny_model("eg-mla", seed=6)
    engine = GenerationEngine(model, decode_path="gate-table")
    sampling = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=11)
    expected = alone(engine, 2, sampling=sampling).token_ids
    scheduler = Scheduler(engine, max_batch=4, seed=0)
    others = [scheduler.submit(PROMPTS[i], max_new_tokens=NEW[i], sampling=SamplingParams(temperature=0.7, seed=None))
              for i in (0, 1)]
    mine = scheduler.submit(PROMPTS[2], max_new_tokens=NEW[2], sampling=sampling)
    greedy = scheduler.submit(PROMPTS[3], max_new_tokens=NEW[3])
    while scheduler.step():
        pass
    assert mine.result().token_ids == expected
    assert greedy.result().token_ids == alone(engine, 3).token_ids
    assert all(len(h.result().token_ids) == NEW[i] for i, h in zip((0, 1), others))


def test_streamed_text_and_stop_strings_match_the_engine(tokenizer):
    model = tiny_model("eg-mla", seed=7)
    engine = GenerationEngine(model, tokenizer, decode_path="naive")
    prompts = ["To be, or not", "the slings and arrows", "Café"]
    free = engine.generate(prompts, max_new_tokens=12)
    stop = free[1].text[3:6]  # request 1 ends on a stop string
    expected = engine.generate(prompts, max_new_tokens=12, stop_strings=[stop])
    scheduler = Scheduler(engine, max_batch=2)
    handles = [scheduler.submit(p, max_new_tokens=12, stop_strings=[stop]) for p in prompts]
    streamed = {h.id: "" for h in handles}
    while scheduler.step():
        pass
    for handle, want in zip(handles, expected):
        streamed = "".join(event.text for event in handle.events())
        result = handle.result()
        assert (result.token_ids, result.text, result.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        assert streamed == want.text
    assert expected[1].finish_reason == "stop"


def test_requests_not_streamed_get_the_streamed_ones_results_and_make_no_events(tokenizer):
    """stream=False: the same tokens, text, stop, log-probabilities and finish as streamed requests in the same batch,
    no event queued for it (events() refuses, naming the fix); cancelling one still ends it with 'cancelled'."""
    model = tiny_model("eg-mla", seed=7)
    engine = GenerationEngine(model, tokenizer, decode_path="naive")
    prompts = ["To be, or not", "the slings and arrows", "Café"]
    stop = engine.generate(prompts, max_new_tokens=12)[1].text[3:6]
    scheduler = Scheduler(engine, max_batch=4)
    kwargs = dict(max_new_tokens=12, stop_strings=[stop], logprobs=2)
    streamed = [scheduler.submit(p, **kwargs) for p in prompts]
    quiet = [scheduler.submit(p, stream=False, **kwargs) for p in prompts]
    while scheduler.step():
        pass
    fields = ("token_ids", "text", "finish_reason")
    for loud, silent in zip(streamed, quiet):
        assert [getattr(silent.result(), f) for f in fields] == [getattr(loud.result(), f) for f in fields]
        # another row of the batch: the same log-probabilities to float rounding
        assert silent.result().logprobs == pytest.approx(loud.result().logprobs, abs=1e-5)
        assert [list(top) for top in silent.result().top_logprobs] == [list(top) for top in loud.result().top_logprobs]
        assert "".join(e.text for e in loud.events()) == loud.result().text
        assert silent.pending_events() == 0
        with pytest.raises(ValueError, match="stream=False.*result\\(\\)"):
            next(silent.events())
    assert quiet[1].result().finish_reason == "stop"
    cancelled = scheduler.submit(prompts[0], max_new_tokens=12, stream=False)
    scheduler.step()
    cancelled.cancel()
    while scheduler.step():
        pass
    assert cancelled.result().finish_reason == "cancelled" and cancelled.pending_events() == 0


def test_requests_not_streamed_without_stop_strings_decode_their_text_once(tokenizer):
    """An unstreamed request without stop strings makes no text per token (no detokenizer on its row): its text,
    decoded once at the end, equals a streamed request's joined pieces, for finished and cancelled requests."""
    model = tiny_model("eg-mla", seed=7)
    engine = GenerationEngine(model, tokenizer, decode_path="naive")
    prompts = ["To be, or not", "Café naïve", "the slings and arrows"]
    scheduler = Scheduler(engine, max_batch=6)
    streamed = [scheduler.submit(p, max_new_tokens=10) for p in prompts]
    quiet = [scheduler.submit(p, max_new_tokens=10, stream=False) for p in prompts]
    rows = [r for r in scheduler._waiting]
    assert [r.sequence.detokenizer is None for r in rows] == [False] * 3 + [True] * 3
    while scheduler.step():
        pass
    for loud, silent in zip(streamed, quiet):
        assert silent.result().token_ids == loud.result().token_ids
        assert silent.result().text == loud.result().text == "".join(e.text for e in loud.events())
        assert silent.result().text == tokenizer.decode(silent.result().token_ids)
    cancelled = scheduler.submit(prompts[0], max_new_tokens=10, stream=False)
    scheduler.step()
    scheduler.step()
    cancelled.cancel()
    while scheduler.step():
        pass
    result = cancelled.result()
    assert result.finish_reason == "cancelled" and result.text == tokenizer.decode(result.token_ids)


def test_cancelled_requests_free_their_rows_and_leave_the_others_alone():
    model = tiny_model("mla", seed=8)
    engine = GenerationEngine(model, decode_path="naive")
    expected = [alone(engine, i) for i in range(3)]
    scheduler = Scheduler(engine, max_batch=2)
    handles = [scheduler.submit(PROMPTS[i], max_new_tokens=NEW[i]) for i in range(3)]
    scheduler.step()
    handles[0].cancel()  # running: its row goes to request 2
    waiting = scheduler.submit(PROMPTS[4], max_new_tokens=NEW[4])
    waiting.cancel()  # never admitted
    while scheduler.step():
        pass
    assert handles[0].result().finish_reason == "cancelled" and len(handles[0].result().token_ids) < NEW[0]
    assert waiting.result().finish_reason == "cancelled" and waiting.result().token_ids == []
    assert [events[-1].finish_reason for events in [list(waiting.events())]] == ["cancelled"]
    assert [h.result().token_ids for h in handles[1:]] == [r.token_ids for r in expected[1:]]


def test_bad_requests_are_refused_with_the_field_named():
    model = tiny_model("eg-mla")
    engine = GenerationEngine(model)
    scheduler = Scheduler(engine, max_batch=2, max_len=16, max_waiting=1)
    with pytest.raises(ValueError, match="max_len=16"):
        scheduler.submit(list(range(1, 18)))
    with pytest.raises(ValueError, match="59 tokens, more than the max_len=16 positions per row"):
        scheduler.submit(list(range(1, 60)))  # over max_seq_len=48 too: told the limit that binds
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        scheduler.submit([1, 2], max_new_tokens=0)
    with pytest.raises(ValueError, match="vocab_size"):
        scheduler.submit([1, 2, 100000])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        scheduler.submit([1, 2], stop_strings=["x"])
    scheduler.submit_all([dict(prompt=[1, 2]), dict(prompt=[1, 3]), dict(prompt=[1, 4])])  # 2 free rows + 1
    with pytest.raises(OverflowError, match="max_waiting=1"):
        scheduler.submit([3, 4])
    with pytest.raises(ValueError, match="max_new_tokens=0"):  # all checked before any is queued
        scheduler.submit_all([dict(prompt=[5, 6]), dict(prompt=[5, 7], max_new_tokens=0)])
    assert scheduler.waiting == 3
    with pytest.raises(ValueError, match="max_len=100"):
        Scheduler(engine, max_len=100)
    with pytest.raises(ValueError, match="max_batch=0"):
        Scheduler(engine, max_batch=0)
    with pytest.raises(ValueError, match="admit_batch=3"):
        Scheduler(engine, max_batch=2, admit_batch=3)
    with pytest.raises(ValueError, match="admit_wait=-1"):
        Scheduler(engine, admit_wait=-1)


def _admission_trace(scheduler, prompts, new_tokens):
    """Submit every request at once, step to the end; per step (free rows, waiting) after it, and the handles."""
    handles = [scheduler.submit(p, max_new_tokens=n) for p, n in zip(prompts, new_tokens)]
    trace = []
    while scheduler.step():
        trace.append((scheduler.max_batch - scheduler.running, scheduler.waiting))
        assert len(trace) < 300
    return handles, trace


@pytest.mark.parametrize("variant,path", [("mla", "absorbed"), ("eg-mla", "grouped")])
def test_rows_freed_one_by_one_are_refilled_together_and_no_token_changes(variant, path):
    """admit_batch: while requests run, waiting ones are admitted once that many rows are free (one prefill forward
    for them all), or once admit_wait steps have passed; each request's tokens stay what it gets alone."""
    model = tiny_model(variant, seed=8)
    engine = GenerationEngine(model, decode_path=path)
    prompts = [PROMPTS[i % len(PROMPTS)][: 3 + i % 5] + [i + 1] for i in range(10)]
    new_tokens = [2 + 2 * i for i in range(4)] + [3 + i % 3 for i in range(6)]  # the first four end one by one
    expected = [engine.generate([p], max_new_tokens=n)[0].token_ids for p, n in zip(prompts, new_tokens)]
    calls = {}
    for admit_batch, admit_wait in ((1, 16), (4, 100), (4, 2), (4, 0)):
        scheduler = Scheduler(engine, max_batch=4, admit_batch=admit_batch, admit_wait=admit_wait)
        handles, trace = _admission_trace(scheduler, prompts, new_tokens)
        assert [h.result().token_ids for h in handles] == expected, (admit_batch, admit_wait)
        calls[admit_batch, admit_wait] = scheduler.stats.prefill_calls
        held = longest = 0  # steps in a row that ended with a free row while a request waited
        for free, waiting in trace:
            held = held + 1 if free and waiting else 0
            longest = max(longest, held)
        if admit_batch == 1 or admit_wait == 0:
            assert longest == 0, (admit_batch, admit_wait, trace)  # a freed row is refilled at the next iteration
        else:
            assert 0 < longest <= admit_wait + 1, (admit_batch, admit_wait, trace)
    # one by one, each freed row took a prefill forward of its own; four at a time, far fewer
    assert calls[4, 100] < calls[1, 16] and calls[4, 0] == calls[1, 16], calls


def test_a_request_at_the_rows_end_stops_by_length():
    model = tiny_model("mla", seed=9)
    engine = GenerationEngine(model, decode_path="naive")
    scheduler = Scheduler(engine, max_batch=2, max_len=12)
    handle = scheduler.submit(PROMPTS[0], max_new_tokens=40)  # 7 prompt tokens: room for 6 new (the last not fed)
    while scheduler.step():
        pass
    result = handle.result()
    assert result.finish_reason == "length" and len(result.token_ids) == 12 - 7 + 1
    assert result.token_ids == engine.generate([PROMPTS[0]], max_new_tokens=6)[0].token_ids


def _row_buffers(cache, row: int) -> list[torch.Tensor]:
    """Copies of row `row` of every buffer the cache holds (`KVCache._map` walks them all): per position, the
    positions before the last; per sequence, its value."""
    found = []
    cache._map(lambda t, per_position: found.append(t[row, : cache.max_len - 1].clone() if per_position
                                                    else t[row].clone()) or t)
    return found


@pytest.mark.parametrize("variant,path", [(variant, path) for variant in ("mha", "mla", "eg-mla")
                                          for path in decode_paths(tiny_model(variant).config) if path != "kernel"])
def test_a_full_row_appending_nothing_changes_no_position_but_its_last(variant, path):
    """A decode step has a fixed shape (a CUDA graph's): every row of its bucket runs, a full row that appends nothing
    (n_new = 0: ended by length, or free) too, and its write is clamped into the cache at position max_len - 1
    (`KVCache.positions_for(static=True)`, the decode-context kernel), over the last token there. Kept so, not
    masked: a full row's last position is never read again (the next test). Pinned here: the row's length, token
    groups and every position before the last stay as they were."""
    max_len = 12
    engine = GenerationEngine(tiny_model(variant, seed=6), decode_path=path)
    with engine.generating():
        cache = engine.prepare_cache(2, max_len)
        prompts = torch.tensor([[(13 * i) % 290 + 5 for i in range(max_len)], [40, 41, 42] + [0] * (max_len - 3)])
        engine.model(prompts, cache, n_new=torch.tensor([max_len, 3]))  # row 0 full, row 1 three tokens
        before = _row_buffers(cache, 0)
        step = engine.decode_step(cache, 2, max_len)
        step.tokens.copy_(torch.tensor([[7], [9]]))
        step.n_new.copy_(torch.tensor([0, 1]))
        step.run()
    assert cache.lengths.tolist() == [max_len, 4]
    for kept, now in zip(before, _row_buffers(cache, 0), strict=True):
        assert torch.equal(kept, now)
    if cache.token_ids is not None:  # the clamped write the next test shows harmless (update both if it goes)
        assert cache.token_ids[0, max_len - 1] == 7


def test_a_prefix_reused_from_a_full_row_stops_before_the_position_its_steps_overwrote():
    """A prompt that fills its row ends by length on its first token; the decode steps of the rows beside it then
    overwrite the row's last position (the test above). Harmless because a prompt reusing the row's cached prefix
    reuses at most len(prompt) - 1 <= max_len - 1 positions (its last token is fed again, for its logits): the same
    prompt again reuses max_len - 1 and gets the tokens it gets alone. This fails if a reused prefix ever reaches
    the last position, or if a full row appends."""
    max_len = 16
    engine = GenerationEngine(tiny_model("eg-mla", seed=6), decode_path="grouped", batch_buckets=(2,))  # rows stay
    full = [(23 * i) % 290 + 5 for i in range(max_len)]
    again = full[:-1] + [77]  # shares all but the last token: reuses as much as the same prompt would
    expected = [engine.generate([p], max_new_tokens=1)[0].token_ids for p in (full, again)]
    scheduler = Scheduler(engine, max_batch=2, max_len=max_len, prefix_cache_min=4)
    first = scheduler.submit(full, max_new_tokens=3)  # row 0
    beside = scheduler.submit([200, 201, 202], max_new_tokens=8)  # row 1, decoding while row 0 is full
    while not first.done:
        scheduler.step()
    scheduler.step()
    cache = scheduler._cache
    assert scheduler._prefixes[0] == tuple(full) and cache.lengths[0] == max_len
    assert cache.token_ids[0, max_len - 1] != full[-1]  # overwritten by the steps beside it (else this tests nothing)
    handles = [scheduler.submit(p, max_new_tokens=3) for p in (full, again)]
    while scheduler.step():
        assert int(scheduler._cache.lengths.max()) <= max_len
    assert scheduler.stats.prefix_hits == 2 and scheduler.stats.prefix_tokens_reused == 2 * (max_len - 1)
    assert [h.result().token_ids for h in [first, *handles]] == [expected[0], *expected]  # one token: the row's end
    assert beside.done


def test_a_failing_step_fails_its_requests_and_the_next_ones_run(monkeypatch):
    model = tiny_model("eg-mla", seed=10)
    engine = GenerationEngine(model, decode_path="gate-table")
    expected = alone(engine, 1).token_ids
    scheduler = Scheduler(engine, max_batch=2)
    scheduler.start()
    try:
        real = scheduler._prefill
        calls = []

        def broken():
            calls.append(1)
            if len(calls) == 1:
                raise torch.cuda.OutOfMemoryError("out of memory (simulated)")
            return real()

        monkeypatch.setattr(scheduler, "_prefill", broken)
        failed = scheduler.submit(PROMPTS[0], max_new_tokens=4)
        with pytest.raises(RuntimeError, match="simulated"):
            failed.result(timeout=60)
        assert scheduler.submit(PROMPTS[1], max_new_tokens=NEW[1]).result(timeout=60).token_ids == expected
    finally:
        scheduler.stop(timeout=60)


def test_background_thread_serves_requests_from_many_threads():
    model = tiny_model("eg-mla", seed=12)
    engine = GenerationEngine(model, decode_path="gate-table")
    expected = [alone(engine, i).token_ids for i in range(len(PROMPTS))]
    scheduler = Scheduler(engine, max_batch=3)
    scheduler.start()
    got = {}

    def client(i):
        handle = scheduler.submit(PROMPTS[i], max_new_tokens=NEW[i])
        got[i] = [event.token_id for event in handle.events(timeout=60)]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    scheduler.stop(timeout=60)
    assert [got[i] for i in range(len(PROMPTS))] == expected
    with pytest.raises(RuntimeError, match="stopping"):
        scheduler.submit(PROMPTS[0])


def test_a_long_prompt_is_fed_in_chunks_while_the_running_request_keeps_generating():
    model = tiny_model("eg-mla", seed=13)
    engine = GenerationEngine(model, decode_path="gate-table")
    long_prompt = [(7 * i) % 290 + 5 for i in range(30)]
    expected = [engine.generate([p], max_new_tokens=n)[0].token_ids for p, n in ((PROMPTS[1], 12), (long_prompt, 5))]
    scheduler = Scheduler(engine, max_batch=2, prefill_chunk=4)
    running = scheduler.submit(PROMPTS[1], max_new_tokens=12)
    scheduler.step()
    scheduler.step()
    arriving = scheduler.submit(long_prompt, max_new_tokens=5)
    tokens_while_feeding = 0
    while arriving.times.first_token is None:
        before = running.pending_events()
        scheduler.step()
        tokens_while_feeding += running.pending_events() - before
    assert tokens_while_feeding >= 5  # 30 prompt tokens at 4 per iteration: 8 iterations, one token each
    while scheduler.step():
        pass
    assert [running.result().token_ids, arriving.result().token_ids] == expected
    with pytest.raises(ValueError, match="prefill_chunk=0"):
        Scheduler(engine, prefill_chunk=0)


def test_prompts_arriving_around_a_row_near_the_caches_end():
    """New prompts fill rows 0 and 2 while row 1 decodes near the end of its row: each is fed on its own (a forward
    spanning row 1 would count its length plus the chunk against the cache's end)."""
    model = tiny_model("mla", seed=14)
    engine = GenerationEngine(model, decode_path="absorbed", batch_buckets=(4,))  # one bucket: rows never move
    long_running = [(11 * i) % 290 + 3 for i in range(10)]
    late = [[40, 41, 42, 43, 44, 45], [90, 91, 92, 93, 94, 95]]
    scheduler = Scheduler(engine, max_batch=3, max_len=16)
    first = [scheduler.submit(PROMPTS[3], max_new_tokens=2), scheduler.submit(long_running, max_new_tokens=30),
             scheduler.submit(PROMPTS[1], max_new_tokens=2)]
    for _ in range(4):
        scheduler.step()
    assert first[0].done and first[2].done and not first[1].done
    handles = [scheduler.submit(prompt, max_new_tokens=4) for prompt in late]
    while scheduler.step():
        pass
    assert first[1].result().finish_reason == "length"
    assert [h.result().token_ids for h in handles] == [engine.generate([p], max_new_tokens=4)[0].token_ids
                                                        for p in late]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant,path", [(v, p) for v in ("mha", "mla", "eg-mla", "eg-mla-bias-v")
                                          for p in decode_paths(tiny_model(v).config)])
def test_on_cuda_with_graphs_the_requests_get_the_eager_engines_tokens(variant, path):
    """On a GPU: CUDA-graph steps per bucket, the step queued before the tokens are read, rows reused and compacted,
    chunked prefill; every request equals the eager engine's tokens for its prompt alone."""
    model = tiny_model(variant, seed=15).cuda()
    eager = GenerationEngine(model, decode_path=path, cuda_graphs=False)
    eos = alone(eager, 0).token_ids[2]
    expected = [alone(eager, i, eos) for i in range(len(PROMPTS))]
    for chunk in (None, 3):
        engine = GenerationEngine(model, decode_path=path)
        assert engine.cuda_graphs
        scheduler = Scheduler(engine, max_batch=3, prefill_chunk=chunk)
        handles = staggered(scheduler, [0, 0, 1, 1, 3, 6], eos)
        assert [h.result().token_ids for h in handles] == [r.token_ids for r in expected], chunk
        assert [h.result().finish_reason for h in handles] == [r.finish_reason for r in expected], chunk
        assert scheduler._step.use_graph
        assert scheduler.stats.prefill_graph_calls > 0 and all(s.graph for s in engine._prefill_steps.values())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("path", ["kernel", "grouped"])
def test_on_cuda_a_busy_bf16_server_gives_each_request_its_tokens(path):
    """bf16 at paper-base widths, 40 requests through 16 rows from a background thread: each equals its prompt
    generated alone by the same engine settings."""
    shape = dict(d_model=768, n_heads=12, max_seq_len=256, vocab_size=4096, kv_lora_rank=64, qk_nope_head_dim=64,
                 qk_rope_head_dim=64, v_head_dim=64)
    model = tiny_model("eg-mla", **shape).cuda().to(torch.bfloat16)
    prompts = [[(7 * i + 3 * j) % 4096 for j in range(10 + (5 * i) % 40)] for i in range(40)]
    new = [4 + (3 * i) % 20 for i in range(40)]
    engine = GenerationEngine(model, decode_path=path)
    expected = [engine.generate([p], max_new_tokens=n)[0].token_ids for p, n in zip(prompts, new)]
    scheduler = Scheduler(engine, max_batch=16)
    scheduler.start()
    try:
        handles = [scheduler.submit(p, max_new_tokens=n) for p, n in zip(prompts, new)]
        got = [h.result(timeout=300).token_ids for h in handles]
    finally:
        scheduler.stop(timeout=60)
    same = sum(a == b for a, b in zip(got, expected))
    assert same >= len(prompts) - 1, same  # bf16: a near tie may flip at another batch size, not more than once


def test_logprobs_are_the_models_own_for_each_generated_token():
    """logprobs=k: each token's log-probability and the step's k most likely tokens, from the model's logits before
    temperature and filters, checked against a full forward of prompt + tokens so far; rows without logprobs and rows
    with another k share the batch."""
    model = tiny_model("eg-mla", seed=16)
    engine = GenerationEngine(model, decode_path="gate-table")
    scheduler = Scheduler(engine, max_batch=3)
    greedy = scheduler.submit(PROMPTS[0], max_new_tokens=6, logprobs=3)
    plain = scheduler.submit(PROMPTS[1], max_new_tokens=6)
    sampled = scheduler.submit(PROMPTS[2], max_new_tokens=6, logprobs=0,
                               sampling=SamplingParams(temperature=1.5, top_k=5, seed=3))
    while scheduler.step():
        pass
    assert plain.result().logprobs is None and all(e.logprob is None for e in plain.events())
    for handle, k in ((greedy, 3), (sampled, 0)):
        result = handle.result()
        events = list(handle.events())
        assert [e.logprob for e in events] == result.logprobs and len(result.logprobs) == 6
        with torch.no_grad():
            full = model(torch.tensor([handle.prompt_ids + result.token_ids]))[0].float().log_softmax(-1)
        start = len(handle.prompt_ids) - 1
        for step, (token, logprob, top) in enumerate(zip(result.token_ids, result.logprobs, result.top_logprobs)):
            row = full[start + step]
            assert abs(logprob - float(row[token])) < 1e-4
            assert len(top) == k
            want = row.topk(k) if k else None
            if k:
                assert list(top) == want.indices.tolist()
                assert max(abs(a - b) for a, b in zip(top.values(), want.values.tolist())) < 1e-4
    assert all(lp == max(top.values()) for lp, top in zip(greedy.result().logprobs, greedy.result().top_logprobs))
    with pytest.raises(ValueError, match="logprobs=21"):
        scheduler.submit(PROMPTS[0], logprobs=21)


def test_prompt_logprobs_equal_a_full_forward_across_chunks():
    """prompt_logprobs: every prompt token's log-probability after the first, fed whole or in chunks (here over
    several iterations and forwards of their own), equal to one forward of the prompt."""
    model = tiny_model("mla", seed=17)
    engine = GenerationEngine(model, decode_path="absorbed")
    prompt = [(13 * i) % 290 + 4 for i in range(25)]
    with torch.no_grad():
        full = model(torch.tensor([prompt]))[0].float().log_softmax(-1)
    want = [None] + [float(full[t - 1, prompt[t]]) for t in range(1, len(prompt))]
    for chunk in (None, 7):
        scheduler = Scheduler(engine, max_batch=2, prefill_chunk=chunk, prefix_cache_min=4)
        scheduler.submit(prompt[:20], max_new_tokens=1)  # its cached prefix must not be reused: no logits for it
        while scheduler.step():
            pass
        echo = scheduler.submit(prompt, max_new_tokens=3, logprobs=2, prompt_logprobs=True)
        other = scheduler.submit(PROMPTS[0], max_new_tokens=3)
        while scheduler.step():
            pass
        result = echo.result()
        assert result.prompt_logprobs[0] is None and result.prompt_top_logprobs[0] is None
        assert len(result.prompt_logprobs) == len(prompt)
        assert max(abs(a - b) for a, b in zip(result.prompt_logprobs[1:], want[1:])) < 1e-4, chunk
        assert all(list(top) == full[t - 1].topk(2).indices.tolist()
                   for t, top in enumerate(result.prompt_top_logprobs) if t)
        assert result.token_ids == engine.generate([prompt], max_new_tokens=3)[0].token_ids
        assert other.result().prompt_logprobs is None
    with pytest.raises(ValueError, match="prompt_logprobs=True needs logprobs"):
        scheduler.submit(prompt, prompt_logprobs=True)
    scored = scheduler.submit(prompt, max_new_tokens=0, logprobs=0, prompt_logprobs=True)  # scoring only
    while scheduler.step():
        pass
    assert scored.result().token_ids == [] and scored.result().finish_reason == "length"
    assert max(abs(a - b) for a, b in zip(scored.result().prompt_logprobs[1:], want[1:])) < 1e-4
    with pytest.raises(ValueError, match="0 only with prompt_logprobs"):
        scheduler.submit(prompt, max_new_tokens=0)


@pytest.mark.parametrize("chunk", [None, 4])
def test_samples_of_one_prompt_share_its_prefill(chunk):
    """Requests with the same prompt (a server's `n`) prefill it once: the others' rows are copies of the first's,
    each then samples on its own; every one equals its prompt and seed alone."""
    model = tiny_model("eg-mla", seed=18)
    engine = GenerationEngine(model, decode_path="grouped")
    samples = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2, 3)]
    expected = [engine.generate([PROMPTS[2]], max_new_tokens=5, sampling=p)[0].token_ids for p in samples]
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=chunk)
    other = scheduler.submit(PROMPTS[0], max_new_tokens=5)
    handles = [scheduler.submit(PROMPTS[2], max_new_tokens=5, sampling=p) for p in samples]
    while scheduler.step():
        pass
    assert [h.result().token_ids for h in handles] == expected and len({tuple(e) for e in expected}) > 1
    assert other.result().token_ids == alone(engine, 0, sampling=SamplingParams()).token_ids[:5]
    assert scheduler.stats.prefills_shared == 2


def test_a_partly_fed_prompt_near_its_rows_end_is_never_padded_past_it():
    """A 16-token prompt in a 16-position row, 14 fed, must not share a forward of width 5 with its neighbour: the
    forward's length check would count 14 + 5 > 16 and fail every request (found by a randomized review)."""
    model = tiny_model("mla", seed=1)
    engine = GenerationEngine(model, decode_path="naive")
    prompts = [[3 + i for i in range(10)], [50 + i for i in range(16)], [100 + i for i in range(5)]]
    scheduler = Scheduler(engine, max_batch=3, max_len=16, prefill_chunk=12)
    handles = [scheduler.submit(p, max_new_tokens=3) for p in prompts]
    while scheduler.step():
        pass
    assert [h.result().token_ids for h in handles] == [
        engine.generate([p], max_new_tokens=n)[0].token_ids for p, n in zip(prompts, (3, 1, 3))]


def test_capturing_every_buckets_graph_up_front_changes_no_token():
    """capture_graphs() on a CPU captures nothing (steps run eagerly) and leaves the scheduler as it was; on a GPU the
    same call captures every bucket up to max_batch (the GPU test below checks the tokens after it)."""
    model = tiny_model("mla", seed=19)
    engine = GenerationEngine(model, decode_path="absorbed", batch_buckets=(1, 2, 4))
    scheduler = Scheduler(engine, max_batch=3)
    assert scheduler.capture_graphs() == 0
    handles = [scheduler.submit(PROMPTS[i], max_new_tokens=NEW[i]) for i in range(3)]
    while scheduler.step():
        pass
    assert [h.result().token_ids for h in handles] == [alone(engine, i).token_ids for i in range(3)]


@pytest.mark.gpu
@needs_gpu
def test_on_cuda_graphs_captured_up_front_serve_every_bucket():
    model = tiny_model("eg-mla", seed=20).cuda()
    eager = GenerationEngine(model, decode_path="kernel", cuda_graphs=False)
    expected = [alone(eager, i).token_ids for i in range(len(PROMPTS))]
    engine = GenerationEngine(model, decode_path="kernel")
    scheduler = Scheduler(engine, max_batch=4)
    assert scheduler.capture_graphs() == len([b for b in engine.batch_buckets if b <= 4])
    handles = staggered(scheduler, [0, 0, 1, 1, 3, 6])
    assert [h.result().token_ids for h in handles] == expected


SHARED = [(17 * i) % 280 + 9 for i in range(20)]  # a 20-token prefix several prompts start with


@pytest.mark.parametrize("variant,path", [("mha", "naive"), ("mla", "absorbed"), ("eg-mla", "gate-table"),
                                          ("eg-mla", "grouped"), ("eg-mla-bias-v", "absorbed")])
def test_a_cached_prompt_prefix_is_reused_and_changes_no_token(variant, path):
    """Prefix caching: prompts that start like a running request's prompt, or a finished one's whose row is still
    there, start from a copy of that row cut to the shared prefix; each gets the tokens it gets alone."""
    model = tiny_model(variant, seed=21)
    engine = GenerationEngine(model, decode_path=path, batch_buckets=(1, 2, 4))
    prompts = [SHARED + [3, 4, 5], SHARED + [7], SHARED[:12] + [250, 251], SHARED + [3, 4, 5, 6], [1, 2] + SHARED]
    expected = [engine.generate([p], max_new_tokens=6)[0].token_ids for p in prompts]
    scheduler = Scheduler(engine, max_batch=2, prefix_cache_min=8)
    handles = staggered_prompts(scheduler, prompts, [0, 1, 2, 9, 10], new=6)
    assert [h.result().token_ids for h in handles] == expected
    stats = scheduler.stats
    assert stats.prefix_hits >= 3 and stats.prefix_tokens_reused >= 8 * stats.prefix_hits
    assert handles[4].result().token_ids == expected[4]  # no shared start: prefilled whole


def test_the_prefix_index_picks_the_rows_a_scan_of_every_row_picks():
    """_admit indexes the cached prefixes by their first prefix_cache_min tokens; the rows it picks (and the prefix
    lengths it reuses) are those of comparing every prompt with every row, longest shared prefix first, a free row
    winning a tie, the free rows handed out shortest cached prefix first."""
    import random

    def common(a, b, limit):
        n = 0
        while n < min(len(a), len(b), limit) and a[n] == b[n]:
            n += 1
        return n

    model = tiny_model("mla", seed=1)
    rng = random.Random(0)
    for trial in range(20):
        scheduler = Scheduler(GenerationEngine(model), max_batch=8, prefix_cache_min=3)
        with torch.inference_mode():
            scheduler.step()  # the cache
            stems = [[rng.randrange(1, 40) for _ in range(6)] for _ in range(3)]
            for row in range(8):
                prefix = rng.choice(stems)[: rng.randrange(0, 7)] + [rng.randrange(1, 40) for _ in range(rng.randrange(3))]
                scheduler._prefixes[row] = tuple(prefix)
            busy = rng.sample(range(8), 3)
            for row in busy:
                scheduler._rows[row] = object()  # running (never stepped)
            prompts = [rng.choice(stems)[: rng.randrange(1, 7)] + [rng.randrange(1, 40)] for _ in range(5)]
            prefixes, free = list(scheduler._prefixes), [r for r in range(8) if r not in busy]
            expected = []
            for prompt in prompts:  # the rule, by a scan of every row
                best, source = 0, None
                for row, prefix in enumerate(prefixes):
                    shared = common(prompt, prefix, len(prompt) - 1)
                    if shared > best or (shared == best and shared and row in free and source not in free):
                        best, source = shared, row
                hand_out = min(free, key=lambda r: (len(prefixes[r]), r))
                if best >= 3:
                    row = source if source in free else hand_out
                    prefixes[row] = tuple(prompt[:best])
                else:
                    row, best = hand_out, 0
                    prefixes[row] = ()
                free.remove(row)
                expected.append((row, best))
            requests = [scheduler._request(p, 1) for p in prompts]
            scheduler._waiting.extend(requests)
            scheduler._admit()
        assert [(scheduler._rows.index(r), r.fed) for r in requests] == expected, trial


def test_without_prefix_caching_nothing_is_reused():
    model = tiny_model("mla", seed=21)
    engine = GenerationEngine(model, decode_path="absorbed")
    scheduler = Scheduler(engine, max_batch=2, prefix_cache_min=0)
    handles = staggered_prompts(scheduler, [SHARED + [3], SHARED + [4]], [0, 3], new=4)
    assert all(h.done for h in handles) and scheduler.stats.prefix_hits == 0
    with pytest.raises(ValueError, match="prefix_cache_min=-1"):
        Scheduler(engine, prefix_cache_min=-1)


def staggered_prompts(scheduler, prompts, arrivals, new):
    handles, steps = {}, 0
    while len(handles) < len(prompts) or any(not h.done for h in handles.values()):
        for i, at in enumerate(arrivals):
            if at <= steps and i not in handles:
                handles[i] = scheduler.submit(prompts[i], max_new_tokens=new)
        scheduler.step()
        steps += 1
        assert steps < 200
    return [handles[i] for i in range(len(prompts))]


def test_a_compaction_moves_the_cached_prefixes_with_the_rows():
    """A finished row overwritten by a compaction no longer offers its prefix: a later prompt that starts like it
    must not get a copy of the row that moved there."""
    model = tiny_model("mla", seed=22)
    engine = GenerationEngine(model, decode_path="absorbed", batch_buckets=(1, 2))
    unrelated = [(29 * i) % 270 + 20 for i in range(14)]
    late = SHARED + [9]
    expected = engine.generate([late], max_new_tokens=4)[0].token_ids
    scheduler = Scheduler(engine, max_batch=2, prefix_cache_min=8)
    first = scheduler.submit(SHARED + [3], max_new_tokens=2)
    second = scheduler.submit(unrelated, max_new_tokens=12)
    while not first.done:
        scheduler.step()
    scheduler.step()
    scheduler.step()
    assert scheduler.stats.compactions >= 1 and not second.done
    handle = scheduler.submit(late, max_new_tokens=4)
    while scheduler.step():
        pass
    assert handle.result().token_ids == expected


def test_a_compaction_keeps_the_cached_prefixes_of_the_rows_it_passes():
    """A request given a free row behind a cached prefix (the hand-out spares long prefixes) is moved to the front by
    the compaction that follows: the cached row must move behind it, not be overwritten, and stay usable."""
    model = tiny_model("mha", seed=3)
    engine = GenerationEngine(model, batch_buckets=(1, 2, 4))
    stem = list(range(10, 40))
    scheduler = Scheduler(engine, max_batch=4, prefix_cache_min=8)
    for prompt in (stem + [1, 2], [200, 201, 202]):
        scheduler.submit(prompt, max_new_tokens=2)
        while scheduler.step():
            pass
    assert scheduler.stats.compactions >= 1 and scheduler.stats.prefix_hits == 0
    late = scheduler.submit(stem + [3, 4], max_new_tokens=4)
    while scheduler.step():
        pass
    assert scheduler.stats.prefix_hits == 1
    assert late.result().token_ids == engine.generate([stem + [3, 4]], max_new_tokens=4)[0].token_ids


def test_a_failure_while_admitting_reaches_every_request_taken_off_the_queue(monkeypatch):
    model = tiny_model("mla", seed=23)
    engine = GenerationEngine(model, decode_path="absorbed")
    scheduler = Scheduler(engine, max_batch=3)
    scheduler.step()  # the cache exists: the failure below is in placing rows

    def broken(*args):
        raise torch.cuda.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(scheduler._cache, "reset_rows", broken)  # one row emptied at a time
    monkeypatch.setattr(scheduler._cache, "reset_rows_at", broken)  # several at once
    handles = [scheduler.submit(PROMPTS[i], max_new_tokens=3) for i in range(3)]
    scheduler.start()
    try:
        for handle in handles:
            with pytest.raises(RuntimeError, match="simulated"):
                handle.result(timeout=60)
    finally:
        scheduler.stop(timeout=60)
    with pytest.raises(ValueError, match="at most max_batch \\+ max_waiting = 5"):
        Scheduler(engine, max_batch=3, max_waiting=2).submit_all([dict(prompt=[1, 2])] * 6)


def test_random_schedules_of_shared_prefixes_keep_the_index_and_the_tokens():
    """Seeded random schedules (prompts sharing starts or repeated, staggered arrivals, cancellations, buckets and
    compactions, chunked prefill, overlap): after every step the prefix index is what a rebuild from the rows gives,
    each row's cache holds at least its prefix's positions (the ids themselves where the cache keeps them), and every
    request not cancelled gets the tokens it gets alone."""
    import random

    from egmla.infer.prefix_cache import PrefixTable

    models = {variant: tiny_model(variant, seed=5) for variant in ("eg-mla", "mla")}
    hits = compactions = 0
    for trial in range(16):
        rng = random.Random(trial)
        model = models[rng.choice(sorted(models))]
        path = rng.choice([p for p in decode_paths(model.config) if p != "kernel"])
        engine = GenerationEngine(model, decode_path=path, batch_buckets=rng.choice([(), (1, 2, 4)]))
        stems = [[rng.randrange(1, 290) for _ in range(rng.randrange(6, 14))] for _ in range(2)]
        prompts = []
        for _ in range(rng.randrange(4, 10)):
            repeat = prompts and rng.random() < 0.15
            prompts.append(list(rng.choice(prompts)) if repeat else
                           rng.choice(stems)[: rng.randrange(2, 14)] + [rng.randrange(1, 290) for _ in range(rng.randrange(5))])
        new = [rng.randrange(1, 8) for _ in prompts]
        expected = [engine.generate([p], max_new_tokens=n)[0].token_ids for p, n in zip(prompts, new)]
        scheduler = Scheduler(engine, max_batch=rng.randrange(2, 5), prefill_chunk=rng.choice([None, rng.randrange(2, 9)]),
                              overlap_host=rng.random() < 0.5, prefix_cache_min=rng.randrange(2, 6),
                              admit_batch=rng.randrange(1, 3))
        arrivals = sorted(rng.randrange(12) for _ in prompts)
        cancel_at = {i: arrivals[i] + rng.randrange(4) for i in range(len(prompts)) if rng.random() < 0.2}
        handles, steps = {}, 0
        while len(handles) < len(prompts) or any(not h.done for h in handles.values()):
            for i, at in enumerate(arrivals):
                if at <= steps and i not in handles:
                    handles[i] = scheduler.submit(prompts[i], max_new_tokens=new[i])
                if cancel_at.get(i) == steps and i in handles:
                    handles[i].cancel()
            scheduler.step()
            steps += 1
            table, cache = scheduler._prefixes, scheduler._cache
            rebuilt = PrefixTable(len(table), table.minimum)
            for row, prefix in enumerate(table):
                rebuilt[row] = prefix
            assert table._index == rebuilt._index, (trial, steps)
            lengths = cache.lengths.tolist()
            for row, prefix in enumerate(table):
                assert lengths[row] >= len(prefix), (trial, steps, row)
                if prefix and cache.token_ids is not None:
                    assert cache.token_ids[row, :len(prefix)].tolist() == list(prefix), (trial, steps, row)
            assert steps < 300
        for i, handle in handles.items():
            result = handle.result()
            assert result.finish_reason == "cancelled" or result.token_ids == expected[i], (trial, i)
        hits, compactions = hits + scheduler.stats.prefix_hits, compactions + scheduler.stats.compactions
    assert hits >= 16 and compactions >= 4  # the schedules reuse prefixes and move rows


@pytest.mark.skipif(__import__("egmla.kernels", fromlist=["x"]).kernel_unavailable_reason("cpu") is not None,
                    reason="claims the rows by the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 (make test)")
@pytest.mark.parametrize("overlap", [False, True])
def test_serving_with_offloaded_gate_tables_evicts_the_ids_no_row_holds(monkeypatch, overlap):
    """An offload under the scheduler keeps the rows of the ids its cache holds across requests: with little room
    (4 ids per row beyond the ids known), a second wave of requests (prompts of other ids) joining while the first
    runs makes it run short, and it evicts the ids no cache row holds any more (the rest claimed again at new slots) rather than pile
    rows up; every request gets the tokens it gets alone and, at every step, the served log-probabilities (its token's
    and the 20 most likely) of one full forward of a copy whose tables stay on the device, to fp32."""
    from egmla.infer import engine as engine_module
    from egmla.infer.offload import GateTableOffload

    monkeypatch.setattr(engine_module, "OFFLOAD_ROOM_DIVISOR", 10 ** 6)
    prompts, new = PROMPTS + [[(i + 131) % 300 for i in p] for p in PROMPTS], NEW + NEW  # a second wave, other ids
    arrivals = [0, 0, 1, 1, 3, 6, 7, 8, 9, 11, 13, 15]  # it joins while the first runs: evictions with rows held
    model = tiny_model("eg-mla", seed=3)
    engine = GenerationEngine(model, decode_path="gate-table")
    expected = [engine.generate([p], max_new_tokens=n)[0].token_ids for p, n in zip(prompts, new)]
    engine = GenerationEngine(model, decode_path="gate-table", offload_gate_tables=True)
    engine.offload.restore()
    engine.offload = GateTableOffload(model, initial_rows=4, on_device=True)  # the CUDA way, in the interpreter
    offload, kept = engine.offload, []  # (resident before, after) each eviction
    evict = offload._evict

    def counted(live, new):
        before = offload.check()
        moved = evict(live, new)
        kept.append((before, offload.check()))
        return moved

    def served_right():
        """Every id at a position of a cache row (below its length) is served its own rows."""
        cache = scheduler._cache
        held = torch.cat([cache.token_ids[row, :length] for row, length in enumerate(cache.lengths.tolist())]).long()
        return all(torch.equal(offload.rows(key, held), table[held]) for key, table in offload.host_tables.items())

    monkeypatch.setattr(offload, "_evict", counted)
    scheduler = Scheduler(engine, max_batch=3, overlap_host=overlap)
    handles, steps = {}, 0
    while len(handles) < len(prompts) or scheduler.running or scheduler.waiting:
        for i, at in enumerate(arrivals):
            if at == steps:
                handles[i] = scheduler.submit(prompts[i], max_new_tokens=new[i], logprobs=MAX_TOP_LOGPROBS)
        scheduler.step()
        assert served_right()
        steps += 1
    assert [handles[i].result().token_ids for i in range(len(prompts))] == expected
    on_device = tiny_model("eg-mla", seed=3)  # its full forward reads no offloaded row
    for i, prompt in enumerate(prompts):
        assert_served_log_probs_match(on_device, prompt, handles[i].result(), (overlap, i))
    assert kept and any(after < before for before, after in kept)  # ids of finished requests' rows went
    assert offload.check() <= offload.capacity < 300


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_serving_with_offloaded_gate_tables_on_cuda_replays_graphs_and_gets_the_same_tokens(monkeypatch):
    """On CUDA: decode and prefill graphs captured with the claim launches in them (at start and as rows grow), the
    ids of finished requests evicted when the room runs short; the tokens of the tables on the device (bf16)."""
    from egmla.infer import engine as engine_module

    monkeypatch.setattr(engine_module, "OFFLOAD_ROOM_DIVISOR", 10 ** 6)
    prompts, new = PROMPTS + [[(i + 131) % 300 for i in p] for p in PROMPTS], NEW + NEW
    model = tiny_model("eg-mla", seed=3).to("cuda", torch.bfloat16)

    def serve(offload: bool) -> list[list[int]]:
        engine = GenerationEngine(model, decode_path="kernel", offload_gate_tables=offload)
        if offload:  # a row cache of 4 rows to start with (256 by default): the room runs short
            from egmla.infer.offload import GateTableOffload

            engine.offload.restore()
            engine.offload = GateTableOffload(model, initial_rows=4)
        scheduler = Scheduler(engine, max_batch=4)
        scheduler.capture_graphs()
        handles = [scheduler.submit(p, max_new_tokens=n) for p, n in zip(prompts[:6], new[:6])]
        for _ in range(3):
            scheduler.step()
        handles += [scheduler.submit(p, max_new_tokens=n) for p, n in zip(prompts[6:], new[6:])]
        while scheduler.step():
            pass
        if offload:
            assert engine.offload.evictions >= 1 and engine.offload.check() <= engine.offload.capacity
            engine.offload.restore()
        return [h.result().token_ids for h in handles]

    assert serve(offload=True) == serve(offload=False)


@pytest.mark.parametrize("logprobs", [1.5, True, "2"])
def test_a_logprobs_that_is_not_an_int_is_refused_at_submit(logprobs):
    """logprobs=1.5 was queued, and its first sampling step raised in topk, failing every request running with it;
    True was taken as 1 (the engine refuses a bool: OpenAI's chat `logprobs` is one)."""
    model = tiny_model("mha")
    scheduler = Scheduler(GenerationEngine(model), max_batch=2)
    running = scheduler.submit(PROMPTS[0], max_new_tokens=4)
    with pytest.raises(ValueError, match="logprobs="):
        scheduler.submit(PROMPTS[1], max_new_tokens=4, logprobs=logprobs)
    while scheduler.step():
        pass
    assert running.result(timeout=0).finish_reason == "length"


@pytest.mark.parametrize("variant,path", [("mla", "absorbed"), ("eg-mla", "grouped")])
@pytest.mark.parametrize("max_len", [24, 40])
def test_a_continued_prompt_never_takes_fresh_prompts_off_the_fresh_path(variant, path, max_len, monkeypatch):
    """A prompt cut by the prefill budget continues in the next iteration beside fresh prompts: they go in forwards of
    their own. A forward holding one continued row attends over the rows' cache, which took every fresh prompt beside
    it off the fresh path (a captured step, or FlashAttention): on an H100 that made serving MLA kv64 18% slower with
    rows of 4,096 positions than of 1,280, where the row length alone decided whether they shared a forward. The
    forwards are the same whatever the row length; no token changes."""
    model = tiny_model(variant, seed=3)
    engine = GenerationEngine(model, decode_path=path)
    prompts = [[3 + (5 * i + j) % 250 for j in range(9 + i % 3)] for i in range(6)]
    expected = [engine.generate([p], max_new_tokens=4)[0].token_ids for p in prompts]
    forwards = []
    prefill_run = Scheduler._prefill_run

    def spy(self, run, every_position):
        forwards.append(frozenset("continued" if self._rows[row].fed else "fresh" for row, _ in run))
        return prefill_run(self, run, every_position)

    monkeypatch.setattr(Scheduler, "_prefill_run", spy)
    scheduler = Scheduler(engine, max_batch=6, max_len=max_len, prefill_chunk=25)
    handles = [scheduler.submit(p, max_new_tokens=4) for p in prompts]
    while scheduler.step():
        pass
    assert [h.result().token_ids for h in handles] == expected
    assert {"continued"} in forwards and {"fresh"} in forwards  # the budget cut prompts, and fresh ones ran beside
    assert all(len(kinds) == 1 for kinds in forwards), forwards


@pytest.mark.parametrize("variant,path", [("mla", "absorbed"), ("eg-mla", "grouped")])
def test_a_prompt_that_fits_a_budget_waits_rather_than_be_cut_by_its_last_tokens(variant, path, monkeypatch):
    """Three 12-token prompts take 36 of a 40-token budget: the fourth waits for the next iteration whole (its first
    token comes in that iteration either way) instead of being cut by the 4 tokens left, whose rest would need an eager
    forward of its own (a continued row attends over the cache). Every forward is then fresh; no token changes.
    Where more of the budget is left, prompts are still cut (the test above)."""
    model = tiny_model(variant, seed=3)
    engine = GenerationEngine(model, decode_path=path)
    prompts = [[3 + (7 * i + j) % 250 for j in range(12)] for i in range(6)]
    expected = [engine.generate([p], max_new_tokens=4)[0].token_ids for p in prompts]
    forwards, first_tokens = [], []
    prefill_run = Scheduler._prefill_run

    def spy(self, run, every_position):
        forwards.append([(self._rows[row].fed, take) for row, take in run])
        return prefill_run(self, run, every_position)

    monkeypatch.setattr(Scheduler, "_prefill_run", spy)
    scheduler = Scheduler(engine, max_batch=6, max_len=24, prefill_chunk=40)
    handles = [scheduler.submit(p, max_new_tokens=4) for p in prompts]
    while scheduler.step():
        first_tokens.append(sum(h.times.first_token is not None for h in handles))
    assert [h.result().token_ids for h in handles] == expected
    assert all(fed == 0 and take == 12 for run in forwards for fed, take in run), forwards  # whole and fresh
    assert first_tokens[:2] == [0, 3] and first_tokens[2] == 6  # 3 prompts an iteration, read one step later
