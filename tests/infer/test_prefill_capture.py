"""Prefill graphs captured at a server's start (`Scheduler.prefill_buckets`, `Scheduler.capture_prefill_graphs`,
`egmla serve --capture-prefill-tokens`): the buckets listed are exactly those the scheduler's own prefills of fresh
prompts ask the engine for, so that after the capture such prompts only replay. A CPU has no graphs: a capture is
emulated (a step marked as a graph, whose replay runs its forward), as in test_prefill_step.py."""
import random

import pytest
import torch
from tests.infer.helpers import (GraphReplay, assert_served_log_probs_match, forward_into_one_buffer,
                                 prefill_steps_as_graphs, tiny_model)

from egmla.attention import decode_paths
from egmla.cli import main as egmla_main
from egmla.infer import GenerationEngine
from egmla.infer.decode_step import DecodeStep
from egmla.infer.prefill_step import PrefillStep, prefill_bucket
from egmla.infer.scheduler import MAX_TOP_LOGPROBS, Scheduler
from egmla.infer.server import make_server

MAX_LEN = 40  # positions per row (the tiny model's max_seq_len is 48): widths 16, 24, 32 and 40 (48 capped)


def engine_of(seed: int = 5, prefill_graphs: bool = True, **settings) -> GenerationEngine:
    return GenerationEngine(tiny_model("mla", seed=seed), decode_path="absorbed", prefill_graphs=prefill_graphs,
                            **settings)


def record_prefill_steps(engine: GenerationEngine) -> list[tuple[int, tuple[int, int]]]:
    """Records (rows asked for, the bucket of the step handed out) of every prefill step the engine hands out."""
    handed, hand_out = [], engine.prefill_step

    def recording(rows: int, width: int, max_len: int):
        step = hand_out(rows, width, max_len)
        if step is not None:
            handed.append((rows, (step.rows, step.width)))
        return step

    engine.prefill_step = recording
    return handed


def random_prompts(rng: random.Random, count: int, longest: int) -> list[list[int]]:
    # distinct random ids: no two prompts alike (shared prefill) or with a common prefix (prefix caching)
    return [[rng.randrange(1, 300) for _ in range(rng.randint(1, longest))] for _ in range(count)]


def serve_all(scheduler: Scheduler, prompts: list[list[int]], arrivals: list[int], new_tokens: list[int],
              logprobs: int | None = None) -> list:
    """Submit prompt i once arrivals[i] steps have run (each asking for `logprobs`); step until every request is
    done; their results."""
    handles, steps = {}, 0
    while len(handles) < len(prompts) or not all(h.done for h in handles.values()):
        for i, at in enumerate(arrivals):
            if at <= steps and i not in handles:
                handles[i] = scheduler.submit(prompts[i], max_new_tokens=new_tokens[i], logprobs=logprobs)
        scheduler.step()
        steps += 1
        assert steps < 500
    return [handles[i].result() for i in range(len(prompts))]


@pytest.fixture
def emulated_graphs(monkeypatch) -> list[tuple[int, int]]:
    """Prefill steps behave as on a GPU: captured once (recorded in the list returned), then replayed."""
    captured = []

    def capture(step):
        captured.append((step.rows, step.width))
        step.graph = GraphReplay(step)

    prefill_steps_as_graphs(monkeypatch)
    monkeypatch.setattr(PrefillStep, "capture", capture)
    return captured


def test_the_buckets_listed_hold_every_prefill_of_random_prompt_mixes():
    """Random prompts arriving in bursts and one by one, under random batch, admission and chunk settings: every
    prefill step the scheduler asks for is one of `prefill_buckets` of the longest prompt (the next test shows each
    listed one is met)."""
    rng = random.Random(0)
    seen = set()
    for trial in range(12):
        max_batch = rng.randint(2, 7)
        scheduler = Scheduler(engine_of(), max_batch=max_batch, max_len=MAX_LEN,
                              admit_batch=rng.randint(1, max_batch), prefill_chunk=rng.choice([24, 48, 64, 200]))
        handed = record_prefill_steps(scheduler.engine)
        count = rng.randint(3, 12)
        prompts = random_prompts(rng, count, rng.choice([12, 20, MAX_LEN]))
        arrivals = sorted(rng.choice([0, 0, 0, rng.randint(1, 12)]) for _ in range(count))
        serve_all(scheduler, prompts, arrivals, [rng.randint(1, 6) for _ in range(count)])
        requested = {bucket for _, bucket in handed}
        listed = set(scheduler.prefill_buckets(max(len(p) for p in prompts)))
        assert requested and requested <= listed, (trial, requested - listed)
        seen |= {bucket for rows, bucket in handed if rows > scheduler.admit_batch}
    assert seen  # more rows than admit_batch do come: a burst with nothing running, or more rows freed at once


