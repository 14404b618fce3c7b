"""`egmla bench multigpu` (issues 10 and 20's one-call run) on CPU: 2 gloo processes at tiny shapes with gradient
accumulation (2 micro-batches per process), 1 process on the same global batch, DDP plain and with
gradient_as_bucket_view + static_graph (one micro-batch per process), FSDP2 with bf16 weights, fp32 reduction and
no resharding after forward, the bf16 compression hook (skipped on gloo), a profiled DDP run and a checkpoint
saved by 2 processes resumed under 1. The run plan, the parsers and the checks are also tested without running."""
import json
import os
import subprocess
import sys

import pytest
import torch

from egmla.bench import multigpu
from egmla.train.distributed import DistInfo, per_rank
from egmla.train.metrics import peak_memory_bytes
from tests.train.helpers import subprocess_env, train_losses, write_config

STEPS = 8
TOLERANCE = 2e-5  # fp32 on CPU: all-reduce order and the per-process batch split change only the rounding
VARIANTS = "ddp;ddp-static;fsdp-bf16;ddp-bf16-hook"
PROFILED = 2


@pytest.fixture(scope="module")
def result(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("multigpu")
    config = write_config(root / "run.toml", cache_dir)
    out, work = root / "out", root / "work"
    command = [sys.executable, "-m", "egmla", "bench", "multigpu", "--device", "cpu", "--config", str(config),
               "--steps", str(STEPS), "--max-bytes", "300000", "--cache-dir", str(cache_dir), "--work", str(work),
               "--out", str(out), "--variants", VARIANTS, "--profile", "--profile-steps", str(PROFILED),
               "--set", "train.micro_batch_size=2"]
    completed = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, failure_message(completed, out)
    return json.loads((out / "multigpu.json").read_text()), out, work


def failure_message(completed, out) -> str:
    """The report's end and each failed child's own output (the report alone cut off the error that mattered)."""
    report = out / "multigpu.json"
    failed = {name: run.get("error_tail", "")[-2500:] for name, run in json.loads(report.read_text())["runs"].items()
              if run["status"].startswith("failed")} if report.is_file() else {}
    return (completed.stdout[-2500:] + completed.stderr[-2500:]
            + "".join(f"\n===== {name} failed; its output ends:\n{tail}" for name, tail in failed.items()))


def test_every_run_is_reported(result):
    report, out, _ = result
    runs = report["runs"]
    assert list(runs) == ["single", "ddp-x2", "profile", "resume", "ddp-static-x2", "fsdp-bf16-x2", "ddp-bf16-hook-x2"]
    finished = {name: (r["processes"], r["steps"]) for name, r in runs.items() if r["status"] == "ok"}
    profiled = multigpu.PROFILE_WARMUP_STEPS + PROFILED
    assert finished == {"single": (1, STEPS), "ddp-x2": (2, STEPS), "profile": (2, profiled), "resume": (1, STEPS),
                        "ddp-static-x2": (2, STEPS), "fsdp-bf16-x2": (2, STEPS)}
    assert runs["ddp-bf16-hook-x2"]["status"].startswith("skipped on the CPU: DDP takes the bf16 compression hook")
    for name in finished:
        run = runs[name]
        assert run["tokens_per_s"] > 0 and run["tokens_per_s_per_gpu"] == pytest.approx(
            run["tokens_per_s"] / run["processes"])
        # one value per rank, gathered over gloo in the 2-process runs
        assert len(run["peak_memory_bytes_per_rank"]) == run["processes"], name
        assert all(value > 0 for value in run["peak_memory_bytes_per_rank"]), name
        assert "--nproc_per_node=" in run["command"]
        if name not in ("single", "resume"):
            expected = run["tokens_per_s"] / (2 * runs["single"]["tokens_per_s"])
            assert run["scaling_efficiency"] == pytest.approx(expected)
    # each run got its variant's settings, and only the first variant's first run keeps checkpoints for the resume
    assert "--set train.ddp_static_graph=true" in runs["ddp-static-x2"]["command"]
    assert "--set train.micro_batch_size=0" in runs["ddp-static-x2"]["command"]
    assert "--set 'train.fsdp_param_dtype=\"bf16\"'" in runs["fsdp-bf16-x2"]["command"]
    assert "--set train.fsdp_reshard_after_forward=false" in runs["fsdp-bf16-x2"]["command"]
    assert "train.checkpoint_every=0" not in runs["ddp-x2"]["command"]
    assert "train.checkpoint_every=0" in runs["ddp-static-x2"]["command"]
    assert set(report["targets"]) == {"ddp-x2", "fsdp-x2"}
    assert report["targets"]["fsdp-x2"]["best_run"] == "fsdp-bf16-x2"
    losses = train_losses(result[2] / "single")
    assert losses[STEPS] < losses[1] - 0.3  # it trains
    table = (out / "multigpu.md").read_text()
    assert "| ddp-x2 | 2 | parallel=ddp |" in table and "| fsdp-bf16-x2 | 2 |" in table
    assert "egmla bench multigpu --device cpu" in table and "[profile.md](profile.md)" in table
    # at most 8 files: a device call brings back no more
    assert sorted(p.name for p in out.iterdir()) == sorted(multigpu.OUT_FILES)


def test_drift_is_measured_per_run(result):
    runs = result[0]["runs"]
    window = (STEPS - multigpu.WARMUP_STEPS) // 2  # 2 steps of 8: first steps 4-5, last steps 7-8
    for name in ("single", "ddp-x2", "ddp-static-x2", "fsdp-bf16-x2"):
        drift = runs[name]["drift"]
        assert (drift["steps"], drift["first"], drift["last"]) == (window, [4, 5], [7, 8]), name
        assert drift["ratio"] == pytest.approx(drift["last_median_s"] / drift["first_median_s"])
    assert runs["resume"]["drift"] is None  # of its own steps 5-8 only, less 3 warm-up steps: too few to compare


def test_losses_agree_with_one_process(result):
    agreement = result[0]["loss_agreement"]
    runs = agreement["runs"]
    assert agreement["steps"] == STEPS and agreement["passed"]
    assert set(runs) == {"ddp-x2", "profile", "ddp-static-x2", "fsdp-bf16-x2"}
    assert not runs["profile"]["compared"]  # its length sets another lr schedule
    for name in ("ddp-x2", "ddp-static-x2"):  # fp32: rounding only, accumulation or not, static graph or not
        assert runs[name]["max_relative_difference"] < TOLERANCE and runs[name]["rtol"] == multigpu.FP32_RTOL
    # bf16 weights: compared at bf16 rounding, and they do change the losses (the policy is applied)
    bf16 = runs["fsdp-bf16-x2"]
    assert bf16["rtol"] == multigpu.BF16_RTOL and 1e-6 < bf16["max_relative_difference"] < multigpu.BF16_RTOL


def test_checkpoint_from_two_processes_resumes_under_one(result):
    resume = result[0]["resume"]
    assert resume["passed"] and resume["resumed_from_checkpoint"] and resume["source"] == "ddp-x2"
    assert (resume["saved_by_processes"], resume["resumed_with_processes"], resume["checkpoint_step"]) == (2, 1, 4)
    assert resume["compared_steps"] == [5, STEPS] and resume["max_relative_difference"] < TOLERANCE
    # once nothing resumes from them, every run's checkpoints are gone (GBs each at paper-base); the records stay
    work = result[2]
    assert not list(work.glob("*/checkpoints")) and (work / "ddp-x2" / "metrics.jsonl").exists()


def test_the_resumed_copy_links_the_checkpoint_files(tmp_path):
    """link_copy: the copy shares the checkpoint files up to the resumed step (hard links), not later checkpoints nor
    the files a run rewrites in place."""
    source = tmp_path / "ddp-x2"
    for step in (4, 8):
        folder = source / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
    (source / "loss.png").write_bytes(b"png")
    multigpu.link_copy(source, tmp_path / "resume", 4)
    step = "checkpoints/step_00000004/model.safetensors"
    assert (tmp_path / "resume" / step).stat().st_ino == (source / step).stat().st_ino
    assert not (tmp_path / "resume" / "checkpoints" / "step_00000008").exists()
    assert (tmp_path / "resume" / "loss.png").stat().st_ino != (source / "loss.png").stat().st_ino


def test_profile_of_ddp_steps(result):
    report, out, _ = result
    profile = report["profile"]
    first = multigpu.PROFILE_WARMUP_STEPS + 1
    assert (profile["first_step"], profile["last_step"], profile["steps"]) == (first, first + PROFILED - 1, PROFILED)
    assert profile["parallel"] == "ddp" and profile["world_size"] == 2 and len(profile["ranks"]) == 2
    for rank in profile["ranks"]:
        assert rank["steps"] == PROFILED and rank["gpu"] is None  # CPU: no device timeline
        assert set(rank["host_ms"]) == {"data", "forward_backward", "clip", "loss_reduce", "optimizer", "between"}
        assert 0 < rank["host_ms"]["forward_backward"] < rank["wall_ms"]
        assert sum(rank["host_ms"].values()) <= rank["wall_ms"] * 1.01
    assert profile["kernels"]["top"] and profile["kernels"]["kernel_ms_per_step"] > 0
    text = (out / "profile.md").read_text()
    assert "| per step, ms | rank 0 | rank 1 |" in text and "#### Kernels of rank 0" in text


def test_plot_reads_the_merged_records(result):
    _, out, _ = result
    records = multigpu.plotted_records(out)
    assert set(records) == {"single", "ddp-x2", "profile", "resume", "ddp-static-x2", "fsdp-bf16-x2"}
    assert [r["step"] for r in records["single"]] == list(range(1, STEPS + 1))
    assert set(records["single"][0]) == {"run", *multigpu.PLOTTED}
    assert multigpu.plot(out, 4) == out / "multigpu.png"  # --plot-only redraws from them


def test_checks_fail_when_they_should(result):
    """The same runs against an impossible tolerance fail; a missing step is reported, not skipped."""
    report, _, work = result
    strict = multigpu.compare_losses(work, report["runs"], STEPS, on_gpu=False, rtol=1e-12)
    assert not strict["passed"]
    assert multigpu.max_relative_difference({1: 2.0}, {1: 2.0, 2: 1.0}, [1, 2]) is None
    assert multigpu.max_relative_difference({1: 2.2}, {1: 2.0}, [1]) == pytest.approx(0.1)


def test_run_plan():
    variants = multigpu.parse_variants("ddp;mine:parallel=fsdp,train.fsdp_param_dtype=bf16")
    assert variants == {"ddp": {"parallel": "ddp"}, "mine": {"parallel": "fsdp", "fsdp_param_dtype": "bf16"}}
    runs = multigpu.plan_runs(variants, [2, 4], 150, profile_steps=20)
    assert [(r["name"], r["processes"], r["steps"]) for r in runs] == [
        ("single", 1, 150), ("ddp-x2", 2, 150), ("ddp-x4", 4, 150), ("profile", 2, 50), ("resume", 1, 75),
        ("mine-x2", 2, 150), ("mine-x4", 4, 150)]
    assert runs[1]["extra"] == {} and runs[2]["extra"]["checkpoint_every"] == 0  # only ddp-x2 keeps checkpoints
    assert runs[3]["extra"]["profile_steps"] == 20 and runs[4]["resumes"] == "ddp-x2"
    assert [r["name"] for r in multigpu.plan_runs(variants, [1], 8, 0)] == ["single", "ddp-x1", "resume", "mine-x1"]
    assert multigpu.process_counts("auto", {"gpus": 8}, on_cpu=False) == [2, 4]
    assert multigpu.process_counts("auto", {"gpus": 2}, on_cpu=False) == [2]
    assert multigpu.process_counts("auto", {"gpus": 0}, on_cpu=True) == [2]
    assert multigpu.process_counts("4,2", {"gpus": 4}, on_cpu=False) == [4, 2]
    for bad in ("1,2", "2,2", "0", "two"):
        with pytest.raises(ValueError, match="--nproc"):
            multigpu.process_counts(bad, {"gpus": 4}, on_cpu=False)
    for bad, message in (("nope", "not one of"), ("x:parallel", "KEY=VALUE"), ("ddp;ddp", "its own name"),
                         ("single", "its own name"), ("", "at least one")):
        with pytest.raises(ValueError, match=message):
            multigpu.parse_variants(bad)


def test_budget_and_drift_helpers(tmp_path):
    # a run the budget cannot hold is skipped before it starts, by what the finished runs predict
    done = {"a": {"wall_s": 60.0, "trained_steps": 100, "median_step_s": 0.2, "processes": 1},
            "b": {"wall_s": 50.0, "trained_steps": 100, "median_step_s": 0.1, "processes": 2},
            "c": {"wall_s": 90.0, "trained_steps": 100, "median_step_s": 0.1, "processes": 2}}  # fixed 40, 40, 80
    assert multigpu.expected_wall_s({}, 100, 2) == 30.0
    assert multigpu.expected_wall_s(done, 50, 2) == pytest.approx(1.1 * (40 + 50 * 0.1))
    assert multigpu.expected_wall_s(done, 50, 4) == pytest.approx(1.1 * (40 + 50 * 0.2))
    jobs = multigpu.Jobs(tmp_path / "log", {}, deadline=multigpu.time.monotonic() + 100)
    assert jobs.run("x", ["false"], expected_s=120)["status"].startswith("skipped: call budget spent")
    times = {step: 0.1 for step in range(1, 151)} | {step: 0.13 for step in range(101, 151)}
    drift = multigpu.drift(times)
    assert (drift["first"], drift["last"], drift["passed"]) == ([4, 53], [101, 150], False)
    assert drift["ratio"] == pytest.approx(1.3)
    assert multigpu.drift({1: 0.1, 2: 0.1, 3: 0.1}) is None


def test_a_run_that_lost_its_port_runs_again(tmp_path):
    """A run that failed because its rendezvous port was taken, before any step, runs once more and says so; any
    other failure, or one after steps ran, is not repeated."""
    jobs = multigpu.Jobs(tmp_path / "log", dict(os.environ), deadline=multigpu.time.monotonic() + 100)
    marker = tmp_path / "tried"
    lost_once = (f"if [ -e {marker} ]; then echo 'step 8: train loss 1.0'; exit 0; fi; touch {marker}; "
                 "echo 'torch.distributed.DistNetworkError: port: 41234, name: EADDRINUSE, message: address already "
                 "in use'; exit 1")
    job = jobs.run("x", ["bash", "-c", lost_once])
    assert job["status"] == "ok" and "rendezvous port was taken" in job["retried"]
    assert "failed (exit status 1)" in job["retried"]
    for output in ("RuntimeError: something else", "step 2: train loss 3.0\nEADDRINUSE"):
        marker.unlink(missing_ok=True)
        counting = f"echo try >> {marker}; echo '{output}'; exit 1"
        job = jobs.run("y", ["bash", "-c", counting])
        assert job["status"] == "failed (exit status 1)" and "retried" not in job
        assert marker.read_text().count("try") == 1


def test_peak_memory_per_rank_single_process():
    value, measure = peak_memory_bytes(torch.device("cpu"))
    assert value > 10 * 2**20 and measure == "peak RSS (ru_maxrss)"  # this process holds torch: > 10 MiB
    assert per_rank(123.0, DistInfo()) == [123.0]
