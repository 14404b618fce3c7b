"""What a run survives: a full disk at checkpoint time, an optimizer.pt that will not load, a finished
run resumed (summary.json keeps its timings), and a run that fails before its first checkpoint
(runs/latest stays where it was)."""
import errno
import json
import math
import os
import shutil

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
    """A real failed write, not a mocked one: the second checkpoint is written under a file-size limit (the kernel
    refuses writes past it, as a full disk does) that its weights fit and its optimizer state does not. torch.save
    straight to the file turned that into an opaque RuntimeError."""
    import resource
    import signal

    from egmla.train import checkpoint

    run, run_dir = run_config(cache_dir), tmp_path / "run"  # checkpoints at steps 4, 8 and 12
    real_save, calls = checkpoint.save_checkpoint, []

    def save_on_a_full_disk(run_dir, step, *args, **kwargs):
        calls.append(step)
        if len(calls) != 2:
            return real_save(run_dir, step, *args, **kwargs)
        weights = (list_checkpoints(run_dir)[-1] / "model.safetensors").stat().st_size
        limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (weights + 4096, limits[1]))
        try:
            return real_save(run_dir, step, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_on_a_full_disk)
    with pytest.raises(StorageError, match=r"^File too large: .*step_00000008/optimizer.pt \(training into "
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


def test_a_cache_dir_that_is_a_file_is_not_told_to_free_space(tmp_path, capsys):
    """data.cache_dir pointing at a file said "Not a directory: ...; free space and start again"."""
    (tmp_path / "a-file").write_text("x")
    config = write_config(tmp_path / "run.toml", tmp_path / "a-file")
    assert train_main(["--config", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Not a directory: " in err and "a-file" in err and "make that path a folder you can write" in err
    assert "free space" not in err and "Traceback" not in err


@pytest.mark.parametrize("state", [{}, {"step": 8}, [8]])
def test_a_state_json_without_what_resume_reads_is_a_checkpoint_error_not_a_key_error(tmp_path, state):
    """A state.json whose checksum matches but lacks `step` was a KeyError mid-resume: now the checkpoint is unusable
    (find_checkpoint then tries the previous one)."""
    from egmla.train.checkpoint import read_state

    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"^state.json lacks .*rng; it is not one the trainer wrote$"):
        read_state(tmp_path)


def test_resuming_a_finished_run_keeps_its_timings(tmp_path, cache_dir):
    run, run_dir = run_config(cache_dir), tmp_path / "run"
    train(run, run_dir, progress=False, log=quiet)
    before = json.loads((run_dir / "summary.json").read_text())
    assert all(isinstance(before[key], float) and math.isfinite(before[key]) for key in TIMINGS if key != "mfu")
    messages = []  # fewer steps than the checkpoint holds are refused (test below)
    summary = train(run_config(cache_dir, train=dict(steps=12)), run_dir, resume=True, progress=False,
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


def test_train_settings_changed_on_resume_are_kept_for_the_next_resume(tmp_path, cache_dir, capsys):
    """`--resume RUN --set train.steps=8`, a crash, then a plain `--resume RUN` (what the README says to run): the
    run continues to step 8. (config.json kept the old settings: the plain resume declared the run finished at 6.)"""
    run_dir = tmp_path / "run"
    train(run_config(cache_dir, train=dict(steps=4, checkpoint_every=2)), run_dir, progress=False, log=quiet)
    assert train_main(["--resume", str(run_dir), "--no-progress", "--set", "train.steps=8"]) == 0
    assert "changed on resume, kept in" in capsys.readouterr().out
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 8
    shutil.rmtree(run_dir / "checkpoints" / "step_00000008")  # the crash: killed after step 6's checkpoint
    assert train_main(["--resume", str(run_dir), "--no-progress"]) == 0
    assert sorted(train_losses(run_dir)) == list(range(1, 9))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8


def test_a_resume_that_finds_no_checkpoint_leaves_config_json_as_it_was(tmp_path, cache_dir, capsys):
    """`--resume RUN --set train.steps=8` where no checkpoint loads: an error, and the run's recorded settings
    unchanged (they were rewritten before the checkpoints were looked at)."""
    run_dir = tmp_path / "run"
    train(run_config(cache_dir, train=dict(steps=4, checkpoint_every=2)), run_dir, progress=False, log=quiet)
    before = (run_dir / "config.json").read_bytes()
    for folder in list_checkpoints(run_dir):
        shutil.rmtree(folder)
    assert train_main(["--resume", str(run_dir), "--no-progress", "--set", "train.steps=8"]) == 2
    captured = capsys.readouterr()
    assert "--resume" in captured.err and "changed on resume" not in captured.out
    assert (run_dir / "config.json").read_bytes() == before


def test_a_resume_refused_after_its_checkpoint_loads_leaves_config_json_as_it_was(tmp_path, cache_dir, capsys):
    """`--resume RUN --set train.batch_size=N` with more sequences per batch than the split holds: refused once the
    batches are built, after the checkpoint was found. The run's recorded settings stay as they were (they were
    rewritten as soon as the checkpoint loaded, so every later plain `--resume` failed the same way)."""
    run_dir = tmp_path / "run"
    train(run_config(cache_dir, train=dict(steps=4, checkpoint_every=2)), run_dir, progress=False, log=quiet)
    before = (run_dir / "config.json").read_bytes()
    assert train_main(["--resume", str(run_dir), "--no-progress", "--set", "train.steps=8",
                       "--set", "train.batch_size=1000000"]) == 2
    captured = capsys.readouterr()
    assert "train.batch_size=1000000: the training split has only" in captured.err
    assert "changed on resume" not in captured.out
    assert (run_dir / "config.json").read_bytes() == before


def test_a_resume_over_a_changed_corpus_says_so(tmp_path, cache_dir, capsys):
    """The checkpoint records its splits' token counts; a resume that reads other counts (here the corpus cut shorter,
    as files removed would) warns that the run goes on over other data. The same corpus says nothing."""
    import lzma

    from egmla.data.build_embedded import EMBEDDED_PATH

    text = lzma.decompress(EMBEDDED_PATH.read_bytes()).decode()[:300_000]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    run_dir = tmp_path / "run"
    train(run_config(cache_dir, train=dict(steps=4, checkpoint_every=2), data=dict(corpus=str(corpus))), run_dir,
          progress=False, log=quiet)
    state = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert state["train_split_tokens"] > 0 and state["val_split_tokens"] > 0
    assert train_main(["--resume", str(run_dir), "--no-progress", "--set", "train.steps=6"]) == 0
    assert "the corpus changed" not in capsys.readouterr().out
    corpus.write_text(text[:200_000])  # files edited or removed since
    assert train_main(["--resume", str(run_dir), "--no-progress", "--set", "train.steps=8"]) == 0
    out = capsys.readouterr().out
    assert f"warning: the corpus changed since this checkpoint (training tokens {state['train_split_tokens']:,} -> " in out


def test_resume_refuses_fewer_steps_than_the_checkpoint_and_keeps_the_recorded_length(tmp_path, cache_dir, capsys):
    run_dir = tmp_path / "run"
    train(run_config(cache_dir, train=dict(steps=4, checkpoint_every=2)), run_dir, progress=False, log=quiet)
    recorded = (run_dir / "config.json").read_bytes()
    assert train_main(["--resume", str(run_dir), "--no-progress", "--set", "train.steps=2"]) == 2
    assert ("train.steps=2: the run's checkpoint is already at step 4; pass train.steps above 4"
            in capsys.readouterr().err)
    assert (run_dir / "config.json").read_bytes() == recorded
    assert train_main(["--resume", str(run_dir), "--no-progress", "--set", "train.steps=4"]) == 0  # finishes there


def test_resume_refuses_another_seed_and_another_folder(tmp_path, cache_dir, capsys):
    run_dir = tmp_path / "run"
    train(run_config(cache_dir, train=dict(steps=2, checkpoint_every=2)), run_dir, progress=False, log=quiet)
    assert train_main(["--resume", str(run_dir), "--no-progress", "--set", "train.seed=5"]) == 2
    assert "train.seed=5: the run was started with seed 0, which orders its data" in capsys.readouterr().err
    assert train_main(["--resume", str(run_dir), "--run-dir", str(tmp_path / "elsewhere"), "--no-progress"]) == 2
    assert "a resumed run continues in its own folder" in capsys.readouterr().err


def test_a_metrics_line_cut_short_does_not_block_the_resume(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    train(run_config(cache_dir, train=dict(steps=4, checkpoint_every=2)), run_dir, progress=False, log=quiet)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # a full disk mid-write
    messages = []
    train(run_config(cache_dir, train=dict(steps=6, checkpoint_every=2)), run_dir, resume=True, progress=False,
          log=messages.append)
    assert any("dropped 1 line(s) cut short" in m for m in messages)
    assert sorted(train_losses(run_dir)) == list(range(1, 7))


def test_a_finished_run_resumed_logs_its_validation_once(tmp_path, cache_dir):
    run, run_dir = run_config(cache_dir), tmp_path / "run"
    train(run, run_dir, progress=False, log=quiet)
    train(run, run_dir, resume=True, progress=False, log=quiet)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [6, 12]


def test_a_stop_asked_during_the_last_step_finishes_the_run(tmp_path, cache_dir, monkeypatch):
    """Ctrl-C (or the time limit) seen during the last step: that step runs anyway, so the run is complete, not
    'interrupted'."""
    real_step = trainer.train_step

    def stop_during_the_last(*args, **kwargs):
        loss, grad_norm, _, _ = real_step(*args, **kwargs)
        return loss, grad_norm, float(args[8] == 11), 0.0  # step index 11: the 12th, last step

    monkeypatch.setattr(trainer, "train_step", stop_during_the_last)
    messages = []
    summary = train(run_config(cache_dir), tmp_path / "run", progress=False, log=messages.append)
    assert summary["steps"] == 12 and not summary.get("interrupted")
    assert not any("interrupted" in m for m in messages)


def test_a_warmup_longer_than_the_run_is_said_at_the_start_and_the_run_trains(tmp_path, cache_dir):
    said = []
    train(run_config(cache_dir, train=dict(steps=2, warmup_steps=5, checkpoint_every=2)), tmp_path / "run",
          progress=False, log=said.append)
    assert said[0].startswith("warning: train.warmup_steps=5 is longer than the run (train.steps=2): the learning "
                              "rate rises to 40% of train.lr")
    assert (tmp_path / "run" / "summary.json").exists()


def test_a_resume_removes_what_saves_killed_mid_write_left_and_says_so(tmp_path, cache_dir):
    """SIGKILL (or a power loss) during a save leaves a checkpoint folder under its temporary name (a paper-base one
    holds gigabytes) or an atomic write's `.NAME.*.tmp` file; nothing ever removed them. The next trainer to hold the
    run's lock removes them (no live writer can own them then), names them, and leaves everything else alone."""
    import tempfile

    from egmla.train import checkpoint

    run, run_dir = run_config(cache_dir), tmp_path / "run"
    train(run, run_dir, progress=False, log=quiet)
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    cut_short = run_dir / "checkpoints" / f"{checkpoint.ASSEMBLING}step_00000016"  # as save_checkpoint names it
    cut_short.mkdir()
    (cut_short / "model.safetensors").write_bytes(b"\0" * 5000)
    fd, weights_tmp = tempfile.mkstemp(dir=run_dir, prefix=".model.safetensors.", suffix=".tmp")  # as save_weights
    os.write(fd, b"\0" * 3000)
    os.close(fd)
    (run_dir / ".notes").write_text("mine")  # not a save's: stays
    said = []
    train(run, run_dir, resume=True, progress=False, log=said.append)
    removal = [line for line in said if line.startswith("removed")]
    assert removal == [f"removed 2 leftover(s) of saves cut short (0.0 MB): checkpoints/{cut_short.name}, "
                       f"{os.path.basename(weights_tmp)}"]
    assert not cut_short.exists() and not os.path.exists(weights_tmp)
    assert (run_dir / ".notes").read_text() == "mine" and (run_dir / ".lock").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == kept
    said.clear()
    train(run, run_dir, resume=True, progress=False, log=said.append)  # nothing left: nothing said
    assert not [line for line in said if line.startswith("removed")]


def save_with_a_full_disk_on_rank_0(rank: int, folder: str) -> None:
    """One of two gloo processes saving a checkpoint; rank 0 writes under a file-size limit its weights do not fit
    (as on a full disk). Writes what save_checkpoint raised, and how soon, to FOLDER/rank-N.json."""
    import datetime
    import resource
    import signal
    import time
    from pathlib import Path

    import torch.distributed as dist

    from egmla.model import Transformer
    from egmla.runs import storage_problem
    from egmla.train.checkpoint import save_checkpoint
    from egmla.train.distributed import DistInfo

    torch.set_num_threads(1)
    # a short timeout: without the fix rank 1 waited in a barrier, here until this timeout, not 30 minutes
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=15))
    config = run_config(Path(folder)).model
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters())
    if rank == 0:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    started, outcome = time.monotonic(), {"raised": None}
    try:
        save_checkpoint(Path(folder) / "run", 4, model, optimizer, {}, DistInfo(rank, 2), 2, config)
    except Exception as err:
        outcome = {"raised": type(err).__name__, "line": storage_problem(err) or str(err)}
    outcome["seconds"] = time.monotonic() - started
    Path(folder, f"rank-{rank}.json").write_text(json.dumps(outcome))
    while rank == 0 and not Path(folder, "rank-1.json").exists() and time.monotonic() - started < 30:
        time.sleep(0.05)  # rank 0 stays until rank 1 has reported, as a trainer still unwinding would
    dist.destroy_process_group()


def run_two_ranks(function: str, folder) -> None:
    """Runs this module's `function(rank, folder)` in two processes at once (ranks 0 and 1); both must exit 0."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.train.helpers import subprocess_env

    code = f"import sys; from tests.train.test_failures import {function}; {function}(int(sys.argv[1]), sys.argv[2])"
    workers = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(folder)], env=subprocess_env(),
                                cwd=Path(__file__).parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for rank in (0, 1)]
    output = [worker.communicate(timeout=120)[0] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), "\n".join(output)


def test_a_failed_checkpoint_write_on_rank_0_stops_every_process_at_once_with_its_error(tmp_path):
    """Rank 0 alone writes checkpoints: when its write failed (a full disk), the other processes waited in the
    barrier after it until torchrun or the collective timeout killed them, saying nothing of why. Now every
    process raises rank 0's error (the trainer's one line is the same on every rank) as soon as rank 0 has it."""
    run_two_ranks("save_with_a_full_disk_on_rank_0", tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1))
    assert "File too large" in rank0["line"] and rank1["line"] == rank0["line"]
    assert rank1["raised"] == "OSError" and rank1["seconds"] < 10
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # no .tmp-step_* left


def prepare_data_longer_than_the_collective_timeout(rank: int, folder: str) -> None:
    """One of two gloo processes whose process group times out after 2 s, around trainer.setup_data, whose data
    preparation takes rank 0 5 s. Writes what setup_data returned or raised to FOLDER/rank-N.json."""
    import datetime
    import time
    from pathlib import Path

    import torch.distributed as dist

    import egmla.data
    from egmla.train.distributed import DistInfo

    def slow_prepare_data(config, vocab_size, tokenizer=None, progress=True, log=print):
        if rank == 0:
            time.sleep(5)  # tokenizing many GB: an hour, against NCCL's 10 minutes
        return "tokenizer", "shards"

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))
    egmla.data.prepare_data = slow_prepare_data
    try:
        outcome = {"returned": list(trainer.setup_data(run_config(Path(folder)), Path(folder) / "run", False,
                                                       DistInfo(rank, 2), False, quiet))}
    except Exception as err:
        outcome = {"raised": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    Path(folder, f"rank-{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def test_the_other_processes_wait_for_rank_0s_data_past_the_collective_timeout(tmp_path):
    """Rank 0 alone trains the tokenizer and tokenizes the corpus while the others wait in a barrier: that barrier
    timed out with the process group (NCCL: 10 minutes), so a corpus of a few GB killed a torchrun run before its
    first step."""
    run_two_ranks("prepare_data_longer_than_the_collective_timeout", tmp_path)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank-{rank}.json").read_text()) == {"returned": ["tokenizer", "shards"]}
