"""`egmla bench multigpu` (issue 10's one-call run) on CPU: 2 gloo processes at tiny shapes, DDP, FSDP2
and 1 process on the same global batch, and a checkpoint saved by 2 processes resumed under 1."""
import json
import subprocess
import sys

import pytest
import torch

from egmla.bench import multigpu
from egmla.runs import verify_checkpoint
from egmla.train.distributed import DistInfo, per_rank
from egmla.train.metrics import peak_memory_bytes
from tests.train.helpers import subprocess_env, train_losses, write_config

STEPS = 8
TOLERANCE = 2e-5  # fp32 on CPU: all-reduce order and the per-process batch split change only the rounding


@pytest.fixture(scope="module")
def result(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("multigpu")
    config = write_config(root / "run.toml", cache_dir)
    out, work = root / "out", root / "work"
    command = [sys.executable, "-m", "egmla", "bench", "multigpu", "--device", "cpu", "--config", str(config), "--steps", str(STEPS),
               "--max-bytes", "300000", "--cache-dir", str(cache_dir), "--work", str(work), "--out", str(out)]
    completed = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return json.loads((out / "multigpu.json").read_text()), out, work


def test_three_runs_and_resume_are_reported(result):
    report, out, _ = result
    runs = report["runs"]
    assert {name: (runs[name]["status"], runs[name]["processes"], runs[name]["steps"]) for name in runs} == {
        "ddp": ("ok", 2, STEPS), "fsdp": ("ok", 2, STEPS), "single": ("ok", 1, STEPS), "resume": ("ok", 1, STEPS)}
    for name, run in runs.items():
        assert run["tokens_per_s"] > 0 and run["tokens_per_s_per_gpu"] == pytest.approx(
            run["tokens_per_s"] / run["processes"])
        # one value per rank, gathered over gloo in the 2-process runs
        assert len(run["peak_memory_bytes_per_rank"]) == run["processes"], name
        assert all(value > 0 for value in run["peak_memory_bytes_per_rank"]), name
        assert "--nproc_per_node=" in run["command"]
    assert set(report["scaling_efficiency"]) == {"ddp", "fsdp"}
    assert report["scaling_efficiency"]["ddp"] == pytest.approx(
        runs["ddp"]["tokens_per_s"] / (2 * runs["single"]["tokens_per_s"]))
    losses = train_losses(result[2] / "single")
    assert losses[STEPS] < losses[1] - 0.3  # it trains
    table = (out / "multigpu.md").read_text()
    assert "| DDP | 2 |" in table and "| FSDP2 | 2 |" in table and "egmla bench multigpu --device cpu" in table
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["multigpu.json", "multigpu.md", "multigpu.log", "multigpu.png"] + [f"metrics_{n}.jsonl" for n in runs])
    # what the plot reads of each run, and no more: one record per step with its loss and time
    plotted = [json.loads(line) for line in (out / "metrics_single.jsonl").read_text().splitlines()]
    assert [r["step"] for r in plotted] == list(range(1, STEPS + 1)) and set(plotted[0]) == set(multigpu.PLOTTED)
    assert multigpu.plot(out, 4) == out / "multigpu.png"  # --plot-only redraws from them


def test_losses_agree_across_process_counts(result):
    agreement = result[0]["loss_agreement"]
    assert agreement["steps"] == STEPS and len(agreement["pairs"]) == 3
    assert agreement["passed"] and agreement["max_relative_difference"] < TOLERANCE
    assert agreement["max_relative_difference"] == max(agreement["pairs"].values())


def test_checkpoint_from_two_processes_resumes_under_one(result):
    resume = result[0]["resume"]
    assert resume["passed"] and resume["resumed_from_checkpoint"]
    assert (resume["saved_by_processes"], resume["resumed_with_processes"], resume["checkpoint_step"]) == (2, 1, 4)
    assert resume["compared_steps"] == [5, STEPS] and resume["max_relative_difference"] < TOLERANCE
    # the copy shares the checkpoint files (hard links), not the files a run rewrites in place
    work, step = result[2], "checkpoints/step_00000004/model.safetensors"
    assert (work / "resume" / step).stat().st_ino == (work / "ddp" / step).stat().st_ino
    assert (work / "resume" / "loss.png").stat().st_ino != (work / "ddp" / "loss.png").stat().st_ino
    assert verify_checkpoint(work / "ddp" / "checkpoints" / "step_00000004") is None


def test_checks_fail_when_they_should(result):
    """The same runs against an impossible tolerance fail; a missing step is reported, not skipped."""
    work = result[2]
    strict = multigpu.compare_losses(work, ["ddp", "fsdp", "single"], STEPS, rtol=1e-12)
    assert not strict["passed"]
    assert multigpu.max_relative_difference({1: 2.0}, {1: 2.0, 2: 1.0}, [1, 2]) is None
    assert multigpu.max_relative_difference({1: 2.2}, {1: 2.0}, [1]) == pytest.approx(0.1)


def test_peak_memory_per_rank_single_process():
    value, measure = peak_memory_bytes(torch.device("cpu"))
    assert value > 10 * 2**20 and measure == "peak RSS (ru_maxrss)"  # this process holds torch: > 10 MiB
    assert per_rank(123.0, DistInfo()) == [123.0]
