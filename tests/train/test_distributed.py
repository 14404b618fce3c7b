"""torchrun on CPU (gloo) with 2 processes: DDP and FSDP2 give the single-process losses (same global
batch) to rounding, with dense and with row-sparse gate-table updates and with the memory savers (recomputed
blocks, the chunked loss), and checkpoints move between process counts in both directions."""
import json
import shutil

import pytest

from tests.train.helpers import run_egmla, train_losses, write_config

TOLERANCE = 2e-5  # relative: all-reduce order and per-process batch split change only the rounding


def assert_close(losses, reference, steps):
    assert sorted(losses) == sorted(reference) == list(steps)
    for step in steps:
        assert losses[step] == pytest.approx(reference[step], rel=TOLERANCE), f"step {step}"


def val_losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["val_loss"] for r in map(json.loads, lines) if r["kind"] == "val"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """Single-process, DDP and FSDP runs of the same 12-step config (checkpoints at 4, 8, 12), each with dense
    and with row-sparse gate-table updates (the row-sparse step reads the all-reduced, or sharded, gradient)."""
    root = tmp_path_factory.mktemp("dist")
    config = write_config(root / "run.toml", cache_dir)
    out = {}
    for update in ("dense", "row-sparse"):
        for name, procs, mode in (("single", 0, "ddp"), ("ddp", 2, "ddp"), ("fsdp", 2, "fsdp")):
            name += "" if update == "dense" else f"-{update}"
            run_egmla("train", "--config", str(config), "--run-dir", str(root / name), "--no-progress",
                      "--set", f"train.parallel={mode}", "--set", f"train.gate_table_update={update}", torchrun=procs)
            out[name] = root / name
    for mode in ("ddp", "fsdp"):  # the memory savers: the head is applied outside the wrapped forward
        run_egmla("train", "--config", str(config), "--run-dir", str(root / f"{mode}-lean"), "--no-progress",
                  "--set", f"train.parallel={mode}", "--set", "train.activation_checkpointing=1",
                  "--set", "train.loss_chunk_tokens=40", torchrun=2)
        out[f"{mode}-lean"] = root / f"{mode}-lean"
    return out


@pytest.mark.parametrize("mode, update", [("ddp", ""), ("fsdp", ""), ("ddp", "-row-sparse"), ("fsdp", "-row-sparse")])
def test_two_processes_match_one(runs, mode, update):
    reference = train_losses(runs["single" + update])
    assert reference[12] < reference[1] - 0.5  # it trains
    assert_close(train_losses(runs[mode + update]), reference, range(1, 13))
    assert val_losses(runs[mode + update]) == pytest.approx(val_losses(runs["single" + update]), rel=TOLERANCE)
    summary = json.loads((runs[mode + update] / "summary.json").read_text())
    assert summary["world_size"] == 2


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_memory_savers_under_two_processes_match_one_plain_process(runs, mode):
    """Recomputed blocks and the chunked loss under DDP / FSDP2: the chunked loss applies the output head outside
    the wrapped forward (its weight's gradient must still be all-reduced, or reduce-scattered)."""
    assert_close(train_losses(runs[f"{mode}-lean"]), train_losses(runs["single"]), range(1, 13))
    assert val_losses(runs[f"{mode}-lean"]) == pytest.approx(val_losses(runs["single"]), rel=TOLERANCE)


@pytest.mark.parametrize("source, procs, mode", [("ddp", 0, "ddp"), ("single", 2, "fsdp")])
def test_checkpoint_resumes_under_another_process_count(runs, tmp_path, source, procs, mode):
    run_dir = tmp_path / "copy"
    shutil.copytree(runs[source], run_dir)
    for step in (8, 12):  # make step 4 the newest checkpoint
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step:08d}")
    result = run_egmla("train", "--resume", str(run_dir), "--no-progress", "--set", f"train.parallel={mode}",
                       torchrun=procs)
    assert "step_00000004" in result.stdout
    assert_close(train_losses(run_dir), train_losses(runs["single"]), range(1, 13))
