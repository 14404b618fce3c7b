"""`egmla bench generate` on CPU at the tiny preset: egmla's rows beside transformers' anchors, the ratio
column, a fill-memory run at the planner's batch, the step profile, and the merged report."""
import json
import os
from pathlib import Path

import pytest

from egmla.bench.cli import run
from egmla.bench.generate import fill_batch, report
from egmla.variants import variant_config


def test_rows_anchors_profile_and_report(tmp_path, capsys):
    path = tmp_path / "gen.json"
    assert run("generate", ["--preset", "tiny", "--variants", "mla-kv64", "--paths", "absorbed", "--batch-sizes",
                            "1,3", "--prompt-len", "8", "--new-tokens", "3", "--repeats", "1", "--compare-hf",
                            "--profile", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert {(r["model"], r["batch"]) for r in rows} == {
        (m, b) for m in ("egmla", "transformers LlamaForCausalLM", "transformers DeepseekV3ForCausalLM") for b in (1, 3)}
    assert all("error" not in r and r["step_ms_median"] > 0 for r in rows)
    assert all(r["profile_kernel_ms_per_step"] > 0 for r in rows if r["model"] == "egmla")
    for r in (r for r in rows if r["model"] == "egmla"):  # every kernel, adding up to the step's kernel time
        assert abs(sum(ms for _, ms, _ in r["profile_kernels"]) - r["profile_kernel_ms_per_step"]) < 1e-6
        assert sum(n for *_, n in r["profile_kernels"]) == r["profile_kernels_per_step"]
    table = capsys.readouterr().out
    assert "| transformers LlamaForCausalLM | MHA | static cache | 3 |" in table and "| 1.00 |" in table
    report([str(path)], str(tmp_path / "gen.md"), str(tmp_path / "gen.png"))
    assert "Profile of the same decode step" in (tmp_path / "gen.md").read_text()
    assert (tmp_path / "gen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("sync_clock", [False, True])
def test_anchor_clock_marks_the_first_forward_and_each_step_then_unhooks(monkeypatch, sync_clock):
    """prefill = first forward's start (after generate() set up its static cache) to the first logits; one mark per
    step after; the forward hook gone after each generate, also after one that failed."""
    import torch

    from egmla.bench import hf_anchors
    from tests.conftest import small_config

    model = hf_anchors.anchor_model("llama", variant_config("mha", small_config()), 16, "cpu", torch.float32)
    clocks = []
    real = hf_anchors._StepClock
    monkeypatch.setattr(hf_anchors, "_StepClock", lambda *a, **k: clocks.append(real(*a, **k)) or clocks[-1])
    timed = hf_anchors.time_anchor(model, [[1, 2, 3, 4]] * 2, new_tokens=4, repeats=2, sync_clock=sync_clock)
    assert [len(clock.marks) for clock in clocks] == [5] * 3  # first forward + 4 logits, per generate
    assert [len(clock.seconds()) for clock in clocks] == [4] * 3
    assert timed["prefill_ms"] > 0 and timed["step_ms_median"] > 0 and not model._forward_pre_hooks
    with pytest.raises(Exception):
        hf_anchors.time_anchor(model, [[1, 2, 3, 10 ** 6]], new_tokens=2, repeats=0)  # an id past the vocabulary
    assert not model._forward_pre_hooks


def result_file(path, rows, **meta):
    base = dict(benchmark="generate", device="NVIDIA H200", dtype="torch.bfloat16", torch="2.11", source="preset x",
                prompt_len=2048, new_tokens=32, fill_memory_gb=None, context=None, repeats=1)
    path.write_text(json.dumps({**base, **meta, "rows": rows}))
    return str(path)


def gen_row(model, variant, batch, tokens_per_s):
    return dict(model=model, variant=variant, decode_path="kernel" if model == "egmla" else "static cache",
                batch=batch, step_ms_median=batch / tokens_per_s * 1e3, step_ms_p90=1.0, decode_tokens_per_s=tokens_per_s,
                prefill_ms=1.0)


def test_a_path_no_variant_has_is_refused_not_an_empty_table(capsys):
    """--paths bogus (or absorbed for MHA alone) printed a table without rows and exited 0."""
    for variants, paths in (("mla-kv64", "bogus"), ("mha", "absorbed"), ("mha,mla-kv64", "absorbed,gate-table")):
        with pytest.raises(ValueError, match=r"--paths '.+': no variant benchmarked here has '(bogus|absorbed|gate-table)'"
                                             r"; choose from .*naive.*, or auto or all"):
            run("generate", ["--preset", "tiny", "--variants", variants, "--paths", paths, "--batch-sizes", "1",
                             "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1"])
    assert "| model |" not in capsys.readouterr().out


def test_merged_runs_divide_each_row_by_the_llama_of_its_own_run(tmp_path):
    """Llama's step moves between processes: a row of one run must not be divided by another run's Llama. A run
    without its own Llama gets no ratio; files of another dtype or torch are refused."""
    from egmla.bench.generate import markdown, merge_runs
    from egmla.bench.summary import summary_markdown

    llama = "transformers LlamaForCausalLM"
    first = result_file(tmp_path / "a.json", [gen_row("egmla", "MLA kv64", 32, 2000.0), gen_row(llama, "MHA", 32, 1000.0)])
    second = result_file(tmp_path / "b.json", [gen_row("egmla", "EG-MLA kv64", 32, 900.0), gen_row(llama, "MHA", 32, 500.0)])
    alone = result_file(tmp_path / "c.json", [gen_row("egmla", "EG-MLA kv64 gate-bias", 32, 800.0)])
    metas = [json.loads(Path(p).read_text()) for p in (first, second, alone)]
    merged = {**metas[0], "rows": merge_runs(metas)}
    table = markdown(merged)
    assert "| egmla | MLA kv64 | kernel | 32 | 16.00 | 2,000 | 2.00 |" in table
    assert "| egmla | EG-MLA kv64 | kernel | 32 | 35.56 | 900 | 1.80 |" in table  # against 500, its own run's
    assert "| egmla | EG-MLA kv64 gate-bias | kernel | 32 | 40.00 | 800 | - |" in table
    summary = summary_markdown([merged])
    assert "| 2.00× | 1.80× | – |" in summary
    assert [r["run"] for r in merge_runs([merged, metas[0]])] == [0, 0, 1, 1, 2, 3, 3]  # tags kept, then offset
    other = result_file(tmp_path / "d.json", [gen_row(llama, "MHA", 32, 1.0)], dtype="torch.float32")
    with pytest.raises(ValueError, match="differ in dtype"):
        report([first, other], None)


def test_fill_memory_runs_the_planners_batch(tmp_path):
    path = tmp_path / "fill.json"
    assert run("generate", ["--preset", "tiny", "--variants", "egmla-kv64", "--paths", "grouped", "--fill-memory",
                            "0.002", "--context", "24", "--new-tokens", "3", "--repeats", "1", "--json", str(path)]) == 0
    meta = json.loads(path.read_text())
    [row] = meta["rows"]
    import torch

    expected = fill_batch(variant_config("egmla-kv64", "tiny"), "grouped", 0.002, 24, torch.float32)
    assert row["batch"] == expected > 32 and "error" not in row
    # every distinct window of the text up to FILL_PROMPTS (it once was 32, copied to all rows)
    assert meta["distinct_prompts"] == 1024 > row["batch"]
    assert row["cache_mb"] <= 2.0


def test_fp8_cache_rows_fill_twice_the_batch_and_get_their_own_column(tmp_path, capsys):
    """--cache-dtypes auto,fp8,fp8-keep-rope: each MLA configuration three times, the fp8 ones at their own (larger)
    full-memory batches and in their own summary columns; EG-MLA's too (its token ids stay int32, so less than MLA's
    gain). fp8-keep-rope keeps MLA's RoPE keys (32 of 96 values a layer at tiny) in the model's dtype (fp32 here)."""
    from egmla.bench.summary import summary_of_files

    path = tmp_path / "fill.json"
    assert run("generate", ["--preset", "tiny", "--variants", "mla-kv64,egmla-kv64", "--paths", "absorbed,naive",
                            "--fill-memory", "0.002", "--context", "24", "--new-tokens", "2", "--repeats", "1",
                            "--cache-dtypes", "auto,fp8,fp8-keep-rope", "--compare-hf", "--json", str(path)]) == 0
    rows = [r for r in json.loads(path.read_text())["rows"] if r["model"] == "egmla"]
    assert all("error" not in r for r in rows)
    mla = {(r["decode_path"], r.get("cache_dtype")): r["batch"] for r in rows if r["variant"] == "MLA kv64"}
    assert mla[("absorbed", "fp8")] >= 4 * mla[("absorbed", None)] > 0  # 1 byte against the CPU's fp32
    assert mla[("absorbed", "fp8")] > mla[("absorbed", "fp8-keep-rope")] > 1.5 * mla[("absorbed", None)]
    egmla = {(r["decode_path"], r.get("cache_dtype")): r["batch"] for r in rows if r["variant"] == "EG-MLA kv64"}
    assert 4 * egmla[("naive", None)] > egmla[("naive", "fp8")] > 2 * egmla[("naive", None)] > 0
    assert "| MLA kv64, fp8 cache (`absorbed` / `naive`) |" in summary_of_files([str(path)])
    with pytest.raises(ValueError, match="--cache-dtypes 'fp4'"):
        run("generate", ["--preset", "tiny", "--cache-dtypes", "fp4"])


def test_fill_prompts_take_every_window_of_the_text():
    """A fill run's prompts are every distinct window of the corpus up to FILL_PROMPTS. Until 2026-12-05 the window
    count came from a stream tokenized for one window plus a slack of text, so 4,089-id prompts found 8 windows."""
    from egmla.bench.generate import FILL_PROMPTS, fill_prompts

    short = fill_prompts(300, 512)
    assert len(short) == FILL_PROMPTS and len({tuple(p) for p in short}) == FILL_PROMPTS
    long = fill_prompts(4089, 32768)  # paper-base's fill shape: the corpus holds ~740 such windows
    assert 600 < len(long) < FILL_PROMPTS and len({tuple(p) for p in long}) == len(long)
    assert all(len(p) == 4089 for p in long)


def test_suite_control_tables_on_the_cpu(tmp_path):
    """`egmla bench generate-suite --quick --tables control` and `--tables control-fill`: the same-table control's
    absorbed and gate-table rows beside MLA kv64 and Llama in one table, and at full memory in another, each table's
    run writing only its own files (one JSON per table, its parts merged); an unknown table name is refused. (One run
    of each: a run of both tables in one command did the same work again, ~30 s of CI.)"""
    import pytest

    control, fill = tmp_path / "control", tmp_path / "fill"
    assert run("generate-suite", ["--quick", "--tables", "control", "--out", str(control)]) == 0
    rows = json.loads((control / "generate_cpu_control.json").read_text())["rows"]
    paths = {(r["variant"], r["decode_path"]) for r in rows if r["model"] == "egmla" and "error" not in r}
    assert {("EG-MLA kv64 gate-bias", "absorbed"), ("EG-MLA kv64 gate-bias", "gate-table"), ("MLA kv64", "kernel"),
            ("EG-MLA kv64", "kernel")} <= paths
    assert sorted(p.name for p in control.iterdir()) == ["generate_cpu_control.json", "generate_cpu_control.md"]
    assert run("generate-suite", ["--quick", "--tables", "control-fill", "--out", str(fill)]) == 0
    assert sorted(p.name for p in fill.iterdir()) == ["generate_cpu_control_fill.json", "generate_cpu_control_fill.md"]
    text = (fill / "generate_cpu_control_fill.md").read_text()
    assert "| egmla | EG-MLA kv64 gate-bias | absorbed |" in text and "LlamaForCausalLM" in text
    with pytest.raises(SystemExit, match="--tables 'decode'"):
        run("generate-suite", ["--quick", "--tables", "decode", "--out", str(tmp_path)])


def test_crossover_report_sets_kernel_beside_grouped_with_autos_choice(tmp_path):
    """`--report ... --crossover`: one line per (prompt, batch) with both paths, their ratio and the path `auto`
    takes at that call's positions (batch x (prompt + new tokens - 1)); runs of several prompt lengths merge."""
    from egmla.bench.generate import crossover_report

    def run_file(prompt_len: int, steps: dict) -> str:
        rows = [{"model": "egmla", "variant": "EG-MLA kv64", "decode_path": path, "batch": batch, "step_ms_median": ms}
                for (batch, path), ms in steps.items()]
        meta = {"device": "NVIDIA H200", "dtype": "torch.bfloat16", "torch": "2.11", "source": "preset paper-base",
                "prompt_len": prompt_len, "new_tokens": 33, "repeats": 2, "rows": rows}
        path = tmp_path / f"p{prompt_len}.json"
        path.write_text(json.dumps(meta))
        return str(path)

    files = [run_file(2048, {(8, "kernel"): 2.2, (8, "grouped"): 2.0, (1, "kernel"): 1.5, (1, "grouped"): 1.7}),
             run_file(512, {(16, "kernel"): 1.9, (16, "grouped"): 2.0, (4, "kernel"): 1.0})]  # batch 4: one path
    assert crossover_report(files, str(tmp_path / "x.md")) == 0
    lines = [line for line in (tmp_path / "x.md").read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert lines[1:] == ["| 512 | 16 | 8,704 | 1.90 | 2.00 | 0.95 | kernel |",
                         "| 2,048 | 1 | 2,080 | 1.50 | 1.70 | 0.88 | kernel |",
                         "| 2,048 | 8 | 16,640 | 2.20 | 2.00 | 1.10 | grouped |"]


def test_ab_report_gives_each_labels_runs_median_and_ratio(tmp_path):
    """`--ab --report LABEL=JSON ...`: runs alternated between code versions, one line per (variant, path, batch)
    with each label's steps in run order, their median and the ratio to the first label's median."""
    def run_file(name: str, steps: dict, device: str = "NVIDIA H200", code: str | None = None, env=None) -> str:
        rows = [{"model": "egmla", "variant": "EG-MLA kv64", "decode_path": "auto", "batch": batch, "step_ms_median": ms}
                for batch, ms in steps.items()]
        meta = {"device": device, "dtype": "torch.bfloat16", "source": "preset paper-base", "prompt_len": 2048,
                "new_tokens": 16, "rows": rows}
        if code is not None:
            meta["code"] = {"package": "/x/egmla", "source_sha256": code, "env": env or {}}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(meta))
        return str(path)

    files = [f"old={run_file('o1', {1: 2.0, 32: 3.0}, code='a' * 64)}",
             f"new={run_file('n1', {1: 1.0, 32: 3.3}, code='b' * 64)}",
             f"old={run_file('o2', {1: 2.2, 32: 3.0}, code='a' * 64)}", f"new={run_file('n2', {1: 1.2}, code='b' * 64)}",
             f"old={run_file('o3', {1: 2.4}, code='a' * 64)}"]
    assert run("generate", ["--ab", "--report", *files, "--markdown", str(tmp_path / "ab.md")]) == 0
    lines = [line for line in (tmp_path / "ab.md").read_text().splitlines() if line.startswith("| EG-MLA")]
    # apart: every run of `new` beyond every run of `old` at batch 1; one run of `new` at batch 32
    assert lines == ["| EG-MLA kv64 | auto | 1 | 2.000 2.200 2.400 (**2.200**) | 1.000 1.200 (**1.100**) | 0.500 | yes |",
                     "| EG-MLA kv64 | auto | 32 | 3.000 3.000 (**3.000**) | 3.300 (**3.300**) | 1.100 | 1 run |"]
    with pytest.raises(ValueError, match="LABEL=JSON"):
        run("generate", ["--ab", "--report", run_file("bare", {1: 1.0})])
    assert "`old` sources aaaaaaaaaaaa; `new` sources bbbbbbbbbbbb" in (tmp_path / "ab.md").read_text()
    assert "step ms (CUDA-graph replay)" in (tmp_path / "ab.md").read_text()  # rows without cuda_graphs: as ever
    with pytest.raises(ValueError, match="several devices"):
        run("generate", ["--ab", "--report", files[0], f"new={run_file('h100', {1: 1.0}, 'NVIDIA H100')}"])
    # two labels that ran the same code (the old tree shadowed by the working tree) are refused, naming the fix ...
    with pytest.raises(ValueError, match="'old' and 'new' ran the same code.*own tree's root"):
        run("generate", ["--ab", "--report", files[0], f"new={run_file('same', {1: 1.0}, code='a' * 64)}"])
    # ... one label's files must agree; an EGMLA_* setting makes a version of the same sources; old files are named
    with pytest.raises(ValueError, match="labelled 'old' ran different code"):
        run("generate", ["--ab", "--report", files[0], f"old={run_file('o4', {1: 1.0}, code='c' * 64)}"])
    flag = f"grouped={run_file('g', {1: 1.1}, code='a' * 64, env={'EGMLA_BIAS_MASS': 'grouped'})}"
    unrecorded = f"older={run_file('u', {1: 1.0})}"
    assert run("generate", ["--ab", "--report", files[0], flag, unrecorded, "--markdown", str(tmp_path / "ab.md")]) == 0
    assert ("`grouped` sources aaaaaaaaaaaa, EGMLA_BIAS_MASS=grouped; `older` not recorded"
            in (tmp_path / "ab.md").read_text())


def test_ab_table_calls_eager_steps_eager(tmp_path):
    """A CPU run (or --eager) has no CUDA graphs: its table said "step ms (CUDA-graph replay)" all the same."""
    from egmla.bench.ab import ab_table, parse_labelled

    def run_file(name: str, code: str, graphs: bool) -> str:
        meta = {"device": "cpu", "dtype": "torch.float32", "source": "preset tiny", "prompt_len": 64, "new_tokens": 32,
                "code": {"package": "/x/egmla", "source_sha256": code, "env": {}},
                "rows": [{"model": "egmla", "variant": "MLA kv64", "decode_path": "naive", "batch": 1,
                          "step_ms_median": 4.0, "cuda_graphs": graphs}]}
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
        return str(tmp_path / f"{name}.json")

    def header(graphs_old: bool, graphs_new: bool) -> str:
        files = [f"old={run_file('o', 'a' * 64, graphs_old)}", f"new={run_file('n', 'b' * 64, graphs_new)}"]
        return ab_table(parse_labelled(files)).splitlines()[0]

    assert "step ms (eager)" in header(False, False)
    assert "step ms (CUDA-graph replay)" in header(True, True)
    assert "step ms (CUDA-graph replay or eager)" in header(True, False)


def test_ab_table_says_which_kernels_moved_where_the_runs_profiled(tmp_path):
    """Runs made with `--profile`: a second table with each label's kernel ms and launches per step (medians) and the
    kernels whose time moved most from the first label to the last, a kernel one version does not launch at 0."""
    from egmla.bench.ab import ab_table, parse_labelled

    def run_file(name: str, code: str, kernels: list) -> str:
        row = {"model": "egmla", "variant": "MLA kv64", "decode_path": "kernel", "batch": 1, "step_ms_median": 1.0,
               "profile_kernel_ms_per_step": sum(k[1] for k in kernels),
               "profile_kernels_per_step": sum(k[2] for k in kernels), "profile_kernels": kernels}
        meta = {"device": "NVIDIA H200", "dtype": "torch.bfloat16", "source": "preset paper-base", "prompt_len": 2048,
                "new_tokens": 16, "rows": [row], "code": {"package": "/x", "source_sha256": code, "env": {}}}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(meta))
        return str(path)

    old = [("_rope_kernel", 0.030, 12), ("_mla_decode_kernel", 0.100, 12), ("gemm", 0.200, 48)]
    new = [("_mla_decode_kernel", 0.101, 12), ("gemm", 0.190, 48)]
    table = ab_table(parse_labelled([f"old={run_file('o1', 'a' * 64, old)}", f"new={run_file('n1', 'b' * 64, new)}",
                                     f"old={run_file('o2', 'a' * 64, old)}"]))
    row = [line for line in table.splitlines() if line.startswith("| MLA kv64 | kernel | 1 | 0.330")]
    assert row == ["| MLA kv64 | kernel | 1 | 0.330 / 72 | 0.291 / 60 | `_rope_kernel` 0.030 → 0.000, `gemm` 0.200 → "
                   "0.190, `_mla_decode_kernel` 0.100 → 0.101 |"]
    plain = ab_table(parse_labelled([f"old={run_file('o3', 'a' * 64, old)}"]).copy()
                     | {"new": [{**json.loads(Path(run_file('n3', 'b' * 64, new)).read_text()), "rows": [
                         {"model": "egmla", "variant": "MLA kv64", "decode_path": "kernel", "batch": 1,
                          "step_ms_median": 1.0}]}]})
    assert "Profiled steps" in plain and "| MLA kv64 | kernel | 1 | 0.330 / 72 | - |  |" in plain


def test_code_identity_names_the_tree_python_m_imports_from_its_directory(tmp_path):
    """What broke three A/Bs: run from a tree's root, Python imports that tree's egmla even with another tree first
    on PYTHONPATH. code_identity says which package ran and hashes its sources, so a copy hashes the same and an
    edited copy does not."""
    import shutil
    import subprocess
    import sys

    from egmla.bench.ab import code_identity

    repo = Path(__file__).resolve().parents[2]
    shutil.copytree(repo / "egmla", tmp_path / "egmla", ignore=shutil.ignore_patterns("__pycache__"))

    def identity_from(cwd: Path) -> dict:
        script = "import json; from egmla.bench.ab import code_identity; print(json.dumps(code_identity()))"
        out = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(repo)})
        return json.loads(out.stdout)

    copy = identity_from(tmp_path)
    assert Path(copy["package"]) == (tmp_path / "egmla").resolve()
    assert copy["source_sha256"] == code_identity()["source_sha256"]
    with open(tmp_path / "egmla" / "kernels" / "rope.py", "a") as source:
        source.write("\n# an edit\n")
    assert identity_from(tmp_path)["source_sha256"] != copy["source_sha256"]


