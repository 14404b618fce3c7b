"""One trainer per run directory: two real trainers (and two resumes) on one --run-dir, a lock left by a
killed process, and a --run-dir that is a file."""
import json
import signal
import socket
import subprocess
import sys

import pytest

from egmla.runs import list_checkpoints
from egmla.train.__main__ import main as train_main
from egmla.train.runlock import RunLock, RunLocked
from tests.train.helpers import egmla_command, start_training, subprocess_env, train_losses, wait_for, write_config


@pytest.mark.slow  # real processes: the lock must hold between two interpreters
def test_two_trainers_on_one_run_dir_the_second_gets_one_line_naming_the_first(tmp_path, cache_dir):
    first_config = write_config(tmp_path / "first.toml", cache_dir,
                                train=dict(steps=400, checkpoint_every=0, eval_every=0))
    second_config = write_config(tmp_path / "second.toml", cache_dir, train=dict(steps=4, seed=7))
    run_dir = tmp_path / "run"
    first = start_training(first_config, run_dir)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, first)  # training, so holding the lock
    others = [subprocess.Popen(egmla_command("train", *args, "--no-progress"), env=subprocess_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for args in (("--config", str(second_config), "--run-dir", str(run_dir)), ("--resume", str(run_dir)))]
    results = [other.communicate(timeout=120) + (other.returncode,) for other in others]
    first.send_signal(signal.SIGINT)  # the first saves a checkpoint and stops
    output, _ = first.communicate(timeout=120)
    holder = f"is in use by another trainer (pid {first.pid} on host {socket.gethostname()}, since "
    for _, stderr, returncode in results:
        assert returncode == 2
        assert stderr.count("\n") == 1 and holder in stderr, stderr  # one line, no traceback
    assert first.returncode == 0, output
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == 0  # the first run's, untouched
    [checkpoint] = list_checkpoints(run_dir)
    assert max(train_losses(run_dir)) == json.loads((checkpoint / "state.json").read_text())["step"]


def test_a_lock_left_by_a_killed_process_is_not_obeyed(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom egmla.train.runlock import RunLock\n"
                               "lock = RunLock(sys.argv[1]).__enter__()\nprint('held', flush=True)\ntime.sleep(120)",
                               str(run_dir)], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"pid {holder.pid} on host {socket.gethostname()}"):
            RunLock(run_dir).__enter__()
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs; the kernel drops the flock
        holder.wait()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == holder.pid  # the dead holder's record stays
    with RunLock(run_dir):
        assert json.loads((run_dir / ".lock").read_text())["pid"] != holder.pid


def test_the_lock_is_held_until_released_even_within_one_process(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLocked, match="wait for it to finish, stop it, or choose another --run-dir"):
            RunLock(tmp_path).__enter__()
    with RunLock(tmp_path):  # released
        pass


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, cache_dir, capsys):
    config = write_config(tmp_path / "run.toml", cache_dir, train=dict(steps=4))
    (tmp_path / "taken").write_text("a file")
    assert train_main(["--config", str(config), "--run-dir", str(tmp_path / "taken"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith("is a file, not a folder; choose a folder path")
    assert (tmp_path / "taken").read_text() == "a file"


def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path, cache_dir, capsys):
    config = write_config(tmp_path / "run.toml", cache_dir, train=dict(steps=4))
    (tmp_path / "taken").write_text("a file")
    assert train_main(["--config", str(config), "--run-dir", str(tmp_path / "taken" / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "cannot be created or locked (Not a directory" in err and "choose a folder path you can write" in err
    assert (tmp_path / "taken").read_text() == "a file"


def test_a_new_run_does_not_overwrite_a_folder_of_weights(tmp_path, cache_dir, capsys):
    """An `egmla export --to hf` folder (weights, no checkpoints) given as --run-dir had its config.json and
    tokenizer.json replaced by the new run's, so its weights no longer loaded."""
    config = write_config(tmp_path / "run.toml", cache_dir, train=dict(steps=4))
    export = tmp_path / "export"
    export.mkdir()
    for name, text in (("model.safetensors", "weights"), ("config.json", '{"model_type": "egmla"}'),
                       ("tokenizer.json", "{}")):
        (export / name).write_text(text)
    assert train_main(["--config", str(config), "--run-dir", str(export), "--no-progress"]) == 2
    assert "already holds model weights (*.safetensors)" in capsys.readouterr().err
    assert (export / "config.json").read_text() == '{"model_type": "egmla"}'
    assert (export / "tokenizer.json").read_text() == "{}"


def test_a_run_that_fails_before_writing_anything_leaves_no_folder(tmp_path):
    from egmla.train.distributed import DistInfo
    from egmla.train.runlock import claim_run_dir

    info = DistInfo()  # one process
    with pytest.raises(ValueError, match="no text"):
        with claim_run_dir(tmp_path / "new", resume=False, info=info):
            raise ValueError("data.corpus: no text")
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="no text"):
        with claim_run_dir(tmp_path / "kept", resume=False, info=info):
            (tmp_path / "kept" / "config.json").write_text("{}")
            raise ValueError("data.corpus: no text")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [".lock", "config.json"]
