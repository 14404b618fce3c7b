"""`egmla bench grouped`: the per-step plan's share per layer in every grouped row, speedups between rows of the same
lengths, and the command end to end at tiny shapes on the CPU."""
import json
import os

import pytest
import torch


def test_markdown_adds_the_plan_share(tmp_path):
    from egmla.bench.grouped_study import _speedups, markdown

    base = {"text": "python-source", "batch": 32, "context": 4096}
    rows = [dict(base, variant="MHA", path="sdpa", median_us=100.0),
            dict(base, variant="MLA kv64", path="kernel", median_us=25.0),
            dict(base, variant="EG-MLA kv64", path="kernel", median_us=200.0),
            dict(base, variant="EG-MLA kv64", path="grouped", median_us=50.0, plan_us_per_layer=10.0,
                 median_us_with_plan=60.0),
            dict(base, variant="EG-MLA kv64", path="grouped-plan", median_us=120.0)]
    _speedups(rows)
    grouped = rows[3]
    assert grouped["x_mha"] == 2.0 and abs(grouped["x_mha_with_plan"] - 100 / 60) < 1e-12
    source, table = tmp_path / "g.json", tmp_path / "g.md"
    source.write_text(json.dumps({"meta": {"device": "NVIDIA H200", "copy_gbs": None}, "rows": rows}))
    markdown(str(source), str(table))
    text = table.read_text()
    assert "| python-source | 32 | 4096 | equal | EG-MLA kv64 grouped | 50.0 | 2.00 | 0.50 | 4.00 | 60.0 | 1.67 |" in text
    assert "grouped-plan" not in text.split("|---|")[-1]  # the plan is folded into the rows, not a row


def test_graph_rows_take_the_graph_plans_share():
    """'grouped-graph' (as the engine's CUDA graphs run it) gets the graph-replayed plan's share per layer, the
    other grouped rows the eager plan's (host sync included)."""
    from egmla.bench.grouped_study import add_plan_share

    rows = [{"path": "grouped", "median_us": 50.0}, {"path": "grouped-graph", "median_us": 55.0},
            {"path": "grouped-plan", "median_us": 120.0}, {"path": "grouped-plan-graph", "median_us": 24.0},
            {"path": "kernel", "median_us": 80.0}]
    add_plan_share(rows, 12)
    assert rows[0]["median_us_with_plan"] == 60.0 and rows[1]["median_us_with_plan"] == 57.0
    assert "plan_us_per_layer" not in rows[2] and "plan_us_per_layer" not in rows[4]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="runs the kernels on the CPU: needs TRITON_INTERPRET=1 (set by make test and .ci/run)")
def test_graph_case_equals_the_eager_case_and_its_plan_has_no_host_sync():
    """The bounded plan (sizes from the host, as generation's graphs are) gives the grouped output of the exact
    plan, and building it reads nothing back from the device."""
    import torch

    from egmla.bench.grouped import grouped_cases
    from egmla.variants import variant_config

    config = variant_config("egmla-kv64", "tiny", max_seq_len=24)
    token_ids = torch.randint(0, 20, (2, 24), dtype=torch.int32)
    cases = {c.path: c for c in grouped_cases(config, 2, 24, token_ids, "cpu", torch.float32)}
    assert set(cases) == {"grouped", "grouped-graph", "grouped-plan", "grouped-plan-graph"}
    torch.testing.assert_close(cases["grouped-graph"].run(), cases["grouped"].run(), rtol=1e-5, atol=1e-6)
    plan = cases["grouped-plan-graph"].run()
    assert plan.max_distinct == 24  # bounded by the cache length (the engine's bound rounds up to 256)
    original = torch.Tensor.tolist
    try:
        torch.Tensor.tolist = lambda self: (_ for _ in ()).throw(AssertionError("host sync"))
        cases["grouped-plan-graph"].run()
    finally:
        torch.Tensor.tolist = original