def test_bench_calls_times_each_setting_and_reports(tmp_path, capsys):
    """`egmla bench calls` on the CPU (no graphs, so both settings allocate per length): after the compiling pass, a
    row per call of each kept pass, the passes in the balanced order on, off, off, on (each setting as often first,
    and at the same mean position), and the table from the JSON."""
    path = tmp_path / "calls.json"
    assert run("calls", ["--variants", "mla-kv64", "--lengths", "12,8", "--batch", "2", "--new-tokens", "2",
                         "--json", str(path)]) == 0
    meta = json.loads(path.read_text())
    assert meta["passes"] == [True, False, False, True]
    assert [(r["pass"], r["reuse_longer_cache"], r["prompt"]) for r in meta["rows"]] == [
        (1, True, 12), (1, True, 8), (2, False, 12), (2, False, 8), (3, False, 12), (3, False, 8), (4, True, 12),
        (4, True, 8)]
    order = [r["reuse_longer_cache"] for r in meta["rows"] if r["prompt"] == 12]
    assert sum(i for i, on in enumerate(order) if on) == sum(i for i, on in enumerate(order) if not on)  # balanced
    # printed as it runs: one aligned line per call (the compiling pass marked), not the row's dict
    out = capsys.readouterr().out
    assert "reuse_longer_cache on, off, off, on (after a compiling pass, on)" in out
    printed = [line for line in out.splitlines() if line.startswith("MLA kv64")]
    assert len(printed) == 10 and not any("{" in line for line in printed)
    assert [line.endswith("(compiling pass, not kept)") for line in printed] == [True, True] + [False] * 8
    assert [" reuse_longer_cache on " in line for line in printed] == [True] * 4 + [False] * 4 + [True] * 2
    assert "B=2     prompt     12  reuse_longer_cache off  wall " in printed[4] and " ms  decode " in printed[4]
    assert len({line.index(" wall ") for line in printed}) == 1 and "cache     13 positions, eager" in printed[4]
    assert all(r["wall_ms"] > 0 and r["cache_positions"] == r["prompt"] + 1 for r in meta["rows"])
    assert run("calls", ["--report", str(path), "--markdown", str(tmp_path / "calls.md")]) == 0
    table = (tmp_path / "calls.md").read_text()
    assert "Passes on, off, off, on after a compiling pass" in table
    assert table.index("| MLA kv64 | naive | no: one per length | ") < table.index("| MLA kv64 | naive | yes | ")
    # alternating batch sizes: the other setting, a call per (batch, length) in turn
    assert run("calls", ["--variants", "egmla-kv64", "--lengths", "8", "--batches", "3,1", "--new-tokens", "2",
                         "--json", str(path), "--markdown", str(tmp_path / "calls.md")]) == 0
    meta = json.loads(path.read_text())
    assert [(r["share_cache_across_paths"], r["batch"]) for r in meta["rows"]] == [
        (True, 3), (True, 1), (False, 3), (False, 1), (False, 3), (False, 1), (True, 3), (True, 1)]
    assert "| EG-MLA kv64 | naive | 3 | no: made again at each change | " in (tmp_path / "calls.md").read_text()


