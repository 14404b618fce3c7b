"""`egmla bench train` runs end to end on the CPU at tiny shapes (its numbers matter only on a GPU)."""
import argparse
import json
from pathlib import Path

import pytest
import torch

from egmla.bench import train as bench_train


def test_bench_train_cpu_tiny(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--device", "cpu", "--preset", "tiny", "--set", "vocab_size=512", "--set", "n_layers=1",
                              "--batch", "2", "--seq-len", "32", "--steps", "2", "--warmup", "1", "--no-compile",
                              "--out", str(out)])
    assert bench_train.main(args) == 0
    printed = capsys.readouterr().out
    assert "egmla bench train: cpu" in printed and "vs MLA kv64" in printed
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rows"]] == ["mha", "mla-kv64", "egmla-kv64"]
    for row in result["rows"]:
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] is None  # no MFU on a CPU
    assert result["device"] == "cpu" and result["dtype"] == "fp32"


def test_gate_table_updates_phases_and_profile(tmp_path, capsys):
    """--gate-table-update gives EG-MLA a row per update; every row has its phase times; --profile adds the
    kernel summary to each row and NAME_profile.md beside --out."""
    from egmla.bench.profiling import kind_of

    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--device", "cpu", "--preset", "tiny", "--set", "vocab_size=512", "--set", "n_layers=1",
                              "--variants", "mla-kv64,egmla-kv64", "--gate-table-update", "dense,row-sparse",
                              "--batch", "2", "--seq-len", "32", "--steps", "2", "--warmup", "1", "--no-compile",
                              "--profile", "--profile-steps", "1", "--out", str(out)])
    assert bench_train.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["name"], r["gate_table_update"]) for r in rows] == [
        ("MLA kv64", None), ("EG-MLA kv64 (dense)", "dense"), ("EG-MLA kv64 (row-sparse)", "row-sparse")]
    for row in rows:
        assert sorted(row["phase_ms"]) == ["clip", "forward_backward", "optimizer"]
        assert sum(row["phase_ms"].values()) == pytest.approx(row["step_ms"], rel=0.5)  # medians of each
        profile = row["profile"]
        assert profile["kernel_ms_per_step"] > 0 and profile["top"][0]["ms_per_step"] > 0
        assert sum(profile["kinds"].values()) == pytest.approx(profile["kernel_ms_per_step"])
    printed = capsys.readouterr().out
    assert "EG-MLA kv64 (row-sparse)" in printed and "| kernel | kind |" in printed
    assert "#### EG-MLA kv64 (row-sparse)" in (tmp_path / "bench_profile.md").read_text()
    assert kind_of("aten::mm") == "matmul" and kind_of("triton_poi_fused_mul_0") == "fused elementwise (Triton)"
    assert kind_of("void flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>") == "attention"

    bad = parser.parse_args(["--device", "cpu", "--gate-table-update", "dense,sparse"])
    with pytest.raises(ValueError, match="--gate-table-update 'dense,sparse': give each of dense, row-sparse"):
        bench_train.main(bad)


def test_compile_modes_get_a_row_each_with_their_own_mla_base(tmp_path, monkeypatch):
    """--compile-mode default,reduce-overhead: every variant once per mode, the mode handed to each block's
    compile, CUDA-graph modes marking each step's start (torch's cudagraph trees need it), and 'vs MLA kv64'
    dividing by MLA kv64 under the same mode. Compilation itself is stubbed: on a CPU its speed means nothing."""
    import torch

    compiled, marks = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append(kwargs.get("mode")))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--device", "cpu", "--preset", "tiny", "--set", "vocab_size=512", "--set", "n_layers=1",
                              "--variants", "mla-kv64,egmla-kv64", "--compile-mode", "default,reduce-overhead",
                              "--batch", "2", "--seq-len", "32", "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert bench_train.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["name"], r["compile_mode"]) for r in rows] == [
        ("MLA kv64 (default)", "default"), ("EG-MLA kv64 (default)", "default"),
        ("MLA kv64 (reduce-overhead)", "reduce-overhead"), ("EG-MLA kv64 (reduce-overhead)", "reduce-overhead")]
    assert compiled == ["default", "default", "reduce-overhead", "reduce-overhead"]  # one block per model
    assert len(marks) == 2 * 3  # the reduce-overhead rows' 1 warm-up + 2 timed steps, one micro-batch each
    assert bench_train.mla_base(rows, rows[3]) == rows[2]["step_ms"]
    assert bench_train.mla_base(rows, rows[1]) == rows[0]["step_ms"]

    for argv, error in ((["--compile-mode", "fast"], "--compile-mode 'fast': give each of auto, default, reduce-overhead"),
                        (["--no-compile", "--compile-mode", "reduce-overhead"], "needs --compile")):
        with pytest.raises(ValueError, match=error):
            bench_train.main(parser.parse_args(["--device", "cpu", *argv]))


