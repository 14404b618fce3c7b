"""experiments/paper_repro.py and experiments/report.py end to end at toy size: a group runs, a run with
the same config is reused rather than retrained, and the report's tables come from the group files."""
import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import paper_repro  # noqa: E402
import report  # noqa: E402

TOY = ["--scale", "cpu-pilot", "--steps", "2", "--set", "data.corpus=embedded", "--set", "data.max_bytes=300000",
       "--set", "data.tokenizer_sample_bytes=300000", "--set", "model.vocab_size=512",
       "--set", "train.eval_sequences=4", "--set", "model.n_layers=1"]

# the embedded corpus's first 300 KB are three works: with whole documents held out, one of them (allegro)
LONGER_TOY = [*TOY, "--set", "data.val_fraction=0.3"]


@pytest.mark.slow
def test_groups_run_reuse_and_report(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    common = [*TOY, "--out", str(out), "--work", str(work)]
    assert paper_repro.main(["latent", *common]) == 0
    latent = json.loads((out / "latent.json").read_text())
    assert [r["name"] for r in latent["rows"]] == ["egmla-kv64-seed0", "egmla-kv64-latent-seed0"]
    assert all(math.isfinite(r["final_val_loss"]) and r["scale"] == "cpu-pilot" for r in latent["rows"])
    assert {r["gate_dim"] for r in latent["rows"]} == {512}  # the pilot's d_e, not the tiny preset's 256
    assert latent["configs"]["egmla-kv64-latent-seed0"]["model"]["gate_placement"] == "latent"
    assert {m["kind"] for curve in latent["metrics"].values() for m in curve} == {"val"}  # no per-step log
    assert (out / "latent.png").is_file() and (out / "latent-curves.png").is_file()
    capsys.readouterr()

    assert paper_repro.main(["ablations", "--only", "egmla-kv64,egmla-kv64-add", *common]) == 0
    printed = capsys.readouterr().out
    assert "egmla-kv64-seed0: same config already trained" in printed  # reused, not retrained
    ablations = json.loads((out / "ablations.part-egmla-kv64_egmla-kv64-add.json").read_text())  # a part
    full = {r["name"]: r for r in ablations["rows"]}["egmla-kv64-seed0"]
    assert full == latent["rows"][0]

    # a second part of the same group: the report merges the parts
    assert paper_repro.main(["ablations", "--only", "egmla-kv64-no-norm", *common]) == 0
    assert report.main([str(out), "--plots", str(tmp_path / "plots")]) == 0
    tables = (tmp_path / "plots" / "tables.md").read_text()
    assert "### Gate ablations at kv64" in tables and "### Gate placement at kv64" in tables
    add_row = next(line for line in tables.splitlines() if line.startswith("| egmla-kv64-add |"))
    ours = {r["name"]: r["final_val_loss"] for r in ablations["rows"]}
    assert f"{ours['egmla-kv64-add-seed0']:.4f}" in add_row and "3.1901" in add_row  # ours beside the paper's
    assert f"{ours['egmla-kv64-add-seed0'] - ours['egmla-kv64-seed0']:+.4f}" in add_row
    assert any(line.startswith("| egmla-kv64-no-norm |") and "3.2573" in line for line in tables.splitlines())


@pytest.mark.parametrize("name", ["cpu-pilot", "paper-base", "paper-base-long"])
def test_committed_records_give_the_committed_tables(name):
    """The group files in git are compact (rows, validation curves) and still give docs/results' tables."""
    folder = ROOT / "experiments" / "results" / name
    assert report.tables(report.load_groups(folder)) == (ROOT / "docs" / "results" / name / "tables.md").read_text()
    for path in folder.glob("*.json"):
        curves = json.loads(path.read_text())["metrics"].values()
        assert {record["kind"] for curve in curves for record in curve} == {"val"}, path


def test_groups_are_registered_variants():
    from egmla.variants import VARIANTS

    assert {name for names in paper_repro.GROUPS.values() for name in names} <= set(VARIANTS)
    for group, plan in paper_repro.PLANS.items():
        assert {name for name, _ in plan} == set(paper_repro.GROUPS[group]) and len(set(plan)) == len(plan)


def plan_of(*argv):
    return paper_repro.runs_of(paper_repro.parse_args(list(argv)))


def test_longer_plan_is_issue_18s_runs_on_whole_files_past_one_epoch():
    plan = plan_of("longer")
    labels = [label for label, _ in plan]
    assert labels[:10] == ["egmla-kv64-seed0", "mla-kv256-seed0", "egmla-kv64-bias-seed0", "mha-seed0",
                           "egmla-kv64-seed1", "mla-kv256-seed1", "egmla-kv64-bias-seed1", "mha-seed1",
                           "egmla-kv64-identity-seed0", "egmla-kv64-identity-seed1"]  # what the claims need first
    for label, run in plan:
        assert run.train.steps * run.train.batch_size * run.train.seq_len == 131_072_000  # 2,000 x 64 x 1,024
        assert (run.data.split, run.data.max_bytes, run.data.corpus) == ("document", 600_000_000, "python-source")
        assert run.train.schedule == "cosine" and run.train.eval_every == 100 and run.train.seed == int(label[-1])
    controls = {label: run.model for label, run in plan if label.endswith("seed0")}
    assert controls["egmla-kv64-bias-seed0"].gate_op == "bias"
    assert controls["egmla-kv64-identity-seed0"].gate_init == "identity"
    assert [label for label, _ in plan_of("longer", "--seeds", "1", "--only", "mha,egmla-kv64")] == [
        "egmla-kv64-seed1", "mha-seed1"]
    # the pilot scale keeps its CPU-sized corpus and budget, the document split stays
    (_, pilot), = plan_of("longer", "--scale", "cpu-pilot", "--only", "mha", "--seeds", "0")
    assert (pilot.train.steps, pilot.data.max_bytes, pilot.data.split) == (400, 24_000_000, "document")


def test_every_run_claims_missing_asks_for_is_trained_by_its_command():
    """`--only X --seeds N` with (X, N) not in the plan trained nothing and exited 0 (2026-12-06: claims.py --missing 4
    printed `--seeds 3` commands before seed 3 was planned); a seed asked for by name is now trained, after the plan's
    runs, and every command `claims.py --missing` prints from the committed records selects exactly its run."""
    import claims

    assert [label for label, _ in plan_of("longer", "--only", "mla-kv256,mha", "--seeds", "2,9")] == [
        "mla-kv256-seed2", "mha-seed2", "mla-kv256-seed9", "mha-seed9"]
    runs = claims.load_runs(claims.BUDGET_FOLDERS)
    have = max(len({seed for _, seed in r}) for r in runs.values())  # the most seeds any config has
    asked = {run for _, needed, _ in claims.missing_runs(runs, have + 1) for run in needed}
    assert asked
    for config, seed in sorted(asked):  # the printed command's arguments
        assert [label for label, _ in plan_of("longer", "--only", config, "--seeds", str(seed))] == [
            f"{config}-seed{seed}"]


def test_run_key_ignores_where_files_go_and_the_calls_time_limit():
    import dataclasses

    (_, run), = plan_of("longer", "--only", "mha", "--seeds", "0")
    config = dataclasses.asdict(run)
    moved = json.loads(json.dumps(config))
    moved["data"]["cache_dir"], moved["train"]["time_limit_s"], moved["name"] = "/elsewhere", 431.5, "x"
    moved["train"]["compile_mode"] = "default"  # a record from before the 'auto' default: the same run
    assert paper_repro.run_key(moved) == paper_repro.run_key(config)
    longer = json.loads(json.dumps(config))
    longer["train"]["steps"] = 2001
    assert paper_repro.run_key(longer) != paper_repro.run_key(config)
    old = json.loads(json.dumps(config))  # a record from before data.split existed keys as split='chunk'
    del old["data"]["split"]
    chunk = json.loads(json.dumps(config))
    chunk["data"]["split"] = "chunk"
    assert paper_repro.run_key(old) == paper_repro.run_key(chunk) != paper_repro.run_key(config)


@pytest.mark.parametrize("name", ["cpu-pilot", "paper-base", "paper-base-long"])
def test_committed_records_configs_load_as_the_chunk_split(name):
    from egmla.train.config import RunConfig

    for path in (ROOT / "experiments" / "results" / name).glob("*.json"):
        for config in json.loads(path.read_text()).get("configs", {}).values():
            run = RunConfig.from_dict(config)
            assert run.data.split == "chunk" and run.data.val_fraction == config["data"]["val_fraction"]


@pytest.mark.slow
def test_a_stopped_run_resumes_in_the_next_call_to_the_same_result(tmp_path, capsys):
    """A call that stops a run at its time limit (status 3) leaves a checkpoint; the next call resumes it and
    ends where one uninterrupted call ends. Finished runs are then skipped: by --work, and by --records."""
    toy = [*LONGER_TOY, "--only", "mha", "--seeds", "0", "--steps", "4", "--set", "train.eval_every=2"]
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["longer", *toy, "--out", str(out), "--work", str(work)]
    assert paper_repro.main([*common, "--set", "train.time_limit_s=0.000001"]) == 3  # stops after one step
    assert "stopped at step 1 of 4" in capsys.readouterr().out and not list(out.glob("*.json"))
    assert paper_repro.main(common) == 0
    assert "(resuming its checkpoint)" in capsys.readouterr().out
    record = json.loads((out / "longer.part-mha-seed0.json").read_text())
    (row,) = record["rows"]
    assert (row["calls"], row["split"], row["tokens"]) == (2, "document", 4 * 8 * 128)
    assert [m["step"] for m in record["metrics"]["mha-seed0"]] == [1, 2, 4]  # 1: validated where the limit stopped it
    assert record["configs"]["mha-seed0"]["train"]["time_limit_s"] == 0  # the run, not how calls cut it

    whole = tmp_path / "whole"
    assert paper_repro.main(["longer", *toy, "--out", str(whole), "--work", str(tmp_path / "work2")]) == 0
    (uncut,) = json.loads((whole / "longer.part-mha-seed0.json").read_text())["rows"]
    assert uncut["calls"] == 1 and uncut["final_val_loss"] == pytest.approx(row["final_val_loss"], abs=1e-6)

    capsys.readouterr()
    assert paper_repro.main(common) == 0
    assert "already trained in" in capsys.readouterr().out
    assert paper_repro.main([*common, "--records", str(whole), "--work", str(tmp_path / "fresh")]) == 0
    assert "already recorded in" in capsys.readouterr().out and not (tmp_path / "fresh" / "runs").exists()
    assert {"train_split_tokens", "val_split_tokens", "corpus_id"} <= uncut.keys()

    # the record says another corpus (another machine's installed files): skipped with a warning, or trained again
    # under its own name with --retrain-other-corpora, once
    path = whole / "longer.part-mha-seed0.json"
    other = json.loads(path.read_text())
    other["rows"][0].update(train_split_tokens=uncut["train_split_tokens"] + 1, corpus_id="000000000000")
    path.write_text(json.dumps(other))
    assert paper_repro.main([*common, "--records", str(whole), "--work", str(tmp_path / "fresh")]) == 0
    assert "on another corpus than this machine's" in capsys.readouterr().out
    assert not (tmp_path / "fresh" / "runs").exists()
    again = [*common, "--records", str(whole), "--work", str(tmp_path / "fresh"), "--out", str(whole),
             "--retrain-other-corpora"]
    assert paper_repro.main(again) == 0
    rerun = f"mha-seed0-c{uncut['corpus_id'][:6]}"
    assert f"trained again as {rerun}" in capsys.readouterr().out
    (row,) = json.loads((whole / f"longer.part-{rerun}.json").read_text())["rows"]
    assert row["name"] == rerun and row["corpus_id"] == uncut["corpus_id"]
    assert paper_repro.run_name(rerun) == "mha-seed0" and paper_repro.run_name("mha-seed0") == "mha-seed0"
    assert paper_repro.main(again) == 0
    assert "already recorded in" in capsys.readouterr().out


@pytest.mark.slow
def test_processes_sharing_a_plan_take_different_runs(tmp_path, capsys):
    from egmla.train.runlock import RunLock

    args = ["longer", *LONGER_TOY, "--only", "mha", "--seeds", "0,1", "--out", str(tmp_path / "out"),
            "--work", str(tmp_path / "work")]
    (label, first), _ = paper_repro.runs_of(paper_repro.parse_args(args))
    import dataclasses

    claim = tmp_path / "work" / "claims" / f"{label}-{paper_repro.run_key(dataclasses.asdict(first))}"
    with RunLock(claim):  # another process is training seed 0
        assert paper_repro.main(args) == 0
    printed = capsys.readouterr().out
    assert "mha-seed0: being trained by another process" in printed
    assert [p.name for p in (tmp_path / "out").glob("*.json")] == ["longer.part-mha-seed1.json"]


def test_report_refuses_an_empty_folder(tmp_path):
    with pytest.raises(SystemExit, match="no group files"):
        report.main([str(tmp_path)])


def test_seed_table_pairs_seeds_across_groups():
    def row(name, seed, loss):
        return {"name": f"{name}-seed{seed}", "seed": seed, "final_val_loss": loss}

    groups = {"table1": {"rows": [row("egmla-kv64", 0, 3.0), row("mla-kv256", 0, 3.1), row("mha", 0, 2.9)]},
              "seeds": {"rows": [row("egmla-kv64", 1, 3.2), row("mla-kv256", 1, 3.1)]}}
    assert report.seed_losses(groups) == {"egmla-kv64": {0: 3.0, 1: 3.2}, "mla-kv256": {0: 3.1, 1: 3.1}}
    text = report.seeds_table(groups)
    assert "| egmla-kv64 | 3.0000 | 3.2000 | 3.1000 | 0.1414 |" in text
    assert "paired by seed: -0.1000, +0.1000 (mean +0.0000" in text


def test_cpu_pilot_scale_keeps_each_config_meaningful():
    from egmla.train.compare import load_runs

    names = ["gqa4", "egmla-kv64", "egmla-kv64-de128", "mla-kv64"]
    paths = [str(ROOT / "configs" / f"{name}.toml") for name in names]
    runs = {label: paper_repro.with_scale_model(run, path, paper_repro.SCALE_MODEL["cpu-pilot"])
            for (label, run), path in zip(load_runs(paths, "paper-base", paper_repro.SCALES["cpu-pilot"]), paths)}
    assert runs["gqa4"].model.variant_name() == "GQA-2"  # tiny has 4 heads: GQA-4 would be MHA
    assert runs["egmla-kv64"].model.gate_dim == 512  # Table 1's d_e, not the tiny preset's 256
    assert runs["egmla-kv64-de128"].model.gate_dim == 128  # a config's own d_e wins
    assert runs["mla-kv64"].model.variant_name() == "MLA kv64"


def test_a_group_borrows_a_missing_config_only_at_the_same_budget():
    def row(name, seed=0, tokens=100, loss=3.0):
        return {"name": f"{name}-seed{seed}", "seed": seed, "tokens": tokens, "final_val_loss": loss}

    groups = {"table1": {"rows": [row("egmla-kv64", loss=2.5), row("mha")], "metrics": {"egmla-kv64-seed0": [1]}},
              "ablations": {"rows": [row("egmla-kv64-add")], "metrics": {}},
              "latent": {"rows": [row("egmla-kv64-latent", tokens=200)], "metrics": {}}}
    report.borrow_shared_rows(groups)
    borrowed = report.by_config(groups["ablations"]["rows"])["egmla-kv64"]
    assert borrowed["borrowed_from"] == "table1" and borrowed["final_val_loss"] == 2.5
    assert groups["ablations"]["metrics"]["egmla-kv64-seed0"] == [1]
    assert "egmla-kv64" not in report.by_config(groups["latent"]["rows"])  # another budget: not the same run
    assert "borrowed_from" not in groups["table1"]["rows"][0]  # the source row is left as it was


def test_shown_command_drops_where_files_went():
    recorded = "/work/main/experiments/paper_repro.py table1 --only mha --work /tmp/w --steps 9 --out /tmp/o/gpu1"
    assert report.shown_command(recorded) == "experiments/paper_repro.py table1 --only mha --steps 9"


@pytest.mark.slow
def test_on_gpus_runs_jobs_side_by_side_and_packs_their_files(tmp_path):
    import subprocess
    import tarfile

    toy = " ".join(TOY)
    env = {**os.environ, "WORK": str(tmp_path / "work"), "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "experiments" / "on_gpus.sh"), str(tmp_path / "out"),
                           f"latent --only egmla-kv64-latent {toy}; table1 --only mla-kv16 {toy}",
                           f"ablations --only egmla-kv64-add {toy}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu 0: done" in done.stdout and "gpu 1: done" in done.stdout
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        names = {Path(n).as_posix().lstrip("./") for n in tar.getnames()}
        logs = {n: tar.extractfile(n).read().decode() for n in tar.getnames() if n.endswith(".log")}
    assert {"gpu0/latent.part-egmla-kv64-latent.json", "gpu0/table1.part-mla-kv16.json",
            "gpu1/ablations.part-egmla-kv64-add.json"} <= names
    assert "training a byte-level BPE tokenizer" in done.stdout  # built once, by --prepare-only ...
    assert not any("training a byte-level BPE tokenizer" in log for log in logs.values())  # ... not per job


def test_on_gpus_cuts_a_job_off_at_its_limit_and_says_so(tmp_path):
    import subprocess

    env = {**os.environ, "WORK": str(tmp_path / "work"), "PYTHON": sys.executable, "PYTHONPATH": str(ROOT),
           "JOB_LIMIT_S": "1"}
    # --prepare-only needs a real group's arguments; the job then has 1 s for 100,000 steps
    done = subprocess.run(["bash", str(ROOT / "experiments" / "on_gpus.sh"), str(tmp_path / "out"),
                           f"latent --only egmla-kv64-latent {' '.join(TOY)} --steps 100000"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "gpu 0: FAILED or cut off" in done.stdout
    assert (tmp_path / "out" / "results.tar.gz").is_file()  # what there is still comes back


@pytest.mark.slow
def test_on_gpus_identical_jobs_split_a_plan_and_train_each_run_once(tmp_path):
    import re
    import subprocess
    import tarfile

    job = f"longer --only mha --seeds 0,1 {' '.join(LONGER_TOY)}"
    env = {**os.environ, "WORK": str(tmp_path / "work"), "PYTHONPATH": str(ROOT), "PYTHON": sys.executable,
           "JOB_LIMIT_S": "500"}
    done = subprocess.run(["bash", str(ROOT / "experiments" / "on_gpus.sh"), str(tmp_path / "out"), job, job],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames() if n.endswith(".json")}
        logs = "".join(tar.extractfile(n).read().decode() for n in tar.getnames() if n.endswith(".log"))
    assert names == {"longer.part-mha-seed0.json", "longer.part-mha-seed1.json"}
    trained = re.findall(r"=== (mha-seed\d): MHA, \d+ steps ===", logs)
    assert sorted(trained) == ["mha-seed0", "mha-seed1"]  # each run trained by one GPU only
