"""`egmla bench serve` on the CPU (tiny preset): every system serves the whole workload, each request exactly its
drawn output length, and the report regenerates the table from the JSON."""
import json
import math

import pytest

from egmla.bench import cli
from egmla.bench.serve import format_row, markdown, workload


def test_workload_is_drawn_from_its_seed():
    first, again = workload(6, 5.0, 24, 8, 300, seed=1), workload(6, 5.0, 24, 8, 300, seed=1)
    assert first == again and workload(6, 5.0, 24, 8, 300, seed=2) != first
    assert all(12 <= len(r.prompt) <= 24 and 4 <= r.output_len <= 8 for r in first)
    assert [r.arrival for r in first] == sorted(r.arrival for r in first) and first[-1].arrival > 0
    assert {r.arrival for r in workload(6, math.inf, 24, 8, 300, seed=1)} == {0.0}


def test_every_system_serves_every_request_its_output_length(tmp_path):
    out, table = tmp_path / "serve.json", tmp_path / "serve.md"
    assert cli.run("serve", ["--requests", "6", "--rate", "inf,40", "--variants", "egmla-kv64",
                             "--max-batch", "3", "--json", str(out), "--markdown", str(table)]) == 0
    meta = json.loads(out.read_text())
    expected = {rate: sum(r.output_len for r in workload(6, rate, meta["prompt_len"], meta["output_len"], 8192, 0))
                for rate in (math.inf, 40.0)}
    rows = meta["rows"]
    assert sorted((r["system"], r["rate"]) for r in rows) == sorted(
        (system, rate) for system in ("continuous", "static", "transformers") for rate in expected)
    for row in rows:
        assert "error" not in row, row
        assert row["output_tokens"] == expected[row["rate"]], row
        assert row["ttft_ms_p50"] <= row["ttft_ms_p90"] and row["latency_s_p50"] > 0
    continuous = [r for r in rows if r["system"] == "continuous"]
    assert all(r["decode_steps"] > 0 and r["prefill_calls"] > 0 and 0 < r["busy_fraction"] <= 1 for r in continuous)
    for row in continuous:  # the thread's time by phase: within its busy time, decode and prefill both seen
        host = row["host_seconds"]
        assert host["decode"] > 0 and host["prefill"] > 0
        # the phases lie inside the thread's busy time; both leave out the warm-up step. (Not busy_fraction x
        # seconds: the fraction is of the span up to the thread's stop, which a loaded machine can stretch past the
        # last result: this test failed that way beside another test run.)
        assert sum(host.values()) <= row["busy_seconds"] * 1.01 + 1e-3
    assert table.read_text() == markdown(meta)
    assert "× transformers" in table.read_text() and "1.00×" in table.read_text()
    assert "Where the scheduler's thread spent the run" in table.read_text()
    picture = tmp_path / "serve.png"  # drawn again from the result file
    assert cli.run("serve", ["--report", str(out), "--plot", str(picture)]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_admit_batch_values_each_run_a_continuous_row(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert cli.run("serve", ["--requests", "6", "--variants", "mla-kv64", "--systems", "continuous",
                             "--max-batch", "4", "--admit-batch", "1,4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["system"], r["admit_batch"]) for r in rows] == [("continuous", 1), ("continuous", 4)]
    assert all("error" not in r for r in rows)
    # printed as it runs: one aligned line per row, not its dict
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("MLA kv64")]
    assert printed == [format_row(row) for row in rows] and not any("{" in line for line in printed)
    assert printed[0].startswith("MLA kv64               continuous (admit 1)          all at once  ")
    assert " tok/s " in printed[0] and " req/s  TTFT " in printed[0] and f"{rows[0]['decode_steps']} steps" in printed[0]


def test_a_row_prints_as_one_line_with_units():
    anchor = {"system": "transformers", "model": "transformers LlamaForCausalLM", "variant": "MHA", "rate": 40.0,
              "decode_path": "paged (continuous batching)", "max_batch": 4, "seconds": 1.5, "output_tokens": 48,
              "output_tokens_per_s": 32.0, "requests_per_s": 4.0, "ttft_ms_p50": 12.25, "ttft_ms_p90": 30.5,
              "tpot_ms_p50": 3.125, "tpot_ms_p90": 4.5, "latency_s_p50": 0.25, "latency_s_p90": 0.5}
    assert format_row(anchor) == (
        "MHA                    transformers                     40 req/s       32.0 tok/s      4.00 req/s  "
        "TTFT     12.2 /     30.5 ms  TPOT    3.12 /    4.50 ms  latency    0.25 /    0.50 s  paged (continuous batching)")
    failed = {"system": "static", "model": "egmla", "variant": "EG-MLA kv64", "rate": math.inf, "error": "OOM"}
    assert format_row(failed).endswith("all at once  error: OOM")
    with pytest.raises(ValueError, match="--admit-batch 5"):
        cli.run("serve", ["--requests", "2", "--max-batch", "4", "--admit-batch", "5"])


@pytest.mark.parametrize("option", ["--requests", "--prompt-len", "--output-len", "--max-batch"])
def test_a_zero_size_is_refused_not_taken_for_the_default(option):
    with pytest.raises(ValueError, match=f"{option} 0: must be >= 1; leave it out for the default"):
        cli.run("serve", [option, "0"])


def test_offloaded_gate_tables_serve_every_request_and_are_labelled(tmp_path):
    out = tmp_path / "serve.json"
    assert cli.run("serve", ["--requests", "4", "--variants", "mla-kv64,egmla-kv64", "--systems", "continuous",
                             "--max-batch", "2", "--offload-gate-tables", "--json", str(out)]) == 0
    meta = json.loads(out.read_text())
    rows = {r["variant"]: r for r in meta["rows"]}
    assert all("error" not in r for r in rows.values())
    assert rows["EG-MLA kv64"]["offloaded_gate_tables"] and rows["EG-MLA kv64"]["gate_table_mb_off_device"] > 0
    assert "offloaded_gate_tables" not in rows["MLA kv64"]  # no tables to offload
    assert "continuous (admit 1, gate tables offloaded)" in markdown(meta)


def test_ab_table_of_code_versions(tmp_path):
    """`egmla bench serve --ab LABEL=JSON ...`: medians per row and label, the last label over the first; two labels
    of one code, or files of different workloads, are refused."""
    import pytest

    from egmla.bench.serve import ab_markdown

    def meta(code, rates, requests=256):
        rows = [{"model": "egmla", "variant": "MLA kv64", "system": "continuous", "admit_batch": 16, "rate": "inf",
                 "output_tokens_per_s": rates[0], "decode_steps": 100,
                 "host_seconds": {"decode": 0.03, "read": 0.05}},
                {"model": "egmla", "variant": "MLA kv64", "system": "static", "rate": "inf",
                 "output_tokens_per_s": rates[1]},
                {"model": "transformers", "variant": "MHA", "system": "transformers", "rate": "inf",
                 "output_tokens_per_s": 1000.0}]
        return {"device": "cpu", "requests": requests, "prompt_len": 64, "output_len": 8, "max_batch": 8,
                "code": {"source_sha256": code}, "rows": rows}

    runs = [("old", meta("a", (100.0, 300.0))), ("new", meta("b", (150.0, 300.0))),
            ("old", meta("a", (120.0, 310.0))), ("new", meta("b", (170.0, 290.0)))]
    table = ab_markdown(runs)
    # apart: `new`'s runs all beyond `old`'s on the continuous row; the static rows' ranges overlap
    assert "| MLA kv64 | continuous (admit 16) | inf | 100, 120 (**110**) | 150, 170 (**160**) | 1.45× | yes |" in table
    assert "| MLA kv64 | static | inf | 300, 310 (**305**) | 300, 290 (**295**) | 0.97× | no |" in table
    assert "| MLA kv64 | continuous (admit 16) | 300 / 500 | 300 / 500 |" in table  # decode / read µs per step
    assert "transformers" not in table.split("\n", 2)[2]  # egmla's rows only
    with pytest.raises(ValueError, match="same code"):
        ab_markdown([("old", meta("a", (1.0, 1.0))), ("new", meta("a", (2.0, 2.0)))])
    with pytest.raises(ValueError, match="differ in device or workload"):
        ab_markdown([("old", meta("a", (1.0, 1.0))), ("new", meta("b", (2.0, 2.0), requests=512))])
    # one change at a time: the code, or whether the requests were streamed (a file without "stream" streamed: the
    # scheduler made every token's event before the option)
    quiet = {**meta("b", (2.0, 2.0)), "stream": False}
    with pytest.raises(ValueError, match="differ in code and in streaming: compare one change"):
        ab_markdown([("old", meta("a", (1.0, 1.0))), ("new", quiet)])
    assert "1.45×" in ab_markdown([runs[0], ("new", {**meta("b", (145.0, 300.0)), "stream": True})])
    modes = ab_markdown([("streamed", meta("b", (100.0, 300.0))), ("quiet", {**meta("b", (110.0, 300.0)), "stream": False})])
    assert "requests streamed (an event per token) in streamed: yes, quiet: no" in modes and "1.10×" in modes
    with pytest.raises(ValueError, match="'x' mixes files that differ in streaming"):
        ab_markdown([("x", meta("b", (1.0, 1.0))), ("x", quiet), ("y", meta("a", (1.0, 1.0)))])
    # the gate tables offloaded or not, one code: the EG-MLA rows matched across the two labels
    def egmla(offloaded, rate):
        rows = [{**row, "variant": "EG-MLA kv64", **({"offloaded_gate_tables": True} if offloaded else {})}
                for row in meta("b", (rate, 300.0))["rows"][:2]]
        return {**meta("b", (rate, 300.0)), "rows": rows}

    offload = ab_markdown([("on", egmla(False, 100.0)), ("off", egmla(True, 97.0)),
                           ("on", egmla(False, 102.0)), ("off", egmla(True, 99.0))])
    assert "EG-MLA's gate tables offloaded to host memory in on: no, off: yes" in offload
    assert "| EG-MLA kv64 | continuous (admit 16) | inf | 100, 102 (**101**) | 97, 99 (**98**) | 0.97× |" in offload
    with pytest.raises(ValueError, match="differ in code and in offloading the gate tables"):
        ab_markdown([("on", egmla(False, 100.0)), ("off", {**egmla(True, 97.0), "code": {"source_sha256": "c"}})])
    # prefill graphs captured before the clock or not, one code; graphs captured inside a run are listed per run
    def captured(tokens, late, rate):
        base = meta("b", (rate, 300.0))
        return {**base, "capture_prefill_tokens": tokens,
                "rows": [{**base["rows"][0], "late_captures": late}, *base["rows"][1:]]}

    capture = ab_markdown([("cap0", captured(0, 2, 90.0)), ("cap1k", captured(1024, 0, 100.0)),
                           ("cap0", captured(0, 0, 99.0)), ("cap1k", captured(1024, 0, 101.0))])
    assert "(`--capture-prefill-tokens`) in cap0: none, cap1k: 1,024 tokens" in capture
    assert "- MLA kv64, continuous: cap0 2, 0; cap1k 0, 0" in capture and "1.06×" in capture
    assert "captured inside" not in ab_markdown(runs)  # files without the count: nothing said
    with pytest.raises(ValueError, match="differ in code and in capturing prefill graphs before the clock"):
        ab_markdown([("cap0", captured(0, 0, 1.0)), ("cap1k", {**captured(1024, 0, 1.0), "code": {"source_sha256": "c"}})])
    # the cache's dtype (`--cache-dtype`), one code: files from before the option ran the model's dtype
    def cached(dtype, rate):
        base = meta("b", (rate, 300.0))
        return {**base, **({"cache_dtype": dtype} if dtype else {}),
                "rows": [{**row, **({"cache_dtype": dtype} if dtype else {})} for row in base["rows"]]}

    fp8 = ab_markdown([("bf16", cached(None, 100.0)), ("fp8", cached("fp8", 125.0))])
    assert "the KV cache's dtype (`--cache-dtype`) in bf16: auto, fp8: fp8" in fp8 and "1.25×" in fp8
    with pytest.raises(ValueError, match="differ in code and in the cache's dtype"):
        ab_markdown([("bf16", cached("auto", 1.0)), ("fp8", {**cached("fp8", 1.0), "code": {"source_sha256": "c"}})])


def test_text_serving_serves_every_request_and_compares_with_token_ids(tmp_path):
    """--text: the engine gets the prompts' tokenizer, so requests make text (streamed: per token; else once at the
    end); every request still gets its output length, rows are labelled, and --ab compares one code with and without."""
    from egmla.bench.serve import ab_markdown

    runs = {}
    for name, extra in (("ids", []), ("text", ["--text"]), ("streamed", ["--text", "--stream"])):
        out = tmp_path / f"{name}.json"
        assert cli.run("serve", ["--requests", "4", "--variants", "mla-kv64", "--systems", "continuous,static",
                                 "--max-batch", "2", "--json", str(out), *extra]) == 0
        runs[name] = json.loads(out.read_text())
    expected = sum(r.output_len for r in workload(4, math.inf, runs["ids"]["prompt_len"], runs["ids"]["output_len"],
                                                   8192, 0))
    for name, meta in runs.items():
        for row in meta["rows"]:
            assert "error" not in row and row["output_tokens"] == expected, (name, row)
            assert row.get("text", False) == (name != "ids")
    assert "continuous (admit 1, text)" in markdown(runs["text"])
    table = ab_markdown([("ids", runs["ids"]), ("text", runs["text"])])
    assert "the engine making text (`--text`) in ids: no, text: yes" in table


def test_tpot_of_a_workload_of_one_token_outputs_is_absent_not_zero():
    """With every output one token long there is no time per output token after the first: it was reported as
    0.00 ms, a figure no system reached."""
    from egmla.bench.serve import Timing, summarize

    summary = summarize([Timing(0.0, 0.5, 0.5, 1), Timing(0.1, 0.6, 0.6, 1)])
    assert summary["tpot_ms_p50"] is None and summary["tpot_ms_p90"] is None
    row = {"system": "static", "model": "egmla", "variant": "MHA", "rate": math.inf, "decode_path": "kernel",
           "max_batch": 4, **summary}
    assert "TPOT       - /       - ms" in format_row(row)
    meta = {"requests": 2, "device": "cpu", "dtype": "fp32", "torch": "x", "source": "s", "prompt_len": 8,
            "output_len": 1, "max_batch": 4, "time": "t", "rows": [row]}
    assert "| - / - |" in markdown(meta)
    assert summarize([Timing(0.0, 0.5, 0.9, 3)])["tpot_ms_p50"] == pytest.approx(200.0)


@pytest.mark.parametrize("argv", [["serve", "--ab", "old=NAME", "--ab", "new=NAME"], ["serve", "--report", "NAME"],
                                  ["generate", "--report", "NAME"], ["generate", "--ab", "--report", "old=NAME"],
                                  ["train", "--summary", "--report", "NAME"]])
@pytest.mark.parametrize("content, says", [(None, "no such file"), ("{not json", "not JSON"),
                                           ("[1, 2]", "a JSON list, not a result object")])
def test_a_result_file_that_cannot_be_read_is_named_in_one_line(tmp_path, capsys, argv, content, says):
    """A result file given to a table-only command (--report, --ab) that is missing, not JSON or not an object: exit 2
    and one line naming the option, the path and what to give (no traceback)."""
    from egmla.cli import main

    path = tmp_path / "result.json"
    if content is not None:
        path.write_text(content)
    assert main(["bench", *[item.replace("NAME", str(path)) for item in argv]]) == 2
    error = capsys.readouterr().err
    assert f"{path}: {says}" in error and "Traceback" not in error
    assert "--json" in error and error.count("\n") == 1
