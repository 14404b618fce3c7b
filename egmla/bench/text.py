"""The host cost of a server's text: per row and decode step, what turning token ids into text takes.

The scheduler hands every row's new token to its request's `SequenceState.add` on the host, once per decode step
(`Scheduler._process`). With a tokenizer, that is incremental detokenization and stop-string matching, on the same
thread that launches the next step, so at small GPU steps it is part of what binds a server. `egmla bench serve`
sends token ids to an engine without a tokenizer and does not see it; this benchmark times it alone, per mode:

    no tokenizer                       token ids only (what `egmla bench serve` measures)
    streamed, two decodes per token    every request before 2026-12-06 (vLLM's offsets: two decodes a token)
    streamed, DecodeStream             a streamed request now (tokenizers' own incremental decoder, one call)
    streamed, one stop string          the same, with a stop string to watch
    not streamed                       a request that reads only its result: no text per token, one decode at the end

Rows x steps of real English text (windows of the embedded corpus), each row fed its own window a token a step;
medians over --repeats of the µs per row and step (the final decodes included, spread over the steps).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

MODES = ("no tokenizer", "streamed, two decodes per token", "streamed, DecodeStream", "streamed, one stop string",
         "not streamed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="run directory whose tokenizer.json to use (default: a BPE of --vocab-size trained on "
                                 "a sample of the embedded corpus, as the benchmarks' random-weight models use)")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary of the trained tokenizer (no --run)")
    p.add_argument("--rows", type=int, default=128, help="rows decoding at once (a server's max batch)")
    p.add_argument("--steps", type=int, default=256, help="decode steps, i.e. tokens generated per row")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per mode (median reported)")
    p.add_argument("--out", metavar="JSON", help="write the rows here")
    p.add_argument("--markdown", nargs=2, metavar=("JSON", "MD"), help="write a result file's table and exit")


def token_windows(tokenizer, rows: int, steps: int) -> list[list[int]]:
    """Row r's generated tokens: the r-th window of `steps` ids of the embedded corpus."""
    from egmla.data.corpora import embedded_documents

    ids: list[int] = []
    for _, text in embedded_documents():
        ids += tokenizer.encode(text).ids
        if len(ids) >= rows * steps:
            break
    if len(ids) < rows * steps:
        raise ValueError(f"--rows {rows} x --steps {steps}: the embedded corpus has only {len(ids)} tokens here")
    return [ids[r * steps:(r + 1) * steps] for r in range(rows)]


def time_mode(mode: str, tokenizer, windows: list[list[int]], stop: str) -> float:
    """Seconds for every row's tokens through `SequenceState.add`, step by step as the scheduler feeds them."""
    from egmla.infer.engine import SequenceState
    from egmla.infer.text import IncrementalDetokenizer

    steps = len(windows[0])
    sequences = [SequenceState(r, [0], None if mode == "no tokenizer" else tokenizer,
                           [stop] if mode == "streamed, one stop string" else [],
                           text_per_token=mode != "not streamed") for r in range(len(windows))]
    if mode == "streamed, two decodes per token":
        for sequence in sequences:
            sequence.detokenizer = IncrementalDetokenizer(tokenizer, use_stream=False)
    start = time.perf_counter()
    for step in range(steps):
        for sequence, window in zip(sequences, windows):
            if sequence.result.finish_reason is None:  # a row that met its stop string is retired
                sequence.add(window[step], None, steps, steps + 2)
    return time.perf_counter() - start


def main(args) -> int:
    if args.markdown:
        markdown(*args.markdown)
        return 0
    for option, value in (("--rows", args.rows), ("--steps", args.steps), ("--repeats", args.repeats)):
        if value < 1:  # checked before the tokenizer is trained: --rows 0 was an IndexError after it
            raise ValueError(f"{option} {value}: must be >= 1")
    if args.run:
        from egmla.runs import load_tokenizer

        tokenizer, source = load_tokenizer(args.run), f"{args.run}/tokenizer.json"
    else:
        from egmla.bench.token_ids import TOKENIZER_SAMPLE_CHARS, _chunks, _documents
        from egmla.data.tokenizer import train_tokenizer

        texts = _documents("embedded", TOKENIZER_SAMPLE_CHARS)
        tokenizer = train_tokenizer(list(_chunks(texts)), args.vocab_size)
        source = f"byte-level BPE of {args.vocab_size} trained on the embedded corpus"
    windows = token_windows(tokenizer, args.rows, args.steps)
    stop = "\n\n\n\n"  # watched and never met in this text: every token still goes through the matcher
    rows = []
    for mode in MODES:
        seconds = [time_mode(mode, tokenizer, windows, stop) for _ in range(args.repeats)]
        us = 1e6 * statistics.median(seconds) / (args.rows * args.steps)
        rows.append({"mode": mode, "us_per_row_step": us, "ms_per_step": us * args.rows / 1000,
                     "runs_s": seconds})
        print(f"{mode:>34}: {us:6.2f} µs per row and step, {us * args.rows / 1000:.3f} ms per step of "
              f"{args.rows} rows", flush=True)
    import platform

    import tokenizers

    meta = {"rows": args.rows, "steps": args.steps, "repeats": args.repeats, "tokenizer": source,
            "tokenizers": tokenizers.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "time": time.strftime("%Y-%m-%d %H:%M")}
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


def markdown(json_path: str, md_path: str) -> None:
    from egmla.bench.options import read_result

    data = read_result(json_path, "--markdown")
    meta, rows = data["meta"], data["rows"]
    base = next(r for r in rows if r["mode"] == "streamed, two decodes per token")
    lines = [f"<!-- generated by `egmla bench text --markdown {json_path} {md_path}` -->",
             f"Host time of a server's text per row and decode step (`SequenceState.add`, as `Scheduler._process` "
             f"calls it): {meta['rows']} rows x {meta['steps']} tokens of English, median of {meta['repeats']}; "
             f"{meta['tokenizer']}; tokenizers {meta['tokenizers']}, Python {meta['python']}, run {meta['time']}.", "",
             "| mode | µs per row and step | ms per step of all rows | × two decodes per token |",
             "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['us_per_row_step']:.2f} | {r['ms_per_step']:.3f} | "
                     f"{r['us_per_row_step'] / base['us_per_row_step']:.2f} |")
    Path(md_path).write_text("\n".join(lines) + "\n")
