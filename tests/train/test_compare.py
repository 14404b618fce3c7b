"""`egmla compare`: several variants, one data/seed/budget, a table and a plot."""
import argparse
import json

import pytest

from egmla.train import compare

TINY_MODEL = ["model.vocab_size=320", "model.n_layers=1", "model.d_model=64", "model.n_heads=2",
              "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=16", "model.v_head_dim=16", "model.max_seq_len=64"]
TINY_RUN = ["train.steps=3", "train.warmup_steps=2", "train.batch_size=4", "train.seq_len=32",
            "train.eval_sequences=8", "train.tensorboard=false",
            "data.max_bytes=300000", "data.val_fraction=0.1"]


def test_compare_trains_each_variant_on_the_same_budget(tmp_path, cache_dir, capsys):
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    sets = [x for item in TINY_MODEL + TINY_RUN + [f"data.cache_dir={cache_dir}"] for x in ("--set", item)]
    args = parser.parse_args(["mha", "mla-kv16", "egmla-kv16", *sets, "--out", str(tmp_path), "--no-progress"])
    assert compare.main(args) == 0
    out = capsys.readouterr().out
    assert "KV elem/token" in out and "EG-MLA kv16" in out and "MHA" in out
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["mha", "mla-kv16", "egmla-kv16"]
    assert [r["kv_elements_per_token"] for r in rows] == [2 * 64 * 1, 32, 32]
    eg = rows[2]
    assert eg["params"] > eg["params_without_gate_tables"]
    assert rows[1]["params"] == rows[1]["params_without_gate_tables"]  # MLA has no gate tables
    assert all(r["final_val_loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("mha", "mla-kv16", "egmla-kv16"):  # same data order and budget
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["train"]["steps"] == 3 and config["data"]["max_bytes"] == 300000


def compare_args(tmp_path, cache_dir, *extra: str):
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    sets = [x for item in TINY_MODEL + TINY_RUN + [f"data.cache_dir={cache_dir}"] for x in ("--set", item)]
    return parser.parse_args([*extra, *sets, "--out", str(tmp_path), "--no-progress"])


def test_seeds_give_mean_sd_and_a_paired_test_against_the_first(tmp_path, cache_dir, capsys):
    """--seeds 0,1: every config once per seed into CONFIG/seed-N; the row's mean and sd are those of the per-seed
    final losses, and vs_first is the paired t-test of the per-seed differences (recomputed here)."""
    from egmla.stats import paired_t_test

    assert compare.main(compare_args(tmp_path, cache_dir, "mha", "mla-kv16", "--seeds", "0,1")) == 0
    out = capsys.readouterr().out
    assert "± " in out and "paired t-test" in out
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    final = {}
    for name in ("mha", "mla-kv16"):
        for seed in (0, 1):
            run_dir = tmp_path / name / f"seed-{seed}"
            assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == seed
            final[name, seed] = json.loads((run_dir / "summary.json").read_text())["final_val_loss"]
    assert final["mha", 0] != final["mha", 1]  # the seed took
    mha, mla = rows
    assert mha["seeds"] == mla["seeds"] == [0, 1] and "vs_first" not in mha
    assert mla["final_val_losses"] == [final["mla-kv16", 0], final["mla-kv16", 1]]
    assert mla["final_val_loss"] == pytest.approx((final["mla-kv16", 0] + final["mla-kv16", 1]) / 2)
    assert mla["final_val_loss_sd"] == pytest.approx(abs(final["mla-kv16", 0] - final["mla-kv16", 1]) / 2 ** 0.5)
    expected = paired_t_test([final["mla-kv16", s] - final["mha", s] for s in (0, 1)])
    assert mla["vs_first"] == pytest.approx(expected)
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_the_same_command_again_reuses_finished_runs_and_resumes_a_stopped_one(tmp_path, cache_dir, monkeypatch,
                                                                               capsys):
    """A comparison stopped by Ctrl-C (the trainer's summary says interrupted) stops there with exit 130; the same
    command again reuses the finished run and resumes the stopped one from its checkpoint, not from scratch."""
    import egmla.train.trainer as trainer

    real_train, calls = trainer.train, []

    def stopped_at_mla(run, run_dir, resume=False, **kwargs):
        summary = real_train(run, run_dir, resume=resume, **kwargs)
        if run.name == "mla-kv16":
            summary = {**summary, "interrupted": True, "stop_reason": "interrupted"}
            (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(trainer, "train", stopped_at_mla)
    assert compare.main(compare_args(tmp_path, cache_dir, "mha", "mla-kv16", "egmla-kv16")) == 130
    assert "run the same command" in capsys.readouterr().out
    assert not (tmp_path / "egmla-kv16").exists()  # the comparison stopped with the run that was stopped
    mha_summary = (tmp_path / "mha" / "summary.json").read_text()

    def recorded(run, run_dir, resume=False, **kwargs):
        calls.append((run.name, resume))
        return real_train(run, run_dir, resume=resume, **kwargs)

    monkeypatch.setattr(trainer, "train", recorded)
    assert compare.main(compare_args(tmp_path, cache_dir, "mha", "mla-kv16", "egmla-kv16")) == 0
    assert calls == [("mla-kv16", True), ("egmla-kv16", False)]
    assert "reused the finished run" in capsys.readouterr().out
    assert (tmp_path / "mha" / "summary.json").read_text() == mha_summary
    assert [r["name"] for r in json.loads((tmp_path / "compare.json").read_text())["rows"]] == [
        "mha", "mla-kv16", "egmla-kv16"]



def test_a_run_stopped_by_its_time_limit_is_validated_at_its_stop(tmp_path, cache_dir, capsys):
    """train.time_limit_s ends a run early ("time limit reached"), which compare takes as the run's end: the trainer
    validates at that step, so the row's loss is the stopped step's. It did not (eval_every 0: final_val_loss None),
    and the table crashed in statistics.mean([None]); with eval_every it showed an older step's loss as final."""
    args = compare_args(tmp_path, cache_dir, "mha", "--set", "train.time_limit_s=1e-9", "--set", "train.eval_every=0")
    assert compare.main(args) == 0
    summary = json.loads((tmp_path / "mha" / "summary.json").read_text())
    assert summary["stop_reason"] == "time limit reached" and summary["steps"] == 1  # the limit passed at once
    val = [r for r in map(json.loads, (tmp_path / "mha" / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "val"]
    assert [r["step"] for r in val] == [1] and summary["final_val_loss"] == val[0]["val_loss"]
    assert json.loads((tmp_path / "compare.json").read_text())["rows"][0]["final_val_loss"] == val[0]["val_loss"]

    # a summary written before that (no final validation loss) is named with the fix, not a TypeError on reuse
    (tmp_path / "mha" / "summary.json").write_text(json.dumps({**summary, "final_val_loss": None}))
    with pytest.raises(ValueError, match=r"mha/summary.json: no final validation loss \(the run stopped at step 1: "
                                         r"time limit reached; .*\); remove .*mha and run the same command"):
        compare.main(args)


def test_an_out_folder_of_another_comparison_is_refused(tmp_path, cache_dir):
    assert compare.main(compare_args(tmp_path, cache_dir, "mha")) == 0
    args = compare_args(tmp_path, cache_dir, "mha")
    args.overrides += ["train.lr=0.01"]
    with pytest.raises(ValueError, match=r"holds a run of another config \(train.lr differ\); give a new --out"):
        compare.main(args)


def test_settings_of_how_a_run_runs_may_change_on_resume(tmp_path, cache_dir, monkeypatch):
    """Adding activation checkpointing or a chunked loss (after running out of memory, say) does not make the
    folder another comparison: the finished run is reused."""
    import egmla.train.trainer as trainer

    assert compare.main(compare_args(tmp_path, cache_dir, "mha")) == 0
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    args = compare_args(tmp_path, cache_dir, "mha")
    args.overrides += ["train.activation_checkpointing=1", "train.loss_chunk_tokens=64", "train.log_every=1"]
    assert compare.main(args) == 0


@pytest.mark.parametrize("configs, seeds, match", [
    (["mha", "mha"], None, "CONFIG 'mha' is given twice"),
    (["mha"], "0,0", "--seeds '0,0': give each value at most once"),
    (["mha"], "a", "--seeds 'a'"),
    (["nowhere.toml"], None, "CONFIG 'nowhere.toml': no such file"),
])
def test_bad_comparisons_are_refused_before_training(tmp_path, cache_dir, configs, seeds, match):
    args = compare_args(tmp_path, cache_dir, *configs, *(["--seeds", seeds] if seeds else []))
    with pytest.raises(ValueError, match=match):
        compare.main(args)
    assert not any(tmp_path.iterdir())


def test_an_out_that_is_a_file_is_named_as_out(tmp_path, cache_dir):
    args = compare_args(tmp_path, cache_dir, "mha")
    args.out = str(tmp_path / "taken")
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ValueError, match=r"--out '.*taken': a file; give a folder"):
        compare.main(args)
    assert (tmp_path / "taken").read_text() == "a file"


def test_a_run_written_before_fields_were_added_is_reused_not_another_config(tmp_path):
    """config.json of an older egmla lacks the fields added since (train.loss_chunk_tokens, ...): the comparison takes
    their defaults, as `egmla train --resume` does, instead of refusing every folder it wrote after an upgrade. A
    setting that really differs is still refused, and a field this egmla does not know names the file."""
    from egmla.runs import FORMAT_VERSION
    from egmla.train.config import RunConfig

    (label, run), = compare.load_runs(["mha"], "tiny", TINY_MODEL + TINY_RUN)
    older = run.to_dict()
    del older["train"]["loss_chunk_tokens"], older["train"]["activation_checkpointing"]
    (tmp_path / "config.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **older}))
    (tmp_path / "summary.json").write_text(json.dumps({"final_val_loss": 4.5, "stop_reason": None}))
    assert compare.finished_summary(tmp_path, run)["final_val_loss"] == 4.5
    other = RunConfig.from_dict({**run.to_dict(), "train": {**run.train.to_dict(), "warmup_steps": 1}})
    with pytest.raises(ValueError, match=r"another config \(train.warmup_steps differ\)"):
        compare.finished_summary(tmp_path, other)
    newer = {"format_version": FORMAT_VERSION, **run.to_dict()}
    newer["train"]["future_field"] = 1
    (tmp_path / "config.json").write_text(json.dumps(newer))
    with pytest.raises(ValueError, match=r"config.json does not fit this egmla \(train.future_field: unknown"):
        compare.finished_summary(tmp_path, run)


def test_a_loss_that_is_not_finite_gives_no_test_instead_of_a_crash():
    """A seed whose final validation loss is NaN or inf: statistics.stdev raised AttributeError on it, so the
    comparison crashed at its table after every run had trained (and again on every rerun). Now sd, t and p are NaN
    (no test; NaN < 0.05 is False for experiments/claims.py) and the table prints."""
    from egmla.stats import paired_t_test

    fields = dict(variant="MHA", params=10, params_without_gate_tables=10, kv_elements_per_token=4, tokens_per_s=1.0)
    first = {0: {**fields, "final_val_loss": 4.0}, 1: {**fields, "final_val_loss": 4.1}}
    for bad in (float("nan"), float("inf")):
        second = {0: {**fields, "final_val_loss": 3.9}, 1: {**fields, "final_val_loss": bad}}
        rows = [compare.summarise("a", first, None), compare.summarise("b", second, first)]
        assert rows[1]["final_val_loss_sd"] != rows[1]["final_val_loss_sd"]  # NaN
        assert rows[1]["vs_first"]["p"] != rows[1]["vs_first"]["p"]
        assert "nan" in compare.format_table(rows).splitlines()[3]
        assert not paired_t_test([0.1, bad, 0.2])["p"] < 0.05
