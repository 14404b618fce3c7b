"""`egmla bench train-run` on the CPU at tiny shapes: a fixed number of steps with each gate-table update, then
--report compares the two runs (the issue-19 loss comparison, in miniature)."""
import argparse
import json

import pytest

from egmla.bench import train_run
from tests.train.helpers import write_config


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    train_run.add_arguments(parser)
    return train_run.main(parser.parse_args(list(argv)))


def test_dense_and_row_sparse_runs_and_their_report(tmp_path, cache_dir, capsys):
    config = write_config(tmp_path / "tiny.toml", cache_dir)
    outs = {}
    for update in ("dense", "row-sparse"):
        outs[update] = tmp_path / update
        assert run("--config", str(config), "--max-bytes", "300000", "--work", str(tmp_path / "work"), "--out",
                   str(outs[update]), "--steps", "6", "--set", f"train.gate_table_update={update}") == 0
        record = json.loads((outs[update] / "gpu_train_run.json").read_text())
        assert record["summary"]["steps"] == 6 and record["summary"]["final_val_loss"] > 0
        assert json.loads((outs[update] / "config.json").read_text())["train"]["gate_table_update"] == update
    capsys.readouterr()
    assert run("--report", str(outs["dense"]), str(outs["row-sparse"])) == 0
    table = capsys.readouterr().out
    assert "| dense | dense | 0 | 6 |" in table and "| row-sparse | row-sparse | 0 | 6 |" in table
    assert "| +0.0000 |" in table  # the first run against itself
    assert "| 6 | " in table  # both validated at step 6
    stopped = tmp_path / "stopped"  # a run stopped by its time limit before it validated
    stopped.mkdir()
    for name in ("summary.json", "config.json", "metrics.jsonl"):
        (stopped / name).write_text((outs["dense"] / name).read_text())
    summary = json.loads((stopped / "summary.json").read_text())
    (stopped / "summary.json").write_text(json.dumps({**summary, "final_val_loss": None}))
    assert run("--report", str(outs["dense"]), str(stopped)) == 0
    assert "| stopped | dense | 0 | 6 |" in capsys.readouterr().out
    assert run("--report", str(stopped), str(outs["dense"])) == 0
    assert "| - | - |" in capsys.readouterr().out
    assert "different corpora" not in table  # same call, same corpus
    other = tmp_path / "other-machine"  # a run whose call built another corpus
    for name in ("summary.json", "config.json", "metrics.jsonl"):
        (other / name).parent.mkdir(exist_ok=True)
        (other / name).write_text((outs["dense"] / name).read_text())
    record = json.loads((outs["dense"] / "gpu_train_run.json").read_text())
    record["data"]["train_tokens"] += 1
    (other / "gpu_train_run.json").write_text(json.dumps(record))
    assert run("--report", str(outs["dense"]), str(outs["row-sparse"]), str(other)) == 0
    warning = capsys.readouterr().out.split("**The runs read different corpora**")[1]
    assert f"dense, row-sparse: {record['data']['train_tokens'] - 1:,} training tokens" in warning
    assert f"other-machine: {record['data']['train_tokens']:,} training tokens" in warning
    with pytest.raises(ValueError, match="no summary.json there"):
        run("--report", str(tmp_path))