def test_decode_graphs_first_met_while_serving_count_as_late_captures(monkeypatch):
    """A decode bucket's graph captured when first met while serving counts in `late_captures` (what `egmla bench
    serve` reports of a measured run); after `capture_graphs()` at the start none does."""
    captured = []

    def capture(step):  # emulated: the step's forward stands in for the graph's replay
        captured.append(step.batch)
        step.graph = GraphReplay(step)

    monkeypatch.setattr(DecodeStep, "capture", capture)
    forward_into_one_buffer(monkeypatch, DecodeStep)
    rng = random.Random(4)
    prompts, arrivals, new_tokens = random_prompts(rng, 5, 12), [0, 0, 1, 3, 6], [4, 1, 6, 2, 5]
    late = Scheduler(engine_of(prefill_graphs=False, batch_buckets=(1, 2, 4, 8)), max_batch=8, max_len=MAX_LEN)
    late.engine.cuda_graphs = True  # as on CUDA: each decode step a graph, captured when first run
    expected = [r.token_ids for r in serve_all(late, prompts, arrivals, new_tokens)]
    assert captured and late.stats.late_captures == len(captured)
    early = Scheduler(engine_of(prefill_graphs=False, batch_buckets=(1, 2, 4, 8)), max_batch=8, max_len=MAX_LEN)
    early.engine.cuda_graphs = True
    captured.clear()
    assert early.capture_graphs() == len(captured) == 4
    assert [r.token_ids for r in serve_all(early, prompts, arrivals, new_tokens)] == expected
    assert len(captured) == 4 and early.stats.late_captures == 0


