"""`egmla bench serve`: serving throughput and latency under a stream of requests, as a server meets them.

One workload per rate (`--rate`, requests per second; `inf` = every request at once, the offline case): `--requests`
prompts of real text (the embedded corpus) whose lengths and output lengths are drawn uniformly from [half, all] of
`--prompt-len` and `--output-len`, arriving at exponential gaps (a Poisson process), the same draws for every system.
End-of-text is ignored, so every request generates exactly its output length. Systems (`--systems`):

    continuous     egmla's `Scheduler` (egmla/infer/scheduler.py): requests join and leave the running batch
    static         egmla's `GenerationEngine.generate` on whatever has arrived (up to --max-batch) when the previous
                   batch is done, every request of a batch generating the batch's longest output (what a server
                   without continuous batching does; each request's time is that of its own last token)
    transformers   the anchor a user would pick instead: transformers' own continuous batching (`init_continuous_
                   batching`, paged attention) on its `LlamaForCausalLM` at the same shape (MHA), random weights

Each system runs the workload once to warm up (kernels, CUDA graphs of the batch sizes it meets; not reported), then
once measured. egmla's measured run reuses the warm-up's engine and captures every bucket's graph before the clock;
transformers' measured run is a new manager (its batch processor and paged cache are made again, and whatever it
captures is captured again, inside the run after one small request; `manager.warmup()` is not called). Per system:
output tokens/s over the run (first arrival to last token), time to first token (TTFT), time per output token after
the first (TPOT) and end-to-end latency, medians and 90th percentiles."""
from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from dataclasses import dataclass

from egmla.bench.options import add_output_arguments, add_preset_arguments, read_result, report