def test_memory_settings_get_a_row_each_and_reach_the_step(tmp_path, monkeypatch):
    """--activation-checkpointing 0,1 --loss-chunk-tokens 0,16: a row per combination, labelled, each recorded in
    its row, handed to the model (blocks recomputed, the loss chunked) and compared with MLA kv64 under the same
    settings; a bad list is refused before any work."""
    import egmla.bench.train as module
    from egmla.train import loss, recompute

    seen = []
    real_blocks, real_loss = recompute.recompute_blocks, loss.token_loss
    monkeypatch.setattr(recompute, "recompute_blocks", lambda model, every: seen.append(("blocks", every))
                        or real_blocks(model, every))
    monkeypatch.setattr(loss, "token_loss", lambda *a, chunk_tokens=0, **k: seen.append(("chunk", chunk_tokens))
                        or real_loss(*a, chunk_tokens=chunk_tokens, **k))
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = parser.parse_args(["--device", "cpu", "--preset", "tiny", "--set", "vocab_size=512", "--set", "n_layers=2",
                              "--variants", "mla-kv64", "--activation-checkpointing", "0,1",
                              "--loss-chunk-tokens", "0,16", "--batch", "2", "--seq-len", "32", "--steps", "1",
                              "--warmup", "0", "--no-compile", "--out", str(out), "--markdown", str(md)])
    assert module.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["name"], r["activation_checkpointing"], r["loss_chunk_tokens"]) for r in rows] == [
        ("MLA kv64 (plain)", 0, 0), ("MLA kv64 (loss chunks 16)", 0, 16), ("MLA kv64 (recompute 1/1)", 1, 0),
        ("MLA kv64 (recompute 1/1, loss chunks 16)", 1, 16)]
    assert ("blocks", 1) in seen and ("chunk", 16) in seen and ("chunk", 0) in seen
    assert all(module.mla_base(rows, r) == r["step_ms"] for r in rows)  # each its own MLA kv64 base
    assert "| peak GB |" in md.read_text()
    bad = parser.parse_args(["--device", "cpu", "--loss-chunk-tokens", "0,-4"])
    with pytest.raises(ValueError, match="--loss-chunk-tokens .0,-4.: every value must be >= 0"):
        module.main(bad)


def run_checking_each_row_frees_the_last(monkeypatch, argv, collect: bool = True) -> int:
    """Runs the bench with argv, asserting at each row's build that the previous row's model is gone; returns the
    number of rows built. collect=False turns the automatic collector off, so that only the bench's own collection
    can free a model held in a reference cycle."""
    import gc
    import weakref

    import egmla.bench.train as module

    built, real_build = [], module.build_step

    def build_step(*args, **kwargs):
        assert all(ref() is None for ref in built), "the previous row's model is still allocated"
        config, model, step = real_build(*args, **kwargs)
        built.append(weakref.ref(model))
        return config, model, step

    monkeypatch.setattr(module, "build_step", build_step)
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    if not collect:
        gc.disable()
    try:
        assert module.main(args) == 0
    finally:
        gc.enable()
    return len(built)


def test_a_rows_model_is_freed_before_the_next_row_is_measured(monkeypatch):
    """Recomputing blocks reference themselves (their forward is a partial of the bound method): without a collection
    between rows, the previous row's model (weights, on a GPU) stayed allocated into the next row's peak-GB column."""
    argv = ["--device", "cpu", "--preset", "tiny", "--set", "vocab_size=512", "--set", "n_layers=2", "--variants",
            "mla-kv64", "--activation-checkpointing", "1,2", "--batch", "2", "--seq-len", "16", "--steps", "1",
            "--warmup", "0", "--no-compile"]
    assert run_checking_each_row_frees_the_last(monkeypatch, argv, collect=False) == 2


def test_a_compiled_rows_model_is_freed_before_the_next_row_is_measured(monkeypatch):
    """torch.compile's caches hold the compiled blocks (and a CUDA graph tree its static inputs): on an H100 each
    CUDA-graph row left ~2.5 GB allocated into the next rows' peaks until the bench reset the compiler between rows
    (test_compiled_rows_start_from_the_same_allocated_memory measures that on a GPU)."""
    argv = ["--device", "cpu", "--preset", "tiny", "--set", "vocab_size=512", "--set", "n_layers=1", "--variants",
            "mha", "--loss-chunk-tokens", "0,16", "--batch", "2", "--seq-len", "16", "--steps", "1", "--warmup", "1",
            "--compile"]
    assert run_checking_each_row_frees_the_last(monkeypatch, argv) == 2