def test_speedups_compare_rows_of_the_same_lengths():
    from egmla.bench.grouped_study import _speedups

    base = {"text": "python-source", "batch": 32, "context": 4096}
    rows = [dict(base, lengths=kind, variant=variant, path=path, median_us=us)
            for kind, scale in (("equal", 1.0), ("ragged", 0.5))
            for variant, path, us in (("MHA", "sdpa", 100.0), ("MLA kv64", "kernel", 20.0),
                                      ("EG-MLA kv64", "grouped", 50.0 * scale))]
    _speedups(rows)
    grouped = {r["lengths"]: r for r in rows if r["path"] == "grouped"}
    assert grouped["equal"]["x_mha"] == 2.0 and grouped["ragged"]["x_mha"] == 4.0
    assert grouped["ragged"]["x_mla"] == 0.8


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="runs the kernels on the CPU: needs TRITON_INTERPRET=1 (set by make test and .ci/run)")
def test_cli_times_equal_and_ragged_batches_and_the_bias_control_on_the_cpu(tmp_path):
    """`egmla bench grouped` end to end at tiny shapes (TRITON_INTERPRET=1 runs the kernels on the CPU): every
    path at both lengths, the control's absorbed decode among them, and the Markdown with its lengths column."""
    from egmla.cli import main as egmla_main

    out, md = tmp_path / "g.json", tmp_path / "g.md"
    args = ["bench", "grouped", "--device", "cpu", "--preset", "tiny", "--batch", "2", "--context", "16", "--text",
            "embedded", "--variant-shapes", "", "--check", "", "--rep-ms", "1", "--warmup-ms", "1",
            "--ids", str(tmp_path / "ids.safetensors"), "--out", str(out)]
    assert egmla_main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    for kind in ("equal", "ragged"):
        timed = {(r["variant"], r["path"]) for r in rows if r["lengths"] == kind and "median_us" in r}
        assert {("MHA", "sdpa"), ("MLA kv64", "kernel"), ("EG-MLA kv64", "grouped"),
                ("EG-MLA kv64 gate-bias", "absorbed")} <= timed, kind
    held = {r["lengths"]: r["positions_held"] for r in rows}
    assert held == {"equal": 32, "ragged": 8 + 16}
    assert egmla_main(["bench", "grouped", "--markdown", str(out), str(md)]) == 0
    assert "| embedded | 2 | 16 | ragged | EG-MLA kv64 gate-bias absorbed |" in md.read_text()


def test_targets_table_reads_each_run_and_judges_the_first(tmp_path):
    """Issue 17's targets from two result files: figures read from the rows (graph rows preferred, `kernel-core`
    preferred), a column per run, status from the first; a run lacking rows shows '-'."""
    from egmla.bench.grouped_study import _speedups
    from egmla.bench.grouped_targets import write_targets

    def run(grouped_us, mla_us, time):
        rows = []
        for text in ("python-source", "embedded"):
            for batch, context in ((32, 4096), (128, 16384)):
                base = {"text": text, "batch": batch, "context": context, "lengths": "equal"}
                if text == "python-source":
                    rows += [dict(base, variant="MHA", path="sdpa", median_us=100.0 * batch / 32),
                             dict(base, variant="MLA kv64", path="kernel", median_us=mla_us * 2),
                             dict(base, variant="MLA kv64", path="kernel-core", median_us=mla_us,
                                  gbytes_per_s=3600.0)]
                rows += [dict(base, variant="EG-MLA kv64", path="grouped", median_us=grouped_us * 2,
                              median_us_with_plan=grouped_us * 2 + 5),
                         dict(base, variant="EG-MLA kv64", path="grouped-graph", median_us=grouped_us,
                              median_us_with_plan=grouped_us + 1)]
        _speedups(rows)
        return {"meta": {"device": "NVIDIA H200", "copy_gbs": 4000.0, "time": time}, "rows": rows}

    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text(json.dumps(run(24.0, 19.0, "2026-12-05 10:00:00")))
    old.write_text(json.dumps({"meta": {"time": "2026-12-01 09:00:00"}, "rows": []}))
    table = tmp_path / "targets.md"
    write_targets(str(table), [str(new), str(old)])
    lines = table.read_text().splitlines()
    row = next(line for line in lines if line.startswith("| EG-MLA kv64 grouped, plan included"))
    assert "4.00× (25.0 vs 100.0 µs)" in row and row.endswith("| - | **met** |")
    assert "1.3× MLA's 19.0 µs" in next(line for line in lines if "within 2× of MLA" in line)
    mla = next(line for line in lines if line.startswith("| MLA kv64 ≥ 5×"))
    assert "5.26× (19.0 µs, `kernel-core`)" in mla and mla.endswith("**met** |")
    bandwidth = next(line for line in lines if "copy bandwidth" in line)
    assert "90.0% (3.60 of 4.00 TB/s" in bandwidth and bandwidth.endswith("**met** |")
    english = next(line for line in lines if "English" in line)
    assert english.endswith("**met** |")
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(run(200.0, 19.0, "2026-12-06 10:00:00")))
    write_targets(str(table), [str(slow)])
    assert "**missed** by 6.03×" in table.read_text()  # 3× wanted, 100 / 201 = 0.50× measured
    assert next(line for line in table.read_text().splitlines()
                if line.startswith("| *in a step:* MLA")).endswith("| - | not in the run |")
    # in-step rows (--in-step), and a result file in another folder: its link is relative to the table
    stepped = run(24.0, 19.0, "2026-12-07 10:00:00")
    base = {"text": "python-source", "batch": 32, "context": 4096, "lengths": "equal"}
    stepped["rows"] += [dict(base, variant="MHA", path="sdpa in-step", median_us=90.0),
                        dict(base, variant="MLA kv64", path="kernel-core in-step", median_us=15.0),
                        dict(base, variant="EG-MLA kv64", path="grouped-graph in-step", median_us=29.0,
                             median_us_with_plan=30.0)]
    _speedups(stepped["rows"])
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "step.json").write_text(json.dumps(stepped))
    write_targets(str(table), [str(tmp_path / "runs" / "step.json")])
    text = table.read_text()
    assert "([JSON](runs/step.json))" in text
    lines = text.splitlines()
    assert next(line for line in lines if line.startswith("| *in a step:* MLA")).endswith(
        "| 6.00× (15.0 µs, `kernel-core in-step`) | **met** |")
    assert next(line for line in lines if line.startswith("| *in a step:* EG-MLA")).endswith(
        "| 3.00× (30.0 vs 90.0 µs) | **met** |")