def test_bench_calls_table_takes_each_settings_medians_over_its_passes():
    """The calls table per setting: the first call is the median of its passes' first calls, the later calls' medians
    are over every pass's later calls; a run from before the balanced order (rows without a pass) reads as one pass
    per setting, off then on, as its table was made."""
    from egmla.bench.calls import markdown

    def rows(timings):  # (pass, on, wall ms of its calls)
        return [{"variant": "MLA kv64", "reuse_longer_cache": on, "pass": index, "batch": 2, "prompt": 8 - call,
                 "wall_ms": ms, "prefill_ms": ms / 2, "decode_ms": ms / 4, "decode_path": "naive",
                 "cuda_graphs": False, "cache_positions": 9}
                for index, on, calls in timings for call, ms in enumerate(calls)]

    meta = {"device": "cpu", "dtype": "torch.float32", "torch": "2", "source": "preset tiny", "batch": 2,
            "new_tokens": 2, "lengths": [8, 7, 6], "batches": None, "setting": "reuse_longer_cache",
            "passes": [True, False, False, True],
            "rows": rows([(1, True, [100, 10, 12]), (2, False, [90, 20, 30]), (3, False, [70, 40, 50]),
                          (4, True, [80, 14, 16])])}
    table = markdown(meta).splitlines()
    assert table[-2] == "| MLA kv64 | naive | no: one per length | 80.0 | 35.0 | 17.5 | 8.8 | 9 |"
    assert table[-1] == "| MLA kv64 | naive | yes | 90.0 | 13.0 | 6.5 | 3.2 | 9 |"
    old = dict(meta, rows=[{k: v for k, v in row.items() if k != "pass"}
                           for row in rows([(0, False, [90, 20, 30]), (0, True, [100, 10, 12])])])
    del old["passes"]
    table = markdown(old).splitlines()
    assert "Passes" not in table[0]
    assert table[-2:] == ["| MLA kv64 | naive | no: one per length | 90.0 | 25.0 | 12.5 | 6.2 | 9 |",
                          "| MLA kv64 | naive | yes | 100.0 | 11.0 | 5.5 | 2.8 | 9 |"]


