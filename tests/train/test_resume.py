"""Exact resume: a real SIGKILL mid-run, Ctrl-C, and a corrupt newest checkpoint."""
import dataclasses
import json
import shutil
import signal

import pytest
import torch

from egmla.runs import list_checkpoints
from egmla.train.optim import build_optimizer
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


def test_resume_under_cuda_graph_modes_loads_the_optimizer_and_repeats_the_losses(tmp_path, cache_dir, monkeypatch):
    """Under the CUDA-graph compile modes (train.compile_mode 'auto' on one GPU) every parameter gets its own zero
    gradient (own_gradients) before the first step. That must come after the optimizer state is loaded:
    set_optimizer_state_dict initialises the fresh optimizer's state by a step over zero gradients it creates, and
    skips that where gradients are already there, failing with "AssertionError: Expected device to be set": every
    resume of a compiled one-GPU run failed. Here on the CPU, the trainer's graph switch forced on."""
    import egmla.train.trainer as trainer

    monkeypatch.setattr(trainer, "uses_cuda_graphs", lambda mode: True)
    run = run_config(cache_dir, train=dict(steps=8, checkpoint_every=4, eval_every=4))
    train(run, tmp_path / "reference", progress=False, log=lambda *_: None)
    shutil.copytree(tmp_path / "reference", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000008")  # as if killed after step 4's checkpoint
    messages = []
    train(run, tmp_path / "resumed", resume=True, progress=False, log=messages.append)
    assert any("resuming from" in m and "step_00000004" in m for m in messages)
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "reference")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_compiled_run_on_one_gpu_resumes(tmp_path, cache_dir):
    """The same on a GPU for real: compile_mode 'auto' takes reduce-overhead (CUDA graphs) on one GPU, and the resumed
    run's losses are the uninterrupted run's (to rounding: the embedding's backward adds with atomics)."""
    run = run_config(cache_dir, train=dict(steps=8, checkpoint_every=4, eval_every=4, compile=True,
                                           compile_mode="auto", device="cuda"))
    train(run, tmp_path / "reference", progress=False, log=lambda *_: None)
    shutil.copytree(tmp_path / "reference", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000008")
    train(run, tmp_path / "resumed", resume=True, progress=False, log=lambda *_: None)
    reference, resumed = train_losses(tmp_path / "reference"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == sorted(reference)
    assert [resumed[step] for step in sorted(resumed)] == pytest.approx([reference[s] for s in sorted(reference)],
                                                                         rel=1e-3)


def test_changed_optimizer_settings_take_effect_on_resume(tmp_path, cache_dir, monkeypatch):
    """`--resume RUN --set train.weight_decay=...` (or beta1, beta2, eps) is recorded in config.json as changed, so it
    must be what the optimizer then uses: loading the checkpoint's optimizer state restored the hyperparameters saved
    in its parameter groups, so the change was silently ignored. Only the state (moments, step counts) is the
    checkpoint's."""
    import egmla.train.trainer as trainer

    train(run_config(cache_dir, train=dict(steps=4, checkpoint_every=4)), tmp_path / "run", progress=False,
          log=lambda *_: None)
    built = []
    monkeypatch.setattr(trainer, "build_optimizer", lambda *args: built.append(build_optimizer(*args)) or built[-1])
    changed = dict(steps=6, checkpoint_every=4, weight_decay=0.3, beta1=0.8, beta2=0.9, eps=1e-6)
    train(run_config(cache_dir, train=changed), tmp_path / "run", resume=True, progress=False, log=lambda *_: None)
    decay, plain = built[0].param_groups
    assert decay["weight_decay"] == 0.3 and plain["weight_decay"] == 0.0
    assert all(tuple(group["betas"]) == (0.8, 0.9) and group["eps"] == 1e-6 for group in (decay, plain))
    assert float(next(iter(built[0].state.values()))["step"]) == 6  # the checkpoint's 4 steps, then 2 more


def test_tensorboard_keeps_the_resumed_checkpoints_step(tmp_path, cache_dir):
    """A resume from step S drops the TensorBoard events after S, as it drops metrics.jsonl's records after S; the
    events of step S itself (its validation, logged before the checkpoint) stay. (purge_step was S, which hides
    every event at S or later: each resume erased the validation point of the step it resumed from.)"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = run_config(cache_dir, train=dict(steps=8, checkpoint_every=4, eval_every=4, log_every=1, tensorboard=True))
    train(run, tmp_path / "run", progress=False, log=lambda *_: None)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000008")  # as if killed after step 4's checkpoint
    train(run, tmp_path / "run", resume=True, progress=False, log=lambda *_: None)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("val/val_loss")] == [4, 8]
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, 9))


def test_a_time_budgeted_run_stopped_before_calibrating_keeps_its_schedule_on_resume(tmp_path, cache_dir):
    """A time-budgeted run (steps = 0) sets its length after timing 20 steps of a call. Stopped before (Ctrl-C, or
    here its time limit at step 1) and resumed, it sets it 20 steps into the resumed call, past its warmup: those
    steps ran at the schedule's final learning rate (lr_at of a run of 0 steps); now they hold the peak, and the
    cosine runs from there over the length set."""
    from egmla.train.optim import lr_at

    budget = dict(steps=0, warmup_steps=20, eval_every=0, checkpoint_every=0)
    run_dir = tmp_path / "run"
    first = train(run_config(cache_dir, train=dict(budget, time_limit_s=1e-9)), run_dir, progress=False,
                  log=lambda *_: None)
    resumed_at = first["steps"]
    assert first["stop_reason"] == "time limit reached" and resumed_at < 20
    messages = []
    run = run_config(cache_dir, train=dict(budget, time_limit_s=4.0))
    train(run, run_dir, resume=True, progress=False, log=messages.append)
    [note] = [m for m in messages if m.startswith("time budget")]
    planned = int(note.split("training for ")[1].split()[0])
    assert planned > resumed_at + 21, "the budget fits more steps than the calibration"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    set_at = resumed_at + 20  # the step whose record came before the length was set
    peak = run.train.lr
    assert all(lrs[step] == lr_at(step - 1, run.train) for step in range(resumed_at + 1, set_at + 1))
    assert all(lrs[step] == peak for step in range(21, set_at + 1))  # past the warmup, no length yet: the peak
    schedule = dataclasses.replace(run.train, steps=planned)
    assert all(lrs[step] == pytest.approx(lr_at(step - 1, schedule)) for step in range(set_at + 1, set_at + 4))
    assert peak * 0.9 < lrs[set_at + 1] <= peak  # the cosine's start: near the peak, not its final rate