def test_targets_needs_a_result_file(capsys):
    from egmla.bench.cli import run

    with pytest.raises(SystemExit, match="at least one result file"):
        run("grouped", ["--targets", "only.md"])


def test_settings_pick_launch_settings_and_an_unknown_label_is_named():
    import argparse

    from egmla.bench.cli import run
    from egmla.bench.grouped_study import LAUNCH_SETTINGS, launch_settings

    default = launch_settings(argparse.Namespace(settings=""))
    assert "grouped t32" in default and not any(k.startswith(("grouped slices", "grouped stages")) for k in default)
    assert launch_settings(argparse.Namespace(settings="all")) == LAUNCH_SETTINGS
    assert launch_settings(argparse.Namespace(settings="none")) == {}
    picked = launch_settings(argparse.Namespace(settings="grouped slices 8, grouped t32"))
    assert picked == {"grouped t32": LAUNCH_SETTINGS["grouped t32"], "grouped slices 8": {"batch_slice": 8}}
    with pytest.raises(SystemExit, match="grouped slices 5: unknown; choose from grouped per-row sums"):
        run("grouped", ["--settings", "grouped slices 5", "--device", "cpu"])


def test_in_step_rows_time_n_layers_in_one_graph_per_layer(tmp_path):
    """--in-step N: MHA SDPA, MLA kernel-core and EG-MLA grouped-graph also as N independent layers in one call, the
    rows per layer and compared with the in-step anchors; the grouped row takes the graph plan's share."""
    from egmla.cli import main as egmla_main

    out = tmp_path / "g.json"
    args = ["bench", "grouped", "--device", "cpu", "--preset", "tiny", "--batch", "2", "--context", "16", "--text",
            "embedded", "--variant-shapes", "2x16", "--settings", "none", "--in-step", "3", "--lengths", "equal",
            "--no-control", "--check", "", "--rep-ms", "1", "--warmup-ms", "1",
            "--ids", str(tmp_path / "ids.safetensors"), "--out", str(out)]
    assert egmla_main(args) == 0
    rows = {(r["variant"], r["path"]): r for r in json.loads(out.read_text())["rows"]}
    step = {k: r for k, r in rows.items() if k[1].endswith(" in-step")}
    assert set(step) == {("MHA", "sdpa in-step"), ("MLA kv64", "kernel-core in-step"),
                         ("EG-MLA kv64", "grouped-graph in-step")}
    for key, r in step.items():
        assert r["layers_in_graph"] == 3 and r["median_us"] > 0
        assert r["bytes"] == rows[(key[0], key[1].removesuffix(" in-step"))]["bytes"]  # per layer, as the others
    mha = step[("MHA", "sdpa in-step")]["median_us"]
    grouped = step[("EG-MLA kv64", "grouped-graph in-step")]
    assert abs(grouped["x_mha"] - mha / grouped["median_us"]) < 1e-9
    assert grouped["plan_us_per_layer"] == rows[("EG-MLA kv64", "grouped-plan-graph")]["median_us"] / 4  # tiny: 4 layers


