"""Exact resume: a real SIGKILL mid-run, Ctrl-C, and a corrupt newest checkpoint."""
import json
import signal

from egmla.runs import list_checkpoints
from egmla.train.trainer import train
from tests.train.helpers import run_config, run_egmla, start_training, train_losses, wait_for, write_config

SLOW = dict(train=dict(steps=60, checkpoint_every=10, eval_every=30))  # long enough to be killed mid-way


def test_sigkill_then_resume_reproduces_every_loss(tmp_path, cache_dir):
    config = write_config(tmp_path / "run.toml", cache_dir, **SLOW)
    run_egmla("train", "--config", str(config), "--run-dir", str(tmp_path / "reference"), "--no-progress")
    reference = train_losses(tmp_path / "reference")
    assert sorted(reference) == list(range(1, 61))

    killed = tmp_path / "killed"
    process = start_training(config, killed)
    wait_for(lambda: (killed / "checkpoints" / "step_00000020" / "manifest.json").is_file(), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "checkpoints" / "step_00000060").exists()
    before_resume = train_losses(killed)
    assert 20 <= max(before_resume) < 60

    result = run_egmla("train", "--resume", str(killed), "--no-progress")
    assert "resuming from" in result.stdout
    resumed = train_losses(killed)
    assert sorted(resumed) == list(range(1, 61)), "metrics.jsonl must hold each step once after the resume"
    assert resumed == reference  # bit-exact, every step


def test_sigint_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path, cache_dir):
    config = write_config(tmp_path / "run.toml", cache_dir, train=dict(steps=400, checkpoint_every=0, eval_every=0))
    run_dir = tmp_path / "run"
    process = start_training(config, run_dir)
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len((run_dir / "metrics.jsonl").read_text()) > 0,
             process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "interrupted: checkpoint saved at step" in output
    [folder] = list_checkpoints(run_dir)
    stopped_at = json.loads((folder / "state.json").read_text())["step"]
    assert 0 < stopped_at < 400
    assert max(train_losses(run_dir)) == stopped_at
    run_egmla("train", "--resume", str(run_dir), "--no-progress", "--set", "train.steps=" + str(stopped_at + 3))
    assert max(train_losses(run_dir)) == stopped_at + 3


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, cache_dir):
    run = run_config(cache_dir)  # 12 steps, checkpoints at 4, 8, 12
    run_dir = tmp_path / "run"
    train(run, run_dir, progress=False, log=lambda *_: None)
    original = train_losses(run_dir)
    weights = run_dir / "checkpoints" / "step_00000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    messages = []
    train(run, run_dir, resume=True, progress=False, log=messages.append)
    text = "\n".join(messages)
    assert "step_00000012 is unusable" in text and "checksum mismatch" in text
    assert "resuming from" in text and "step_00000008" in text
    assert train_losses(run_dir) == original  # steps 9-12 recomputed exactly


def test_resuming_past_unusable_checkpoints_never_prunes_the_good_ones(tmp_path, cache_dir):
    """Resumed from step 4 because step 8 is unusable, the run's new checkpoints replace that abandoned history: the
    unusable step 8 goes, the new ones are kept. (It used to stay as the 'newest', so keeping one checkpoint pruned
    every good one and left only step 8: the next resume had nothing to start from.)"""
    run_dir = tmp_path / "run"
    train(run_config(cache_dir, train=dict(steps=8, checkpoint_every=4, keep_checkpoints=2)), run_dir,
          progress=False, log=lambda *_: None)
    weights = run_dir / "checkpoints" / "step_00000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    train(run_config(cache_dir, train=dict(steps=7, checkpoint_every=3, keep_checkpoints=1)), run_dir, resume=True,
          progress=False, log=lambda *_: None)
    assert [folder.name for folder in list_checkpoints(run_dir)] == ["step_00000007"]
    assert sorted(train_losses(run_dir)) == list(range(1, 8))