def test_every_bucket_listed_is_met_by_prompts_arriving_together():
    """For each listed bucket, as many prompts as its rows (at most max_batch) of its width (within the chunk per
    row), submitted at once, are prefilled by that bucket's step: the list holds nothing the scheduler never asks."""
    settings = dict(max_batch=5, max_len=MAX_LEN, prefill_chunk=64)
    listed = Scheduler(engine_of(), **settings).prefill_buckets()
    assert len(listed) == 11 and listed[0] == (6, 16) and (1, MAX_LEN) in listed  # 5 rows pad to the bucket of 6
    rng = random.Random(1)
    for rows, width in listed:
        scheduler = Scheduler(engine_of(), **settings)
        handed = record_prefill_steps(scheduler.engine)
        count = min(rows, settings["max_batch"])
        length = min(width, settings["prefill_chunk"] // count)
        prompts = [[rng.randrange(1, 300) for _ in range(length)] for _ in range(count)]
        serve_all(scheduler, prompts, [0] * count, [1] * count)
        assert [bucket for _, bucket in handed] == [(rows, width)]


def test_after_the_capture_prompts_within_the_range_capture_nothing(emulated_graphs):
    """capture_prefill_graphs(L) captures every listed bucket, largest first; prompts of up to L tokens then replay
    those graphs only (and get the eager engine's tokens); a longer prompt is captured when met."""
    longest = 24
    engine = engine_of(seed=8)
    scheduler = Scheduler(engine, max_batch=6, max_len=MAX_LEN, admit_batch=2, prefill_chunk=64)
    assert scheduler.capture_prefill_graphs(longest) == len(emulated_graphs) == 8
    assert emulated_graphs == scheduler.prefill_buckets(longest)
    assert scheduler.capture_prefill_graphs(longest) == 0  # captured already
    rng = random.Random(2)
    eager = GenerationEngine(engine.model, decode_path="absorbed", prefill_graphs=False)
    for _ in range(6):
        prompts = random_prompts(rng, rng.randint(2, 9), longest)
        arrivals = sorted(rng.choice([0, 0, rng.randint(1, 8)]) for _ in prompts)
        new_tokens = [rng.randint(1, 5) for _ in prompts]
        results = serve_all(scheduler, prompts, arrivals, new_tokens)
        assert [r.token_ids for r in results] == [
            eager.generate([p], max_new_tokens=n)[0].token_ids for p, n in zip(prompts, new_tokens)]
    assert len(emulated_graphs) == 8 and scheduler.stats.prefill_graph_calls > 0
    assert scheduler.stats.late_captures == 0  # (captures at the start are not late)
    serve_all(scheduler, random_prompts(rng, 1, 1) + [[7] * 30], [0, 0], [2, 2])  # 30 tokens: a width of 32
    assert emulated_graphs[8:] == [(2, 32)]
    assert scheduler.stats.late_captures == 1  # the one met while serving is counted
    every, before = scheduler.prefill_buckets(), len(emulated_graphs)  # (None: prompts of any length)
    assert scheduler.capture_prefill_graphs() == len(every) - before == 2
    # widths of 33-40 tokens pad to the bucket of 48, capped at the rows' 40 positions at capture as when prefilled
    serve_all(scheduler, [[9] * MAX_LEN, [8] * 37, [3] * 33], [0, 5, 10], [1, 1, 1])
    assert sorted(emulated_graphs) == sorted(every) and scheduler.stats.late_captures == 1



def test_randomized_workloads_ask_only_for_listed_buckets():
    """Randomized settings (max_len up to the model's 48, max_batch not a bucket size, prefill chunks smaller than the
    prompts) and workloads (chunked prompts, cached-prefix rests, prompt-logprob requests, n > 1 choices of one prompt,
    cancellations, arrivals while others run): every prefill step the scheduler asks for, for prompts of at most N
    tokens, is one of `prefill_buckets(N)`; and N's buckets are exactly those of some run of at most max_batch rows."""
    rng = random.Random(11)
    for trial in range(40):
        max_len = rng.choice([12, 20, 33, 40, 48])
        max_batch = rng.randint(1, 9)
        chunk = rng.choice([3, 7, 16, 17, 31, 64, 1000])
        scheduler = Scheduler(engine_of(), max_batch=max_batch, max_len=max_len, prefill_chunk=chunk,
                              admit_batch=rng.randint(1, max_batch), admit_wait=rng.choice([0, 2, 16]),
                              prefix_cache_min=rng.choice([0, 3, 32]))
        handed = record_prefill_steps(scheduler.engine)
        longest = rng.randint(1, max_len)
        shared = [rng.randrange(1, 300) for _ in range(longest)]  # prompts sharing a prefix: cached-prefix rests
        handles, calls, steps = [], rng.randint(3, 12), 0
        while calls or not all(h.done for h in handles):
            if calls and rng.random() < 0.5:
                calls -= 1
                length = rng.randint(1, longest)
                prompt = shared[:length] if rng.random() < 0.3 else [rng.randrange(1, 300) for _ in range(length)]
                scored = rng.random() < 0.15
                request = dict(prompt=prompt, max_new_tokens=rng.randint(1, 4), logprobs=0 if scored else None,
                               prompt_logprobs=scored)
                made = scheduler.submit_all([request] * min(max_batch, rng.choice([1, 1, 2, 3])))  # n choices
                if rng.random() < 0.05:
                    made[-1].cancel()
                handles += made
            scheduler.step()
            steps += 1
            assert steps < 1000
        requested = {bucket for _, bucket in handed}
        listed = scheduler.prefill_buckets(longest)
        assert requested <= set(listed), (trial, requested - set(listed))
        runs = {prefill_bucket(rows, width, max_len) for rows in range(1, max_batch + 1)
                for width in range(1, min(longest, chunk // rows) + 1)}
        assert set(listed) == runs - {None} and len(listed) == len(set(listed)), trial


def test_randomized_start_time_captures_give_the_eager_engines_tokens(monkeypatch):
    """Graphs captured at start as a GPU captures them (the forward run at capture, on the zeroed inputs; each replay
    rewriting the one output buffer kept since), on random variants, decode paths and settings: prompts of up to N
    tokens arriving in bursts capture nothing more and get, token for token, what an eager engine gives each alone,
    and at every step the log-probabilities of one full forward of prompt + tokens (the served ones, as the step's
    logits reach no `select_next` under the scheduler: each token's and the 20 most likely, to fp32)."""
    captured = []
    def capture(step):
        captured.append((step.rows, step.width))
        step.forward()  # warm-up
        step.logits = step.forward()
        step.graph = GraphReplay(step)

    forward_into_one_buffer(monkeypatch)
    monkeypatch.setattr(PrefillStep, "capture", capture)
    prefill_steps_as_graphs(monkeypatch)
    rng = random.Random(4)
    for trial in range(10):
        model = tiny_model(rng.choice(["mla", "eg-mla", "eg-mla-bias", "mha"]), seed=trial)
        path = rng.choice(decode_paths(model.config))
        max_len, max_batch = rng.choice([20, 40, 48]), rng.randint(1, 6)
        scheduler = Scheduler(GenerationEngine(model, decode_path=path, prefill_graphs=True), max_batch=max_batch,
                              max_len=max_len, prefill_chunk=rng.choice([7, 31, 64]),
                              admit_batch=rng.randint(1, max_batch), prefix_cache_min=rng.choice([0, 3]))
        longest = rng.randint(1, max_len - 1)
        del captured[:]
        assert scheduler.capture_prefill_graphs(longest) == len(captured) == len(scheduler.prefill_buckets(longest))
        prompts = random_prompts(rng, rng.randint(2, 8), longest)
        new_tokens = [rng.randint(1, min(4, max_len - len(p))) for p in prompts]
        arrivals = sorted(rng.choice([0, 0, rng.randint(1, 6)]) for _ in prompts)
        results = serve_all(scheduler, prompts, arrivals, new_tokens, logprobs=MAX_TOP_LOGPROBS)
        eager = GenerationEngine(model, decode_path=path, prefill_graphs=False)
        assert [r.token_ids for r in results] == [
            eager.generate([p], max_new_tokens=n)[0].token_ids for p, n in zip(prompts, new_tokens)], (trial, path)
        for i, (prompt, result) in enumerate(zip(prompts, results)):
            assert_served_log_probs_match(model, prompt, result, (trial, path, i))
        assert len(captured) == len(scheduler.prefill_buckets(longest)), trial  # nothing captured while serving

def test_nothing_is_captured_on_a_cpu_or_without_prefill_graphs():
    on_cpu = Scheduler(engine_of(), max_batch=4, max_len=MAX_LEN)
    assert on_cpu.capture_prefill_graphs() == 0  # the steps are made (eager ones), none is a graph
    assert len(on_cpu.engine._prefill_steps) == len(on_cpu.prefill_buckets()) > 0
    off = Scheduler(engine_of(prefill_graphs=False), max_batch=4, max_len=MAX_LEN)
    assert off.capture_prefill_graphs() == 0 and not off.engine._prefill_steps
    assert on_cpu.prefill_buckets(0) == []
    with pytest.raises(ValueError, match="max_prompt_tokens=-1: must be >= 0"):
        on_cpu.capture_prefill_graphs(-1)


def test_a_servers_start_captures_the_prefill_buckets_and_says_how_many(emulated_graphs, tokenizer, capfd,
                                                                        monkeypatch):
    captured_at_start, start = [], Scheduler.start
    monkeypatch.setattr(Scheduler, "start", lambda self: captured_at_start.append(len(emulated_graphs)) or start(self))
    engine = engine_of(tokenizer=tokenizer)
    scheduler = Scheduler(engine, max_batch=3, max_len=MAX_LEN)
    server = make_server(scheduler, "tiny", port=0, capture_prefill_tokens=20)
    try:
        assert emulated_graphs == scheduler.prefill_buckets(20) and len(emulated_graphs) == 6
        assert captured_at_start == [6]  # all before the scheduler's thread takes the engine
        err = capfd.readouterr().err
        assert "captured 0 decode-step CUDA graphs in" in err  # a CPU has none
        assert "and 6 prefill graphs (fresh prompts of up to 20 tokens) in" in err
    finally:
        server.server_close()
        scheduler.stop()
    quiet = Scheduler(engine_of(tokenizer=tokenizer), max_batch=3, max_len=MAX_LEN)
    server = make_server(quiet, "tiny", port=0)  # the library's default: none
    server.server_close()
    quiet.stop()
    assert len(emulated_graphs) == 6 and "captured" not in capfd.readouterr().err  # nothing captured: no line


def test_the_command_passes_capture_prefill_tokens_and_refuses_bad_values(run_dir, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        egmla_main(["serve", "--help"])
    assert exit_info.value.code == 0 and "--capture-prefill-tokens N" in capsys.readouterr().out
    for bad in ("all", "-1", "2.5"):
        with pytest.raises(SystemExit) as exit_info:
            egmla_main(["serve", "--run", str(run_dir), "--capture-prefill-tokens", bad])
        assert exit_info.value.code == 2
        assert (f"argument --capture-prefill-tokens: '{bad}': give a whole number of prompt tokens >= 0 (0 = capture "
                f"no prefill graph at start)") in capsys.readouterr().err
    import egmla.infer.server as server_module

    made = []
    monkeypatch.setattr(server_module, "make_server", lambda *args, **kwargs: made.append(kwargs) or "server")
    monkeypatch.setattr(server_module, "serve", lambda server: None)
    for given, expected in (([], 256), (["--capture-prefill-tokens", "0"], 0), (["--capture-prefill-tokens=48"], 48)):
        assert egmla_main(["serve", "--run", str(run_dir), "--port", "0", "--max-batch", "2", *given]) == 0
        assert made.pop()["capture_prefill_tokens"] == expected


def test_the_command_serves_with_offloaded_gate_tables(run_dir, monkeypatch):
    import egmla.infer.server as server_module

    made = []
    monkeypatch.setattr(server_module, "make_server", lambda scheduler, *args, **kwargs: made.append(scheduler))
    monkeypatch.setattr(server_module, "serve", lambda server: None)
    for given, offloaded in (([], False), (["--offload-gate-tables"], True)):
        assert egmla_main(["serve", "--run", str(run_dir), "--port", "0", "--max-batch", "2", *given]) == 0
        scheduler = made.pop()
        assert (scheduler.engine.offload is not None) == offloaded
        server = make_server(scheduler, "tiny", port=0)  # the real one: its start line
        server.server_close()
        scheduler.stop()
        assert ("gate tables in host memory" in server.describe()) == offloaded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant,path", [("eg-mla", "grouped"), ("mla", "kernel")])
def test_on_cuda_graphs_captured_at_start_serve_the_prompts_within_the_range(variant, path):
    """On a GPU: graphs captured before any prefill (their inputs zeroed, not a prompt's) replay for prompts of up to
    the range's length, no step is made or captured afterwards, and every request gets the eager engine's tokens."""
    model = tiny_model(variant, seed=12).cuda()
    eager = GenerationEngine(model, decode_path=path, cuda_graphs=False)
    engine = GenerationEngine(model, decode_path=path)
    scheduler = Scheduler(engine, max_batch=4, max_len=MAX_LEN, admit_batch=2)
    scheduler.capture_graphs()
    assert scheduler.capture_prefill_graphs(24) == len(scheduler.prefill_buckets(24)) > 0
    graphs = {key: step.graph for key, step in engine._prefill_steps.items()}
    assert all(graphs.values())
    rng = random.Random(3)
    prompts = random_prompts(rng, 10, 24)
    new_tokens = [rng.randint(1, 8) for _ in prompts]
    results = serve_all(scheduler, prompts, [0, 0, 0, 2, 2, 5, 9, 9, 9, 14], new_tokens)
    assert [r.token_ids for r in results] == [
        eager.generate([p], max_new_tokens=n)[0].token_ids for p, n in zip(prompts, new_tokens)]
    assert {key: step.graph for key, step in engine._prefill_steps.items()} == graphs
    assert scheduler.stats.prefill_graph_calls > 0