def test_in_step_rows_that_do_not_fit_are_skipped_and_the_run_goes_on(tmp_path, monkeypatch):
    import torch

    import egmla.bench.grouped_study as study
    from egmla.cli import main as egmla_main

    real = study.in_step_case

    def tight(layers, build):
        case = real(layers, build)
        if case.variant == "MHA":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return case

    monkeypatch.setattr(study, "in_step_case", tight)
    out = tmp_path / "g.json"
    assert egmla_main(["bench", "grouped", "--device", "cpu", "--preset", "tiny", "--batch", "2", "--context", "16",
                       "--text", "embedded", "--variant-shapes", "2x16", "--settings", "none", "--in-step", "2",
                       "--lengths", "equal", "--no-control", "--check", "", "--rep-ms", "1", "--warmup-ms", "1",
                       "--ids", str(tmp_path / "ids.safetensors"), "--out", str(out)]) == 0
    rows = {(r["variant"], r["path"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("MHA", "sdpa in-step")]["skipped"].startswith("out of memory building 2 layers")
    assert rows[("MLA kv64", "kernel-core in-step")]["median_us"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the default device works")
def test_default_cuda_device_without_a_gpu_is_a_clear_error():
    from egmla.bench.cli import run

    with pytest.raises(SystemExit, match="--device cuda: no CUDA device here; on a CPU give --device cpu"):
        run("grouped", ["--preset", "tiny", "--batch", "1", "--context", "64"])


def test_traffic_table_adds_the_intermediates_to_the_floor_and_judges_the_targets(tmp_path):
    """--traffic: the method's floor plus A and S written and read (heads x d_c per pair, paper-base: 1,536 B in
    bf16) at the run's copy bandwidth; the graph row preferred, ragged rows ignored; each target judged."""
    from egmla.bench.grouped_traffic import traffic_rows, verdict, write_traffic

    def shape(text, batch, context, mha_us, paths=("grouped", "grouped-graph"), lengths="equal"):
        base = {"text": text, "batch": batch, "context": context, "lengths": lengths}
        rows = [dict(base, variant="MHA", path="sdpa", median_us=mha_us)]
        for path in paths:  # 1,000 pairs: one intermediate is 1.536 MB = 1.536 µs at 1,000 GB/s
            rows.append(dict(base, variant="EG-MLA kv64", path=path, id_pairs=1000, bytes=2_000_000,
                             median_us=50.0 if path == "grouped" else 20.0,
                             median_us_with_plan=51.0 if path == "grouped" else 21.0))
        return rows

    data = {"meta": {"device": "NVIDIA H200", "copy_gbs": 1000.0, "time": "2026-12-06 08:00:00"},
            "rows": shape("python-source", 32, 4096, 30.0) + shape("embedded", 32, 4096, 12.0, paths=("grouped",))
            + shape("python-source", 128, 16384, 22.0) + shape("embedded", 8, 512, 9.0, lengths="ragged")}
    rows = {(r["text"], r["batch"]): r for r in traffic_rows(data)}
    assert set(rows) == {("python-source", 32), ("embedded", 32), ("python-source", 128)}
    code = rows[("python-source", 32)]
    assert code["floor_us"] == pytest.approx(2.0) and code["s_only_us"] == pytest.approx(2.0 + 2 * 1.536)
    assert code["a_and_s_us"] == pytest.approx(2.0 + 4 * 1.536) and code["measured_us"] == 21.0  # the graph row
    assert code["target_us"] == pytest.approx(10.0) and verdict(code) == "reachable by three launches"
    english = rows[("embedded", 32)]  # no graph row: the eager one; target 12 / 2 = 6 µs, between the two floors
    assert english["measured_us"] == 51.0 and verdict(english) == "only if L2 keeps A"
    assert verdict(rows[("python-source", 128)]) == "**out of reach** (1.15× the target even with A in L2)"  # 22 / 5
    table, source = tmp_path / "traffic.md", tmp_path / "run.json"
    source.write_text(json.dumps(data))
    write_traffic(str(table), [str(source)])
    text = table.read_text()
    assert "([JSON](run.json))" in text and "| code | 32 | 4,096 | 1,000 | 2.0 | 1.5 | 5.1 / 8.1 | 21.0 | 39% |" in text
    del data["meta"]["copy_gbs"]
    with pytest.raises(ValueError, match="no copy bandwidth"):
        traffic_rows(data)


def test_traffic_needs_a_result_file():
    from egmla.bench.cli import run

    with pytest.raises(SystemExit, match="at least one result file"):
        run("grouped", ["--traffic", "only.md"])
