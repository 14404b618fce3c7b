"""`egmla train` from the command line: the default run directory and runs/latest, refusing to
overwrite a run, one-line errors, the closest option to a mistyped one."""
import json

import pytest

from egmla.cli import main as egmla_main
from egmla.runs import list_checkpoints
from egmla.train.__main__ import main as train_main
from tests.train.helpers import write_config


def test_egmla_train_is_wired_and_dry_run_prints_the_default(capsys):
    assert egmla_main(["train", "--dry-run"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["model"]["attention"] == "eg-mla" and config["data"]["corpus"] == "embedded"


def test_default_run_dir_latest_link_and_no_overwrite(tmp_path, cache_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "run.toml", cache_dir, train=dict(steps=4))
    assert train_main(["--config", str(config), "--no-progress"]) == 0
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve().name.startswith("tiny-test-")
    assert [p.name for p in list_checkpoints(latest)] == ["step_00000004"]
    capsys.readouterr()
    assert train_main(["--config", str(config), "--run-dir", str(latest.resolve()), "--no-progress"]) == 2
    assert "already holds a run with checkpoints; continue it with --resume" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(latest)] == ["step_00000004"]  # untouched
    assert train_main(["--resume", "--no-progress", "--set", "train.steps=6"]) == 0  # runs/latest by default
    assert json.loads((latest / "summary.json").read_text())["steps"] == 6


def test_errors_are_one_line(capsys):
    assert train_main(["--set", "data.corpus=/definitely/not/here.txt", "--dry-run"]) == 0  # resolving is lazy
    assert train_main(["--set", "train.batch_size=0"]) == 2
    assert capsys.readouterr().err.strip() == ("egmla train: error: train.batch_size=0: must be greater than 0")


def test_python_m_egmla_train_names_the_closest_option_like_egmla_train(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--confg", "run.toml"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: egmla train")
    assert "unrecognized arguments: --confg run.toml (did you mean --config?)" in err