def test_suite_crossover_calls_and_prefill_tables_on_the_cpu(tmp_path):
    """`egmla bench generate-suite --quick --tables crossover,calls,prefill`: one JSON per prompt length and the
    crossover table over them; the successive-calls and prefill JSON and tables; no other table."""
    assert run("generate-suite", ["--quick", "--tables", "crossover,calls,prefill", "--out", str(tmp_path)]) == 0
    folder = tmp_path / "generate_cpu_crossover"
    assert sorted(p.name for p in folder.iterdir()) == ["crossover_p16.json", "crossover_p32.json"]
    table = (tmp_path / "generate_cpu_crossover.md").read_text()
    assert "| 16 | 1 | 18 |" in table and "| 32 | 2 | 68 |" in table  # positions = batch x (prompt + 3 - 1)
    calls = json.loads((tmp_path / "generate_cpu_calls.json").read_text())
    assert {r["prompt"] for r in calls["rows"]} == {24, 16} and (tmp_path / "generate_cpu_calls.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generate_cpu_calls.json", "generate_cpu_calls.md",
                                                         "generate_cpu_crossover", "generate_cpu_crossover.md",
                                                         "generate_cpu_prefill.json", "generate_cpu_prefill.md"]


def test_bench_prefill_times_each_budget_and_reports(tmp_path, capsys):
    """`egmla bench prefill` on the CPU: a row per (variant, path it has, batch, budget), a budget past the whole
    batch kept only once, printed as one line with units as it runs (not a dict), and the table from the JSON."""
    path = tmp_path / "prefill.json"
    assert run("prefill", ["--variants", "mha,egmla-kv64", "--paths", "naive,grouped", "--prompt-len", "8",
                           "--batch-sizes", "1,3", "--budgets", "8,16,64", "--repeats", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    printed = [line for line in capsys.readouterr().out.splitlines() if " B=" in line]
    assert len(printed) == len(rows) and not any("{" in line for line in printed)
    assert printed[-1].startswith("EG-MLA kv64            grouped   B=3    budget     64  prefill ")
    assert [(r["variant"], r["decode_path"], r["batch"], r["budget"]) for r in rows] == [
        (v, p, b, budget) for v, paths in (("MHA", ["naive"]), ("EG-MLA kv64", ["naive", "grouped"])) for p in paths
        for b, budgets in ((1, [8]), (3, [8, 16, 64])) for budget in budgets]
    assert all(r["prefill_ms"] > 0 for r in rows)
    assert run("prefill", ["--report", str(path), "--markdown", str(tmp_path / "prefill.md")]) == 0
    assert "| egmla | EG-MLA kv64 | grouped | 3 | 16 | " in (tmp_path / "prefill.md").read_text()
    with pytest.raises(ValueError, match="--budgets '0': every value must be >= 1"):
        run("prefill", ["--budgets", "0"])
    with pytest.raises(ValueError, match="--batches 'x': give comma-separated integers"):
        run("calls", ["--batches", "x"])


def test_bench_ab_runs_each_version_from_its_own_tree(tmp_path):
    """`egmla bench ab`: every version's runs import its own tree's egmla (recorded in each JSON), the order rotates
    each round, the table compares them; one code under two labels and malformed versions are refused."""
    import shutil

    from egmla.bench.ab_run import parse_version

    repo = Path(__file__).resolve().parents[2]
    edited = tmp_path / "edited"
    shutil.copytree(repo / "egmla", edited / "egmla", ignore=shutil.ignore_patterns("__pycache__"))
    with open(edited / "egmla" / "model.py", "a") as source:
        source.write("\n# an edit\n")
    generate = ["--", "--preset", "tiny", "--variants", "mla-kv64", "--paths", "absorbed", "--batch-sizes", "1",
                "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1"]
    out = tmp_path / "ab"
    assert run("ab", ["--version", f"base={repo}", "--version", f"edited={edited}", "--rounds", "2", "--out", str(out),
                      *generate]) == 0
    metas = {p.stem: json.loads(p.read_text()) for p in out.glob("gen_*.json")}
    assert sorted(metas) == ["gen_base_1", "gen_base_2", "gen_edited_1", "gen_edited_2"]
    assert {Path(m["code"]["package"]) for k, m in metas.items() if "edited" in k} == {(edited / "egmla").resolve()}
    assert {Path(m["code"]["package"]) for k, m in metas.items() if "base" in k} == {(repo / "egmla").resolve()}
    # rotated: base ran first in round 1, edited first in round 2
    finished = {p.stem: p.stat().st_mtime_ns for p in out.glob("gen_*.log")}
    assert finished["gen_base_1"] < finished["gen_edited_1"] < finished["gen_edited_2"] < finished["gen_base_2"]
    assert "| MLA kv64 | absorbed | 1 |" in (out / "table.md").read_text()
    with pytest.raises(ValueError, match="'a' and 'b' ran the same code"):
        run("ab", ["--version", f"a={repo}", "--version", f"b={repo}", "--rounds", "1", "--out", str(out), *generate])
    assert parse_version("flag=.,EGMLA_BIAS_MASS=grouped") == ("flag", ".", {"EGMLA_BIAS_MASS": "grouped"})
    for bad in ["old", "old=.,PATH=/x", "o/d=."]:
        with pytest.raises(ValueError, match="--version"):
            parse_version(bad)
    with pytest.raises(ValueError, match="holds no egmla package"):
        run("ab", ["--version", f"a={tmp_path}", "--version", f"b={repo}", "--out", str(out), *generate])
    with pytest.raises(ValueError, match="must not hold --json"):
        run("ab", ["--version", f"a={repo}", "--version", f"b={edited}", "--out", str(out), *generate, "--json", "x"])


def test_a_git_export_replaces_an_earlier_one_of_the_same_label(tmp_path):
    from egmla.bench.ab_run import resolve_tree

    stale = tmp_path / "trees" / "old" / "egmla" / "left_from_another_commit.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("x = 1\n")
    tree = resolve_tree("old", "git:HEAD", tmp_path)
    assert (tree / "egmla" / "__init__.py").is_file() and not stale.exists()


def test_suite_files_are_named_by_the_gpu_model():
    """An H100's tables were once named generate_hbm3_* (the device name's last word)."""
    from egmla.bench.generate_suite import gpu_tag

    assert gpu_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_tag("NVIDIA H200") == "h200"
    assert gpu_tag("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_tag("NVIDIA GeForce RTX 4090") == "4090"


def test_ab_refuses_files_that_timed_different_work(tmp_path):
    """The A/B table matches rows by (variant, path, batch) only: files of other prompt lengths or token counts were
    set side by side, their ratio read as the code's (the same-command check serve's A/B has)."""
    from egmla.bench.ab import ab_table, parse_labelled

    def run_file(name: str, code: str, **settings) -> str:
        meta = {"device": "NVIDIA H200", "dtype": "torch.bfloat16", "source": "preset paper-base", "prompt_len": 2048,
                "new_tokens": 16, "code": {"package": "/x/egmla", "source_sha256": code, "env": {}},
                "rows": [{"model": "egmla", "variant": "MLA kv64", "decode_path": "kernel", "batch": 32,
                          "step_ms_median": 3.0}], **settings}
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
        return str(tmp_path / f"{name}.json")

    old = f"old={run_file('o', 'a' * 64)}"
    assert "| MLA kv64 | kernel | 32 |" in ab_table(parse_labelled([old, f"new={run_file('n', 'b' * 64)}"]))
    with pytest.raises(ValueError, match="ran other work.*prompt_len 512 vs 2048"):
        parse_labelled([old, f"new={run_file('short', 'b' * 64, prompt_len=512)}"])
    with pytest.raises(ValueError, match="ran other work.*new_tokens 32 vs 16"):
        parse_labelled([old, f"old={run_file('o2', 'a' * 64, new_tokens=32)}", f"new={run_file('n2', 'b' * 64)}"])


def test_plot_labels_full_memory_rows_with_the_tables_ratio(tmp_path, monkeypatch):
    """At --fill-memory each variant runs at its own largest batch and the table divides by Llama at Llama's: the
    plot looked Llama up at the row's batch instead, so every bar but MHA's went without its ratio (the same figure
    computed two ways)."""
    import matplotlib.axes

    from egmla.bench.generate import markdown, plot

    llama = "transformers LlamaForCausalLM"
    meta = {"device": "NVIDIA H200", "dtype": "torch.bfloat16", "torch": "x", "source": "s", "prompt_len": 4089,
            "new_tokens": 8, "repeats": 1, "fill_memory_gb": 60.0, "context": 4096,
            "rows": [{"model": llama, "variant": "MHA", "decode_path": "static cache", "batch": 397,
                      "decode_tokens_per_s": 1000.0, "step_ms_median": 9.0, "prefill_ms": 1.0},
                     {"model": "egmla", "variant": "MLA kv64", "decode_path": "kernel", "batch": 4768,
                      "decode_tokens_per_s": 8000.0, "step_ms_median": 9.0, "prefill_ms": 1.0}]}
    labels = []
    original = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: labels.append(text) or original(self, text, *a, **k))
    plot(meta, str(tmp_path / "fill.png"))
    assert "| egmla | MLA kv64 | kernel | 4768 | 9.00 | 8,000 | 8.00 | 1 |" in markdown(meta)
    assert sorted(labels) == ["1.00", "8.00"]


def test_ab_table_says_a_run_whose_row_errored(tmp_path):
    """A label's row that errored (e.g. out of memory in one round) was dropped: its cell read '-' as if that
    configuration had never run, or its median stood on fewer runs without a word."""
    from egmla.bench.ab import ab_table, parse_labelled

    def run_file(name: str, code: str, ms: float | None) -> str:
        row = {"model": "egmla", "variant": "MLA kv64", "decode_path": "kernel", "batch": 128}
        row.update({"step_ms_median": ms} if ms is not None else {"error": "OutOfMemoryError: CUDA out of memory"})
        meta = {"device": "NVIDIA H200", "dtype": "torch.bfloat16", "source": "preset paper-base", "prompt_len": 2048,
                "new_tokens": 16, "code": {"package": "/x/egmla", "source_sha256": code, "env": {}}, "rows": [row]}
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
        return f"{'old' if code == 'a' * 64 else 'new'}={tmp_path / f'{name}.json'}"

    table = ab_table(parse_labelled([run_file("o1", "a" * 64, 3.0), run_file("n1", "b" * 64, None),
                                     run_file("o2", "a" * 64, None), run_file("n2", "b" * 64, None)]))
    assert "| MLA kv64 | kernel | 128 | 3.000 (**3.000**) + 1 errored | 2 errored | - | - |" in table