def test_memory_snapshot_needs_a_gpu(tmp_path):
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--memory-snapshot", str(tmp_path / "snap")])
    with pytest.raises(ValueError, match="--memory-snapshot .*snap: records CUDA allocations, and this run is on the "
                                         "CPU; run it on a GPU or drop the option"):
        bench_train.main(args)
    assert not (tmp_path / "snap").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_memory_snapshot_writes_a_snapshot_per_row(tmp_path):
    """Each row's allocations, warm-up included, as the file PyTorch's memory viewer reads (a pickle: not loaded
    here, as egmla never unpickles)."""
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--preset", "tiny", "--set", "vocab_size=512", "--set", "n_layers=1", "--variants",
                              "mha", "--loss-chunk-tokens", "0,32", "--batch", "2", "--seq-len", "32", "--steps", "2",
                              "--warmup", "1", "--no-compile", "--memory-snapshot", str(tmp_path / "snap"),
                              "--out", str(out)])
    assert bench_train.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["memory_snapshot"] for r in rows] == [str(tmp_path / "snap" / "mha-plain.pickle"),
                                                     str(tmp_path / "snap" / "mha-loss-chunks-32.pickle")]
    for row in rows:  # a model's worth of allocations, not an empty record
        assert Path(row["memory_snapshot"]).stat().st_size > 10_000
        # the trace's replay finds the allocator's own peak, in a step, and what was live then
        peak = row["memory_peak"]
        assert peak["peak_gb"] == pytest.approx(row["peak_memory_gb"], rel=0.02)
        assert peak["peak_in"] in ("warm-up 1", "step 1", "step 2")
        assert peak["live"] and sum(g["gb"] for g in peak["live"]) + peak["live_other_gb"] > 0
        assert row["peak_reserved_gb"] >= row["peak_memory_gb"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_rows_start_from_the_same_allocated_memory(tmp_path):
    """Each CUDA-graph row starts with only its own model allocated: what was allocated before the row's trace began
    (weights and the graphs' own gradients) is the same in every row, not growing with the rows before it."""
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--preset", "tiny", "--set", "vocab_size=4096", "--variants", "mha",
                              "--activation-checkpointing", "0,1", "--loss-chunk-tokens", "0,32", "--batch", "2",
                              "--seq-len", "64", "--steps", "2", "--warmup", "3", "--compile",
                              "--compile-mode", "reduce-overhead", "--memory-snapshot", str(tmp_path / "snap"),
                              "--out", str(out)])
    assert bench_train.main(args) == 0
    before = [r["memory_peak"]["before_trace_gb"] for r in json.loads(out.read_text())["rows"]]
    assert len(before) == 4 and before[0] > 0
    assert before == pytest.approx([before[0]] * 4, rel=0.01), before


def test_memory_summary_table_from_runs_of_one_gpu(tmp_path, capsys):
    def row(variant, name, mode, memory, peak, reserved, ms):
        return {"variant": variant, "name": name, "compile_mode": mode, "activation_checkpointing": memory[0],
                "loss_chunk_tokens": memory[1], "peak_memory_gb": peak, "peak_reserved_gb": reserved, "step_ms": ms}

    eager = {"device": "GPU X", "rows": [row("mha", "MHA (plain)", None, (0, 0), 15.3, None, 68.1),
                                         row("mha", "MHA (recompute 1/1)", None, (1, 0), 8.6, 9.0, 82.8)]}
    graphs = {"device": "GPU X", "rows": [row("mha", "MHA (reduce-overhead, plain)", "reduce-overhead", (0, 0), 9.4,
                                              10.2, 36.6)]}
    assert bench_train.memory_summary([eager, graphs]).splitlines() == [
        "| allocated peak / reserved GB (step ms) | plain | recompute 1/1 |", "|---|---:|---:|",
        "| MHA, eager | 15.3 / - (68.1) | 8.6 / 9.0 (82.8) |",
        "| MHA, compiled, CUDA graphs | 9.4 / 10.2 (36.6) |  |"]
    # a file from before the memory settings, compile modes in rows and peaks: its run's settings fill them in
    older = {"device": "GPU X", "settings": {"compile": True},
             "rows": [{"variant": "mla-kv64", "name": "MLA kv64", "step_ms": 35.8}]}
    assert bench_train.memory_summary([older]).splitlines()[2] == "| MLA kv64, compiled, no graphs | - / - (35.8) |"
    with pytest.raises(ValueError, match="the files come from GPU X, GPU Y; give files of one GPU"):
        bench_train.memory_summary([eager, {**graphs, "device": "GPU Y"}])
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    paths = []
    for i, meta in enumerate((eager, graphs)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(meta))
    md = tmp_path / "table.md"
    png = tmp_path / "memory.png"
    args = parser.parse_args(["--summary", "--report", *map(str, paths), "--markdown", str(md), "--plot", str(png)])
    assert bench_train.main(args) == 0
    assert md.read_text() == bench_train.memory_summary([eager, graphs])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="--summary: name the runs' JSON files with --report"):
        bench_train.main(parser.parse_args(["--summary"]))