SYSTEMS = ("continuous", "static", "transformers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_preset_arguments(parser, fits="the longest prompt and output")
    parser.add_argument("--variants", default="mha,mla-kv64,egmla-kv64",
                        help="comma-separated registry names served by egmla's systems")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated, of: {', '.join(SYSTEMS)} (transformers: once, on Llama at the shape)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per workload (default 512 on CUDA, 12 elsewhere)")
    parser.add_argument("--rate", default="inf",
                        help="comma-separated arrival rates in requests per second, one workload each; inf = all at once")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="longest prompt; lengths are uniform in [half, all] (default 1024 on CUDA, 24 elsewhere)")
    parser.add_argument("--output-len", type=int, default=None,
                        help="longest output; lengths are uniform in [half, all] (default 256 on CUDA, 8 elsewhere)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="requests generating at once in egmla's systems (default 128 on CUDA, 4 elsewhere); "
                             "as many for transformers' manager where it has the setting (max_requests_per_batch)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="continuous: prompt tokens prefilled per iteration over all requests (default: the "
                             "engine's prefill_token_budget, 32,768, i.e. whole prompts); smaller interleaves long "
                             "prompts with the running requests' steps")
    parser.add_argument("--admit-batch", default=None,
                        help="continuous: free rows that admit waiting requests while others run (the scheduler's "
                             "admit_batch; default max(1, max batch // 8)); comma-separated values run one "
                             "continuous row each (e.g. 1,16: refill each freed row at once vs 16 at a time)")
    parser.add_argument("--prefill-graphs", default=None,
                        help="egmla's systems: 'on' = fresh prompts prefilled through the fixed-shape step (a CUDA "
                             "graph per bucket; the engine's default on CUDA), 'off' = eager forwards; 'on,off' runs "
                             "a row of each (default: the engine's choice, not labelled)")
    parser.add_argument("--capture-prefill-tokens", type=int, default=0, metavar="N",
                        help="continuous: before the clock, also capture the prefill graphs of fresh prompts of up to N "
                             "tokens, as `egmla serve --capture-prefill-tokens N` does at its start (default 0: only "
                             "those the warm-up run met; a bucket only the measured run meets is captured inside it, "
                             "tens of ms during which every request waits: rows count these as late captures)")
    parser.add_argument("--decode-path", default="auto", help="egmla's decode path (auto = the engine's choice)")
    parser.add_argument("--cache-dtype", default="auto", choices=["auto", "fp8", "fp8-keep-rope"],
                        help="egmla's KV cache: auto = the model's dtype; fp8 = float8_e4m3fn, as `egmla serve "
                             "--cache-dtype fp8`; fp8-keep-rope = the same but the RoPE keys in the model's dtype")
    parser.add_argument("--offload-gate-tables", action="store_true",
                        help="EG-MLA rows: gate tables in host memory, the rows of the ids the cache holds on the device "
                             "(as `egmla serve --offload-gate-tables`)")
    parser.add_argument("--text", action="store_true",
                        help="egmla's systems serve text, as `egmla serve` does: the engine gets the tokenizer the "
                             "prompts were cut with, so every streamed request makes its text token by token and "
                             "every other one decodes it once at its end (the default serves token ids only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload's draws")
    parser.add_argument("--stream", action="store_true",
                        help="continuous: submit every request streamed, so that the scheduler makes each token's "
                             "event as for a streaming client (default: not streamed, as a client that reads the "
                             "whole result: no per-token events; result files written before 2026-12-05 streamed)")
    add_output_arguments(parser)
    parser.add_argument("--plot", metavar="PNG", help="also draw output tokens/s per system as bars here (log scale, "
                        "each labelled with its multiple of transformers'; matplotlib); with --report too")
    parser.add_argument("--ab", action="append", metavar="LABEL=JSON", default=[],
                        help="nothing measured: the A/B table of result files of code versions, or of one code "
                             "with and without --stream, --offload-gate-tables, --text, --capture-prefill-tokens or "
                             "--cache-dtype (repeat it, e.g. --ab old=a1.json --ab new=b1.json --ab old=a2.json --ab "
                             "new=b2.json, rounds interleaved): "
                             "each row's output tokens/s per run, the medians and the last label's over the first's, "
                             "and the scheduler's host time per decode step by phase; --markdown writes it")


@dataclass
class Request:
    arrival: float  # seconds after the workload's start
    prompt: list[int]
    output_len: int


@dataclass
class Timing:
    """One request's times in seconds after the workload's start, and its output tokens."""

    arrival: float
    first_token: float
    finished: float
    tokens: int


def workload(count: int, rate: float, prompt_len: int, output_len: int, vocab_size: int, seed: int) -> list[Request]:
    """`count` requests: prompts cut from real text, lengths and arrivals drawn from `seed`."""
    import random

    from egmla.bench.token_ids import text_token_ids

    rng = random.Random(seed)
    stream = text_token_ids(1, count * prompt_len, vocab_size)[0][0].tolist()
    requests, clock = [], 0.0
    for index in range(count):
        length = rng.randint(max(1, prompt_len // 2), prompt_len)
        start = index * prompt_len
        requests.append(Request(clock, stream[start:start + length], rng.randint(max(1, output_len // 2), output_len)))
        if math.isfinite(rate):
            clock += rng.expovariate(rate)
    return requests


def _wait_until(start: float, offset: float) -> None:
    delay = start + offset - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def run_continuous(engine, requests: list[Request], max_batch: int, prefill_chunk: int | None = None,
                   row: dict | None = None, admit_batch: int | None = None, stream: bool = False,
                   capture_prefill_tokens: int = 0) -> list[Timing]:
    """egmla's scheduler, requests submitted at their arrival times (`stream`: as streamed requests, each token an
    event); `row` gets its counters (steps, prefill calls, compactions, shared prefills, graphs captured inside the
    run, and the share of the run its thread was busy). capture_prefill_tokens: the prefill graphs of fresh prompts
    of up to that many tokens are captured before the clock too (0: none beyond those the engine has)."""
    from egmla.infer.scheduler import Scheduler

    scheduler = Scheduler(engine, max_batch=max_batch, max_len=engine.config.max_seq_len,
                          max_waiting=len(requests), prefill_chunk=prefill_chunk, admit_batch=admit_batch)
    # before the clock, as `egmla serve` does at its start: the cache (kept from the warm-up), the path, the
    # precomputed tensors, and every bucket's CUDA graph (else a bucket the warm-up did not meet is captured
    # mid-run: tens of milliseconds each; which buckets a run meets depends on the threads' timing)
    scheduler.step()
    scheduler.capture_graphs()
    if capture_prefill_tokens:
        scheduler.capture_prefill_graphs(capture_prefill_tokens)
    busy_before = scheduler.stats.busy_seconds  # the warm-up step's busy time and phases
    host_before = dict(scheduler.stats.host_seconds)
    start = time.perf_counter()
    burst = next((i for i, request in enumerate(requests) if request.arrival > 0), len(requests))
    # the requests arriving at once are queued before the thread starts (else its first iterations would see
    # however many the submitting loop had queued by then)
    handles = [scheduler.submit(request.prompt, max_new_tokens=request.output_len, stream=stream)
               for request in requests[:burst]]
    scheduler.start()
    try:
        for request in requests[burst:]:
            _wait_until(start, request.arrival)
            handles.append(scheduler.submit(request.prompt, max_new_tokens=request.output_len, stream=stream))
        results = [handle.result() for handle in handles]
    finally:
        scheduler.stop()
    # the thread's last iteration may end after the last result: the busy share is of the span up to its stop
    span = time.perf_counter() - start
    if row is not None:
        stats = scheduler.stats
        row.update(admit_batch=scheduler.admit_batch, decode_steps=stats.decode_steps,
                   prefill_calls=stats.prefill_calls, prefill_graph_calls=stats.prefill_graph_calls,
                   late_captures=stats.late_captures, compactions=stats.compactions, rows_moved=stats.rows_moved,
                   prefills_shared=stats.prefills_shared, prefix_hits=stats.prefix_hits,
                   prefix_tokens_reused=stats.prefix_tokens_reused,
                   busy_seconds=stats.busy_seconds - busy_before,
                   busy_fraction=(stats.busy_seconds - busy_before) / span,
                   host_seconds={phase: round(seconds - host_before.get(phase, 0.0), 6)
                                 for phase, seconds in stats.host_seconds.items()})
    # arrivals as scheduled, as the other systems count them (submitting lags them by well under a millisecond)
    return [Timing(request.arrival, h.times.first_token - start, h.times.finished - start, len(r.token_ids))
            for request, h, r in zip(requests, handles, results)]


def run_static(engine, requests: list[Request], max_batch: int) -> list[Timing]:
    """Batches of what has arrived, each run to its longest output (see the module docstring)."""
    start = time.perf_counter()
    timings: dict[int, Timing] = {}
    pending = 0
    while pending < len(requests):
        _wait_until(start, requests[pending].arrival)
        now = time.perf_counter() - start
        batch = [i for i in range(pending, min(len(requests), pending + max_batch)) if requests[i].arrival <= now]
        pending += len(batch)
        produced = {i: 0 for i in batch}
        first: dict[int, float] = {}
        done: dict[int, float] = {}

        def on_token(event, batch=batch, produced=produced, first=first, done=done):
            index = batch[event.index]
            produced[index] += 1
            moment = time.perf_counter() - start
            first.setdefault(index, moment)
            if produced[index] == requests[index].output_len:
                done[index] = moment

        engine.generate([requests[i].prompt for i in batch], max_new_tokens=max(requests[i].output_len for i in batch),
                        on_token=on_token)
        for i in batch:
            timings[i] = Timing(requests[i].arrival, first[i], done[i], requests[i].output_len)
    return [timings[i] for i in range(len(requests))]


def transformers_batch_config(max_batch: int, max_len: int, on_cuda: bool):
    """transformers' ContinuousBatchingConfig capping the requests per batch at max_batch (as egmla's systems), or
    None where the installed transformers has no such setting (its manager then sizes the batch from memory). On a
    GPU the paged cache is sized as transformers sizes it by default (a share of the free memory: what a user gets);
    elsewhere to max_batch sequences of max_len (sizing from host memory took ~10 s per manager on a 24 GB VM)."""
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        page = 256
        blocks = {} if on_cuda else {"num_blocks": max_batch * -(-max_len // page) + 1, "page_size": page}
        return ContinuousBatchingConfig(max_requests_per_batch=max_batch, **blocks)
    except (ImportError, TypeError):
        return None


def run_transformers(model, requests: list[Request], max_batch: int, max_len: int, row: dict) -> list[Timing]:
    """transformers' continuous batching manager, requests added at their arrival times; the times of each token
    come from the manager's own timestamps (time.perf_counter). Sets row["max_batch"] to the cap it applied."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(r.output_len for r in requests), do_sample=False,
                              eos_token_id=-1, pad_token_id=0)
    batch_config = transformers_batch_config(max_batch, max_len, next(model.parameters()).is_cuda)
    row["max_batch"] = max_batch if batch_config is not None else None
    try:
        manager = model.init_continuous_batching(
            generation_config=config, **({"continuous_batching_config": batch_config} if batch_config else {}))
    except TypeError:  # an older transformers: its settings live elsewhere, its manager sizes the batch itself
        row["max_batch"] = None
        manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        # the manager sets itself up in its thread after start(): one small request first, so the clock starts when
        # it serves (egmla's scheduler is likewise made before the clock, on an engine that has run the workload)
        manager.add_request(input_ids=requests[0].prompt, request_id="warm-up", max_new_tokens=2)
        while (output := manager.get_result(timeout=600)) is not None and not output.is_finished():
            pass
        start = time.perf_counter()
        ids = []
        for index, request in enumerate(requests):
            _wait_until(start, request.arrival)
            ids.append(manager.add_request(input_ids=request.prompt, request_id=f"r{index}",
                                           max_new_tokens=request.output_len, record_timestamps=True))
        finished = {}
        while len(finished) < len(ids):  # results come in finishing order
            output = manager.get_result(timeout=600)
            if output is None:
                raise RuntimeError(f"transformers' manager stopped with {len(ids) - len(finished)} requests unfinished")
            if output.is_finished():
                finished[output.request_id] = output
        outputs = [finished[i] for i in ids]
    finally:
        manager.stop(block=True)
    timings = []
    for request, output in zip(requests, outputs):
        if output.error:
            raise RuntimeError(f"transformers' manager: request {output.request_id} failed: {output.error}")
        stamps = output.timestamps
        timings.append(Timing(request.arrival, stamps[0] - start, stamps[-1] - start, len(output.generated_tokens)))
    return timings


def summarize(timings: list[Timing]) -> dict:
    def quantiles(values: list[float]) -> tuple[float, float]:
        ordered = sorted(values)
        return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]

    duration = max(t.finished for t in timings) - min(t.arrival for t in timings)
    tokens = sum(t.tokens for t in timings)
    ttft = quantiles([t.first_token - t.arrival for t in timings])
    # no request of two or more tokens: no time per output token after the first (None, shown '-'; it read 0.00 ms)
    spans = [(t.finished - t.first_token) / (t.tokens - 1) for t in timings if t.tokens > 1]
    tpot = quantiles(spans) if spans else (None, None)
    latency = quantiles([t.finished - t.arrival for t in timings])
    return {"seconds": duration, "output_tokens": tokens, "output_tokens_per_s": tokens / duration,
            "requests_per_s": len(timings) / duration,
            "ttft_ms_p50": 1e3 * ttft[0], "ttft_ms_p90": 1e3 * ttft[1],
            "tpot_ms_p50": None if tpot[0] is None else 1e3 * tpot[0],
            "tpot_ms_p90": None if tpot[1] is None else 1e3 * tpot[1],
            "latency_s_p50": latency[0], "latency_s_p90": latency[1]}


def ab_markdown(runs: list[tuple[str, dict]]) -> str:
    """The A/B table of serve result files [(label, meta)]: one label per version, where labels differ in exactly one
    of their code, whether the requests were streamed, and whether EG-MLA's gate tables were offloaded (one change
    at a time, and not none); the rows matched by (variant, system, admit batch, prefill graphs, rate)."""
    import statistics

    from egmla.stats import runs_apart

    labels = list(dict.fromkeys(label for label, _ in runs))
    if len(labels) < 2:
        raise ValueError(f"--ab: at least two labels, got {labels}")
    code: dict[str, set] = {}
    # settings a label may change with the code fixed: files without "stream" came from code whose scheduler made
    # every token's event (streamed); a file is offloaded where its EG-MLA rows ran with the gate tables in host memory
    settings = {"streaming": lambda meta: meta.get("stream", True),
                "offloading the gate tables": lambda meta: any(row.get("offloaded_gate_tables")
                                                               for row in meta["rows"]),
                "serving text": lambda meta: any(row.get("text") for row in meta["rows"]),
                "capturing prefill graphs before the clock": lambda meta: meta.get("capture_prefill_tokens", 0),
                "the cache's dtype": lambda meta: meta.get("cache_dtype", "auto")}
    values: dict[str, dict[str, set]] = {name: {} for name in settings}
    for label, meta in runs:
        code.setdefault(label, set()).add(meta.get("code", {}).get("source_sha256"))
        for name, read in settings.items():
            values[name].setdefault(label, set()).add(read(meta))
    for name, per_label in values.items():
        for label, seen in per_label.items():
            if len(seen) > 1:
                raise ValueError(f"--ab: label {label!r} mixes files that differ in {name}")
    for a in labels:
        for b in labels:
            if a >= b:
                continue
            changes = ([] if code[a] & code[b] - {None} else ["code"]) + [
                name for name in settings if values[name][a] != values[name][b]]
            if not changes:
                raise ValueError(f"--ab: labels {a!r} and {b!r} ran the same code (source_sha256) with the same "
                                 f"settings on the same requests: not an A/B")
            if len(changes) > 1:
                raise ValueError(f"--ab: labels {a!r} and {b!r} differ in {' and in '.join(changes)}: compare one "
                                 f"change at a time (`egmla bench serve --stream` streams the requests, "
                                 f"`--offload-gate-tables` offloads the gate tables, `--text` serves text, "
                                 f"`--capture-prefill-tokens` captures prefill graphs before the clock, "
                                 f"`--cache-dtype` sets the cache's dtype)")
    varied = {name for name in settings if len({next(iter(values[name][label])) for label in labels}) > 1}
    shapes = {(m["device"], m["requests"], m["prompt_len"], m["output_len"], m["max_batch"]) for _, m in runs}
    if len(shapes) > 1:
        raise ValueError(f"--ab: the files differ in device or workload (device, requests, prompt and output "
                         f"lengths, max batch): {sorted(shapes)}")
    device, requests, prompt_len, output_len, max_batch = shapes.pop()
    tokens: dict[tuple, dict[str, list[float]]] = {}
    late: dict[tuple, dict[str, list[int]]] = {}  # graphs captured inside each run
    host: dict[tuple, dict[str, dict[str, list[float]]]] = {}
    for label, meta in runs:
        for row in meta["rows"]:
            if "error" in row or row.get("model") != "egmla":
                continue
            key = (row["variant"], row["system"], row.get("admit_batch"), row.get("prefill_graphs"), row["rate"],
                   False if "offloading the gate tables" in varied else row.get("offloaded_gate_tables", False))
            tokens.setdefault(key, {}).setdefault(label, []).append(row["output_tokens_per_s"])
            if "late_captures" in row:  # (continuous rows of files written since 2026-12-07)
                late.setdefault(key, {}).setdefault(label, []).append(row["late_captures"])
            if row.get("host_seconds") and row.get("decode_steps"):
                for phase, seconds in row["host_seconds"].items():
                    host.setdefault(key, {}).setdefault(label, {}).setdefault(phase, []).append(
                        1e6 * seconds / row["decode_steps"])
    first, last = labels[0], labels[-1]
    said = {"streaming": "requests streamed (an event per token)",
            "offloading the gate tables": "EG-MLA's gate tables offloaded to host memory",
            "serving text": "the engine making text (`--text`)",
            "capturing prefill graphs before the clock": "prefill graphs captured before the clock for prompts of up "
                                                         "to (`--capture-prefill-tokens`)",
            "the cache's dtype": "the KV cache's dtype (`--cache-dtype`)"}

    def said_value(value) -> str:
        if isinstance(value, str):  # the cache's dtype
            return value
        return ("yes" if value else "no") if isinstance(value, bool) else f"{value:,} tokens" if value else "none"

    modes = "".join(f"; {said[name]} in " + ", ".join(
        f"{label}: {said_value(next(iter(values[name][label])))}" for label in labels)
        for name in sorted(varied))
    lines = [f"A/B on {device}: {requests} requests, prompts ≤ {prompt_len}, outputs ≤ {output_len}, max batch "
             f"{max_batch}{modes}; output tokens/s per run (rounds in file order), medians, and {last} / {first}; "
             f"apart = every run of one beyond every run of the other (no: the ratio is within the runs' spread).",
             "", "| variant | system | rate | " + " | ".join(labels) + f" | {last} / {first} | apart |",
             "|---|---|---|" + "---|" * len(labels) + "---:|---|"]
    median = statistics.median
    for key in sorted(tokens, key=str):
        variant, system, admit, graphs, rate, offloaded = key
        name = system + (f" (admit {admit})" if admit else "") + ("" if graphs is None else f", prefill graphs {graphs}") + (
            ", gate tables offloaded" if offloaded else "")
        cells = [", ".join(f"{v:,.0f}" for v in tokens[key].get(label, [])) + (
            f" (**{median(tokens[key][label]):,.0f}**)" if tokens[key].get(label) else "-") for label in labels]
        ratio = (f"{median(tokens[key][last]) / median(tokens[key][first]):.2f}× | "
                 f"{runs_apart(tokens[key][last], tokens[key][first])}"
                 if tokens[key].get(first) and tokens[key].get(last) else "- | -")
        lines.append(f"| {variant} | {name} | {rate} | " + " | ".join(cells) + f" | {ratio} |")
    if any(count for per in late.values() for counts in per.values() for count in counts):
        lines += ["", "CUDA graphs captured inside the measured runs (a bucket the warm-up had not met; tens of ms "
                  "each, every request waiting): a run with one reads slower for it (`--capture-prefill-tokens` "
                  "captures them before the clock).", ""]
        for key in sorted(late, key=str):
            lines.append(f"- {key[0]}, {key[1]}: " + "; ".join(
                f"{label} " + ", ".join(str(c) for c in late[key].get(label, []))
                for label in labels))
    if host:
        phases = sorted({p for per in host.values() for phases in per.values() for p in phases})
        lines += ["", "The scheduler's host time per decode step, µs (medians over runs), by phase: "
                  + ", ".join(phases) + " ('read' includes waiting for the step's tokens).", "",
                  "| variant | system | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
        for key in sorted(host, key=str):
            variant, system, admit, graphs, _, offloaded = key
            name = system + (f" (admit {admit})" if admit else "") + (", gate tables offloaded" if offloaded else "")
            cells = [" / ".join(f"{median(host[key][label][p]):.0f}" if p in host[key].get(label, {}) else "-"
                                for p in phases) for label in labels]
            lines.append(f"| {variant} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    if args.ab:
        from egmla.bench.generate import write_table

        runs = []
        for item in args.ab:
            label, _, path = item.partition("=")
            if not label or not path:
                raise SystemExit(f"--ab {item!r}: give LABEL=JSON, e.g. --ab new=serve_new_1.json")
            runs.append((label, read_result(path, f"--ab {label}=")))
        try:
            return write_table(ab_markdown(runs), args.markdown)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    if args.report:
        if args.plot:
            plot(read_result(args.report, "--report"), args.plot)
        return report(args, markdown)
    import torch

    from egmla.bench.ab import code_identity
    from egmla.bench.generate import _random_model, write_table
    from egmla.config import preset
    from egmla.configfile import model_overrides
    from egmla.infer import GenerationEngine
    from egmla.infer.cli import cache_dtype_of, resolve_device_dtype
    from egmla.runs import atomic_write_json
    from egmla.variants import select, variant_config

    for option, value in (("--requests", args.requests), ("--prompt-len", args.prompt_len),
                          ("--output-len", args.output_len), ("--max-batch", args.max_batch)):
        if value is not None and value < 1:  # 0 would silently mean the default below
            raise ValueError(f"{option} {value}: must be >= 1; leave it out for the default")
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    on_cuda = device.type == "cuda"
    count = args.requests or (512 if on_cuda else 12)
    prompt_len = args.prompt_len or (1024 if on_cuda else 24)
    output_len = args.output_len or (256 if on_cuda else 8)
    max_batch = args.max_batch or (128 if on_cuda else 4)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"--systems {args.systems!r}: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    try:
        rates = [float(r) for r in args.rate.split(",")]
    except ValueError:
        raise ValueError(f"--rate {args.rate!r}: give comma-separated numbers (requests per second) or inf") from None
    try:
        admit_batches = [None] if args.admit_batch is None else [int(a) for a in args.admit_batch.split(",")]
    except ValueError:
        raise ValueError(f"--admit-batch {args.admit_batch!r}: give comma-separated whole numbers of rows") from None
    if any(a is not None and not 1 <= a <= max_batch for a in admit_batches):
        raise ValueError(f"--admit-batch {args.admit_batch}: each must lie in [1, --max-batch={max_batch}]")
    switches = {"on": True, "off": False}
    prefill_graphs = [None] if args.prefill_graphs is None else [switches.get(v) for v in args.prefill_graphs.split(",")]
    if None in prefill_graphs and args.prefill_graphs is not None:
        raise ValueError(f"--prefill-graphs {args.prefill_graphs!r}: give on, off or on,off")
    if args.capture_prefill_tokens < 0:
        raise ValueError(f"--capture-prefill-tokens {args.capture_prefill_tokens}: must be >= 0 (0: capture none "
                         f"before the clock)")
    if min(count, prompt_len, output_len, max_batch) < 1 or min(rates) <= 0:
        raise ValueError("--requests, --prompt-len, --output-len, --max-batch and every --rate must be > 0")
    name = args.preset if args.preset != "auto" else ("paper-base" if on_cuda else "tiny")
    base = preset(name, **{"max_seq_len": prompt_len + output_len, **model_overrides(args.overrides)})
    if prompt_len + output_len - 1 > base.max_seq_len:
        raise ValueError(f"--prompt-len {prompt_len} + --output-len {output_len} exceeds max_seq_len={base.max_seq_len}")
    device_name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    rows: list[dict] = []
    meta = {"benchmark": "serve", "device": device_name, "dtype": str(dtype), "torch": torch.__version__,
            "source": f"preset {name}, random weights", "requests": count, "prompt_len": prompt_len,
            "output_len": output_len, "max_batch": max_batch, "seed": args.seed, "prefill_chunk": args.prefill_chunk,
            "stream": args.stream, "capture_prefill_tokens": args.capture_prefill_tokens,
            "cache_dtype": args.cache_dtype, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "code": code_identity(), "rows": rows}
    print(f"egmla bench serve: {meta['source']}; {device_name}, {dtype}; {count} requests, prompts "
          f"{max(1, prompt_len // 2)}-{prompt_len}, outputs {max(1, output_len // 2)}-{output_len} tokens; "
          f"rates {rates}; TTFT, TPOT and latency as median / 90th percentile")

    def record(row: dict, work) -> None:
        try:
            row.update(summarize(work()))
        except Exception as err:  # noqa: BLE001 - a system that fails is reported, the others still run
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        rows.append(row)
        print(format_row(row), flush=True)
        if args.json_path:
            atomic_write_json(args.json_path, meta)
        if on_cuda:
            torch.cuda.empty_cache()

    tokenizer = None
    if args.text:  # the one the workload's prompts are cut with
        from egmla.bench.token_ids import text_tokenizer

        tokenizer = text_tokenizer(1, count * prompt_len, base.vocab_size)
    for rate in rates:
        requests = workload(count, rate, prompt_len, output_len, base.vocab_size, args.seed)
        for variant in select(args.variants) if {"continuous", "static"} & set(systems) else []:
            config = variant.config(base)
            model = _random_model(config, device, dtype)
            runs = [(system, admit, graphs) for system in systems if system != "transformers"
                    for admit in (admit_batches if system == "continuous" else [None]) for graphs in prefill_graphs]
            for system, admit, graphs in runs:
                engine = GenerationEngine(model, tokenizer, decode_path=args.decode_path, prefill_graphs=graphs,
                                          offload_gate_tables=args.offload_gate_tables and config.is_gated,
                                          cache_dtype=cache_dtype_of(args.cache_dtype))
                row = {"system": system, "model": "egmla", "variant": config.variant_name(), "rate": rate,
                       "max_batch": max_batch}
                if tokenizer is not None:
                    row["text"] = True
                if engine.offload is not None:
                    row["offloaded_gate_tables"] = True
                if engine.cache_dtype is not None:
                    row["cache_dtype"] = args.cache_dtype
                if graphs is not None:
                    row["prefill_graphs"] = engine.prefill_graphs
                run = (functools.partial(run_continuous, prefill_chunk=args.prefill_chunk, row=row, admit_batch=admit,
                                         stream=args.stream, capture_prefill_tokens=args.capture_prefill_tokens)
                       if system == "continuous" else run_static)

                def measured(run=run, engine=engine, row=row):
                    run(engine, requests, max_batch)  # warm-up: kernels, graphs of the batch sizes met
                    timings = run(engine, requests, max_batch)
                    row["decode_path"] = engine.decode_path  # static: the last call's (auto chooses per call)
                    if engine.offload is not None:
                        row["gate_table_mb_off_device"] = engine.offload.bytes_saved() / 1e6
                    return timings

                record(row, measured)
                if engine.offload is not None:
                    engine.offload.restore()  # the next run's engine builds its own
                engine.release()
            del model
        if "transformers" in systems:
            from egmla.bench.hf_anchors import anchor_model

            anchor = variant_config("mha", base)
            row = {"system": "transformers", "model": "transformers LlamaForCausalLM", "variant": anchor.variant_name(),
                   "rate": rate, "decode_path": "paged (continuous batching)"}

            def measured_anchor():
                model = anchor_model("llama", anchor, base.max_seq_len, device, dtype)
                run_transformers(model, requests, max_batch, base.max_seq_len, row)
                return run_transformers(model, requests, max_batch, base.max_seq_len, row)

            record(row, measured_anchor)
    print()
    if args.plot:
        plot(meta, args.plot)
    return write_table(markdown(meta), args.markdown)


def plot(meta: dict, path: str) -> None:
    """Output tokens/s per (rate, variant), one bar per system, log scale, each labelled with its multiple of
    transformers' in the same run: the table of `markdown` as a picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in meta["rows"] if "error" not in r]
    anchor = {r["rate"]: r["output_tokens_per_s"] for r in rows if r["system"] == "transformers"}
    groups = list(dict.fromkeys((r["rate"], r["variant"]) for r in rows if r["system"] != "transformers"))
    systems = list(dict.fromkeys(_system_label(r) for r in rows if r["system"] != "transformers"))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.8 * len(groups) + 4), 5.5 + 0.12 * len(systems)))
    width = 0.8 / max(len(systems), 1)
    for index, system in enumerate(systems):
        xs, ys, labels = [], [], []
        for position, (rate, variant) in enumerate(groups):
            row = next((r for r in rows if (r["rate"], r["variant"]) == (rate, variant) and _system_label(r) == system
                        and r["system"] != "transformers"), None)
            if row:
                xs.append(position + (index - (len(systems) - 1) / 2) * width)
                ys.append(row["output_tokens_per_s"])
                labels.append(f"{row['output_tokens_per_s'] / anchor[rate]:.0f}×" if rate in anchor else "")
        bars = ax.bar(xs, ys, width, label=system)
        for bar, label in zip(bars, labels):
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    for rate, value in anchor.items():
        ax.axhline(value, color="gray", linestyle="--", linewidth=1,
                   label=f"transformers' continuous batching, Llama ({_rate_text(rate)}): {value:,.0f}")
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 1.6)
    ax.set_xticks(range(len(groups)), [f"{variant}\n{_rate_text(rate)}" for rate, variant in groups])
    ax.set_ylabel("output tokens/s (log scale); label: × transformers'")
    ax.set_title(f"Serving {meta['requests']} requests, {meta['device']}, {meta['dtype'].replace('torch.', '')}\n"
                 f"max batch {meta['max_batch']}, {meta['source']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below: never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def _system_label(row: dict) -> str:
    settings = ([f"admit {row['admit_batch']}"] if "admit_batch" in row else []) + (
        [f"prefill {'graphs' if row['prefill_graphs'] else 'eager'}"] if "prefill_graphs" in row else []) + (
        ["gate tables offloaded"] if row.get("offloaded_gate_tables") else []) + (["text"] if row.get("text") else []) + (
        [f"{row['cache_dtype']} cache"] if row.get("cache_dtype") else [])
    return row["system"] + (f" ({', '.join(settings)})" if settings else "")


def format_row(row: dict) -> str:
    """One system's run, as printed while the benchmark runs (egmla/bench/generate.format_row's layout): throughput,
    then TTFT, TPOT and latency as median / 90th percentile, then the decode path and the scheduler's counters."""
    head = f"{row['variant']:<22} {_system_label(row):<28} {_rate_text(row['rate']):>12}"
    if "error" in row:
        return f"{head}  error: {row['error']}"
    line = (f"{head}  {row['output_tokens_per_s']:9.1f} tok/s  {row['requests_per_s']:8.2f} req/s  "
            f"TTFT {row['ttft_ms_p50']:8.1f} / {row['ttft_ms_p90']:8.1f} ms  "
            f"TPOT {_tpot(row['tpot_ms_p50']):>7} / {_tpot(row['tpot_ms_p90']):>7} ms  "
            f"latency {row['latency_s_p50']:7.2f} / {row['latency_s_p90']:7.2f} s  {row['decode_path']}")
    if "decode_steps" in row:  # egmla's scheduler
        line += f", {row['decode_steps']} steps, {row['prefill_calls']} prefills, busy {row['busy_fraction']:.0%}"
        if row.get("late_captures"):
            line += f", {row['late_captures']} graphs captured in the run"
    if "gate_table_mb_off_device" in row:
        line += f", gate tables {row['gate_table_mb_off_device']:.1f} MB off the device"
    return line


def _tpot(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f}"


def _rate_text(rate: float, unit: bool = True) -> str:
    return "all at once" if math.isinf(rate) else f"{rate:g}" + (" req/s" if unit else "")


def markdown(meta: dict) -> str:
    """Per rate: every system's throughput (and its multiple of transformers' continuous batching on Llama in the
    same run) and latencies."""
    lines = [f"Serving {meta['requests']} requests, {meta['device']}, {meta['dtype']}, torch {meta['torch']}: "
             f"{meta['source']}; prompts {max(1, meta['prompt_len'] // 2)}-{meta['prompt_len']} and outputs "
             f"{max(1, meta['output_len'] // 2)}-{meta['output_len']} tokens (uniform), Poisson arrivals, greedy; "
             f"at most {meta['max_batch']} requests generating at once (max batch; '-': transformers' own sizing, where "
             f"its version has no max_requests_per_batch); egmla's continuous requests "
             f"{'streamed (an event per token)' if meta.get('stream', True) else 'not streamed (results only)'}. "
             f"Run {meta['time']}.", "",
             "| rate (req/s) | system | model | variant | decode path | max batch | output tokens/s | × transformers | "
             "TTFT ms p50 / p90 | TPOT ms p50 / p90 | latency s p50 / p90 |",
             "|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    anchor = {r["rate"]: r["output_tokens_per_s"] for r in meta["rows"]
              if r["system"] == "transformers" and "error" not in r}
    for row in meta["rows"]:
        head = (f"| {_rate_text(row['rate'], unit=False)} | {_system_label(row)} | {row['model']} | {row['variant']} | "
                f"{row.get('decode_path', '')} | {row.get('max_batch') or '-'} |")
        if "error" in row:
            lines.append(f"{head} failed: {row['error']} | | | | |")
            continue
        ratio = f"{row['output_tokens_per_s'] / anchor[row['rate']]:.2f}×" if row["rate"] in anchor else "-"
        lines.append(f"{head} {row['output_tokens_per_s']:,.0f} | {ratio} | {row['ttft_ms_p50']:,.1f} / "
                     f"{row['ttft_ms_p90']:,.1f} | {_tpot(row['tpot_ms_p50'])} / {_tpot(row['tpot_ms_p90'])} | "
                     f"{row['latency_s_p50']:.2f} / {row['latency_s_p90']:.2f} |")
    notes = [meta.get("note"), meta.get("before", {}).get("note")]  # added to a result file by hand, if any
    lines += [f"\nNote: {note}." for note in notes if note]
    phased = [row for row in meta["rows"] if "host_seconds" in row and "error" not in row]
    if phased:
        lines += ["", "Where the scheduler's thread spent the run (host seconds per phase, `SchedulerStats.host_seconds`: "
                  "decode = queue a step and sample, read = wait for its tokens and stream them, admit, prefill; "
                  "the rest of the run it was idle or between phases):", "",
                  "| rate (req/s) | system | variant | run s | busy | decode | read | admit | prefill | decode steps | "
                  "prefill calls |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in phased:
            host = row["host_seconds"]
            lines.append(f"| {_rate_text(row['rate'], unit=False)} | {_system_label(row)} | {row['variant']} | "
                         f"{row['seconds']:.3f} | {row['busy_fraction']:.0%} | "
                         + " | ".join(f"{host.get(p, 0.0):.3f}" for p in ("decode", "read", "admit", "prefill"))
                         + f" | {row['decode_steps']} | {row['prefill_calls']}"
                         + (f" ({row['prefill_graph_calls']} graphs)" if row.get("prefill_graph_calls") else "") + " |")
        captured = [row for row in phased if row.get("late_captures")]
        if captured:
            lines += ["", "CUDA graphs captured inside the measured run (buckets the warm-up had not met; tens of ms "
                      "each, every request waiting): " + ", ".join(
                          f"{_system_label(row)} {row['variant']} at {_rate_text(row['rate'])}: {row['late_captures']}"
                          for row in captured) + "."]
    return "\n".join(lines) + "\n"
