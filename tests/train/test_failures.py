"""What a run survives: a full disk at checkpoint time, an optimizer.pt that will not load, a finished
run resumed (summary.json keeps its timings), and a run that fails before its first checkpoint
(runs/latest stays where it was)."""
import errno
import json
import math

import pytest
import torch

from egmla.runs import CheckpointError, StorageError, list_checkpoints, write_manifest
from egmla.train import trainer
from egmla.train.__main__ import main as train_main
from egmla.train.trainer import TrainingDiverged, train
from tests.train.helpers import run_config, train_losses, write_config

TIMINGS = ("median_step_s", "tokens_per_s", "mfu", "train_wall_s")


def quiet(*_):
    pass


def test_a_full_disk_at_checkpoint_time_is_one_line_and_leaves_no_temp_folder(tmp_path, cache_dir, monkeypatch):
    run, run_dir = run_config(cache_dir), tmp_path / "run"  # checkpoints at steps 4, 8 and 12
    real_save, saved = torch.save, []

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        saved.append(path)
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    with pytest.raises(StorageError, match=r"^No space left on device: .*step_00000008/optimizer.pt \(training into "
                                           r".*\); the checkpoints in .* are intact: free space and continue with "
                                           r"`egmla train --resume .*`$"):
        train(run, run_dir, progress=False, log=quiet)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000004"]  # no .tmp-step_*
    monkeypatch.undo()
    train(run, run_dir, resume=True, progress=False, log=quiet)
    assert max(train_losses(run_dir)) == 12


class NotAnOptimizerState:
    pass


def test_an_optimizer_pt_that_will_not_load_falls_back_then_is_a_clear_error(tmp_path, cache_dir):
    run, run_dir = run_config(cache_dir), tmp_path / "run"
    train(run, run_dir, progress=False, log=quiet)
    folders = list_checkpoints(run_dir)  # steps 4, 8, 12
    for folder in folders[1:]:  # checksums agree (the manifest is rewritten): only loading can tell
        torch.save(NotAnOptimizerState(), folder / "optimizer.pt")
        write_manifest(folder)
    messages = []
    train(run, run_dir, resume=True, progress=False, log=messages.append)
    text = "\n".join(messages)
    assert "step_00000012 is unusable (does not load: optimizer.pt is not an optimizer state of tensors" in text
    assert "resuming from" in text and "step_00000004" in text and "weights_only=False" not in text
    for folder in list_checkpoints(run_dir):
        torch.save(NotAnOptimizerState(), folder / "optimizer.pt")
        write_manifest(folder)
    with pytest.raises(CheckpointError, match=r"^--resume .*: no usable weights \(step_00000012: does not load: "
                                              r"optimizer.pt is not an optimizer state") as raised:
        train(run, run_dir, resume=True, progress=False, log=quiet)
    assert "weights_only=False" not in str(raised.value)


def test_resuming_a_finished_run_keeps_its_timings(tmp_path, cache_dir):
    run, run_dir = run_config(cache_dir), tmp_path / "run"
    train(run, run_dir, progress=False, log=quiet)
    before = json.loads((run_dir / "summary.json").read_text())
    assert all(isinstance(before[key], float) and math.isfinite(before[key]) for key in TIMINGS if key != "mfu")
    for steps in (12, 8):  # the same length, and fewer steps than the checkpoint holds
        messages = []
        summary = train(run_config(cache_dir, train=dict(steps=steps)), run_dir, resume=True, progress=False,
                        log=messages.append)
        after = json.loads((run_dir / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
        assert {key: after[key] for key in TIMINGS} == {key: before[key] for key in TIMINGS}
        assert summary["steps"] == 12 and after["final_val_loss"] == pytest.approx(before["final_val_loss"])
        assert any("no step to train: the run is at step 12" in m for m in messages)


def test_a_run_that_fails_before_its_first_checkpoint_does_not_take_runs_latest(tmp_path, cache_dir, monkeypatch,
                                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "run.toml", cache_dir, train=dict(steps=4))
    assert train_main(["--config", str(config), "--no-progress"]) == 0
    latest = tmp_path / "runs" / "latest"
    good = latest.resolve()

    def diverge(*args, **kwargs):
        raise TrainingDiverged("step 1: non-finite loss (nan)")

    monkeypatch.setattr(trainer, "train_step", diverge)
    assert train_main(["--config", str(config), "--no-progress"]) == 2
    assert "non-finite loss" in capsys.readouterr().err
    failed = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest" and p != good]
    assert len(failed) == 1 and (failed[0] / "config.json").is_file() and not list_checkpoints(failed[0])
    assert latest.resolve() == good  # still the run with a checkpoint
