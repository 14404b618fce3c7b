"""experiments/claims.py on synthetic records: paired differences, the t-test, verdicts computed from the records
(never typed), 'not yet run' where records are missing, the gap plot and the RESULTS.md block."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import claims  # noqa: E402
import report  # noqa: E402

LONG = 2000 * 64 * 1024


def write_run(folder: Path, group: str, config: str, seed: int, loss: float, tokens: int, split: str | None,
              steps=(100, 200), corpus: dict | None = None, suffix: str = "") -> None:
    """A group file as paper_repro.py writes it, one run, its curve ending at `loss` (0.5 higher at the start)."""
    name = f"{config}-seed{seed}{suffix}"
    row = {"name": name, "variant": config, "seed": seed, "final_val_loss": loss, "tokens": tokens, "params": 1,
           "params_without_gate_tables": 1, "kv_elements_per_token": 1, "tokens_per_s": 1.0, "device": "synthetic"}
    if split:
        row.update(split=split, epochs=1.25)
    row.update(corpus or {})
    curve = [{"kind": "val", "step": s, "val_loss": loss + 0.5 * (steps[-1] - s) / steps[-1]} for s in steps]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{group}.part-{name}.json").write_text(json.dumps(
        {"group": group, "rows": [row], "metrics": {name: curve}, "configs": {}, "command": f"paper_repro.py {group}"}))


@pytest.fixture
def folders(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for config, losses in {"egmla-kv64": (1.75, 1.76), "mla-kv256": (1.77, 1.79)}.items():
        for seed, loss in enumerate(losses):
            write_run(old, "seeds", config, seed, loss, 1000, None)
    write_run(old, "table1", "mha", 0, 1.76, 1000, None)
    new_losses = {"egmla-kv64": (1.70, 1.71), "mla-kv256": (1.69, 1.72), "mha": (1.80, 1.82),
                  "egmla-kv64-bias": (1.75,), "egmla-kv64-add": (1.72, 1.75)}
    for config, losses in new_losses.items():
        for seed, loss in enumerate(losses):
            write_run(new, "longer", config, seed, loss, LONG, "document", steps=(1000, 2000))
    return [old, new]


def test_t_distribution_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 9):
        for t in (0.0, 0.3, 1.7, -4.4, 12.0):
            assert claims.t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), abs=1e-12)
    differences = [-0.0118, -0.0249, -0.0201]
    ours = claims.paired_t_test(differences)
    theirs = stats.ttest_1samp(differences, 0.0)
    assert (ours["t"], ours["p"]) == pytest.approx((theirs.statistic, theirs.pvalue))


def test_claims_are_computed_from_the_records_or_not_yet_run(folders):
    runs = claims.load_runs(folders)
    long = claims.Budget(LONG, "document")
    assert set(runs) == {claims.Budget(1000, "chunk"), long}
    assert claims.paired(runs[long], "egmla-kv64", "mha") == pytest.approx({0: -0.10, 1: -0.11})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in claims.claims_table(runs).splitlines()[2:]}
    # two seeds, both ahead, p = 1 - 2/pi atan(21) = 0.030: significant
    assert rows["EG-MLA kv64 matches MHA at 8.3% of its cache"].endswith(
        "| t(1) = -21.00, p = 0.030 | **supported**: EG-MLA kv64 ahead on every seed |")
    assert "**a tie**: the seeds disagree; EG-MLA kv64 no longer leads" in rows[
        "EG-MLA kv64 matches MLA kv256 (a 4× smaller latent)"]  # +0.01, -0.01
    assert "one seed only" in rows["the gate, not the table's size, helps"]
    assert "**suggested**: ahead on every seed, not significantly" in rows["multiplying by the gate beats adding it"]
    assert rows["(ours) a gate started at 1 beats the N(0, 1) start"].endswith("| - | - | - | not yet run |")
    # the earlier budget is in the paired differences, not in the claims (judged at >= 131 M tokens)
    table = claims.differences_table(runs)
    assert "| egmla-kv64 − mla-kv256 | 0.0 M tokens, held out by chunk | -0.0200 (seed 0), -0.0300 (seed 1) |" in table
    assert "| egmla-kv64 − mha | 131.1 M tokens, held out by file |" in table


def test_runs_pair_only_on_the_same_corpus(tmp_path):
    """The python-source corpus is the machine's installed files: a run recorded on another build of it pairs with
    nothing, and a rerun on that build (RUN-c<id>) pairs with the run of its corpus, the older pair kept too."""
    old, new = {"train_split_tokens": 100}, {"train_split_tokens": 105, "val_split_tokens": 2, "corpus_id": "abc"}
    folder = tmp_path / "runs"
    write_run(folder, "longer", "egmla-kv64", 0, 1.60, LONG, "document", corpus=old)
    write_run(folder, "longer", "egmla-kv64", 1, 1.61, LONG, "document", corpus=old)
    write_run(folder, "longer", "mla-kv256", 1, 1.58, LONG, "document", corpus=old)
    write_run(folder, "longer", "egmla-kv64-identity", 0, 1.55, LONG, "document", corpus=old)
    write_run(folder, "longer", "egmla-kv64-identity", 1, 1.50, LONG, "document", corpus={"train_split_tokens": 105})
    runs = claims.load_runs([folder])
    (budget,) = runs
    assert claims.paired(runs[budget], "egmla-kv64-identity", "egmla-kv64") == {0: pytest.approx(-0.05)}
    assert claims.pairs(runs[budget], "egmla-kv64-identity", "egmla-kv64")[1] == [1]
    table = claims.claims_table(runs)
    assert "seed 1: runs on different corpora or schedules, not paired" in table and "one seed only" in table

    write_run(folder, "longer", "egmla-kv64", 1, 1.58, LONG, "document", corpus=new, suffix="-cabc000")
    runs = claims.load_runs([folder])
    assert len(runs[budget]["egmla-kv64", 1]) == 2
    assert claims.paired(runs[budget], "egmla-kv64-identity", "egmla-kv64") == {0: pytest.approx(-0.05),
                                                                               1: pytest.approx(-0.08)}
    assert claims.paired(runs[budget], "egmla-kv64", "mla-kv256") == {1: pytest.approx(0.03)}  # the old pair


def test_gap_curves_are_differences_at_common_evaluations(folders):
    runs = claims.load_runs(folders)[claims.Budget(LONG, "document")]
    curves = claims.gap_curves(runs, "egmla-kv64", "mla-kv256")
    for seed, gap in ((0, 0.01), (1, -0.01)):
        assert [t for t, _ in curves[seed]] == [LONG // 2, LONG]  # step x tokens per step
        assert [d for _, d in curves[seed]] == pytest.approx([gap, gap])


def test_main_draws_the_plot_and_rewrites_only_the_block(folders, tmp_path, capsys):
    results = tmp_path / "docs" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text(f"# before\n{claims.BEGIN}\nold text\n{claims.END}\nafter\n")
    plots = tmp_path / "docs" / "results" / "claims"
    assert claims.main([*map(str, folders), "--plots", str(plots), "--results-md", str(results)]) == 0
    assert (plots / "gap-vs-tokens.png").stat().st_size > 10_000
    text = results.read_text()
    assert text.startswith(f"# before\n{claims.BEGIN}\n### Claims at the longer budget") and text.endswith(
        f"{claims.END}\nafter\n")
    assert "old text" not in text and "](results/claims/gap-vs-tokens.png)" in text
    assert (plots / "claims.md").read_text() in capsys.readouterr().out
    results.write_text("no block\n")
    with pytest.raises(SystemExit, match="no <!-- experiments/claims.py: begin -->"):
        claims.main([*map(str, folders), "--results-md", str(results)])


def test_report_tables_the_longer_group(folders):
    groups = report.load_groups(folders[1])
    text = report.tables(groups)
    assert "### Longer budget, whole files held out, controls (issue 18)" in text
    assert "| egmla-kv64 | 1.7000 | 1.7100 | 1.7050 | 0.0071 |" in text
    assert "| egmla-kv64-bias | 1.7500 | - | 1.7500 | - |" in text
    assert "Each run read 1.25 epochs of its training split." in text


def test_committed_records_give_claims_without_typed_numbers():
    """Today's committed records: no run at >= 131 M tokens yet, the 78.6 M-token key pair paired over 3 seeds."""
    runs = claims.load_runs(claims.BUDGET_FOLDERS)
    if not any(b.tokens >= LONG for b in runs):  # before issue 18's records land
        assert claims.claims_table(runs).count("| not yet run |") == len(claims.CLAIMS)
    differences = claims.paired(runs[claims.Budget(78_643_200, "chunk")], "egmla-kv64", "mla-kv256")
    test = claims.paired_t_test(list(differences.values()))
    assert test["n"] == 3 and test["mean"] == pytest.approx(-0.0189, abs=5e-5) and 0 < test["p"] < 0.05
    assert not math.isnan(test["sd"])


def test_committed_claims_block_is_what_the_records_give():
    """docs/RESULTS.md's claims block and docs/results/claims/claims.md are claims.py's output, not typed."""
    runs = claims.load_runs(claims.BUDGET_FOLDERS)
    text = (ROOT / "docs" / "RESULTS.md").read_text()
    block = text.split(claims.BEGIN + "\n", 1)[1].split(claims.END, 1)[0]
    assert block == claims.report(runs, "results/claims/gap-vs-tokens.png")
    assert (ROOT / "docs" / "results" / "claims" / "claims.md").read_text() == claims.report(runs)


def test_a_record_that_names_its_corpus_never_pairs_with_one_that_does_not():
    from paper_repro import same_corpus

    named = {"train_split_tokens": 80_379_500}
    assert same_corpus({}, {}) and same_corpus(named, dict(named))
    assert not same_corpus(named, {}) and not same_corpus({}, named)  # unknown: a run of another image would pair
    assert not same_corpus(named, {"corpus_id": "4719da612a7e"})  # nothing in common to compare: not known the same
    assert same_corpus({**named, "corpus_id": "a"}, named) and not same_corpus({**named, "corpus_id": "a"},
                                                                               {**named, "corpus_id": "b"})


def test_runs_of_other_schedules_never_pair(tmp_path):
    """The same tokens in other steps (1,000 steps of twice the batch): another schedule, whose curve meets the
    other run's at other steps. Not a pair, and no gap curve plotted against the wrong tokens."""
    folder = tmp_path / "runs"
    write_run(folder, "longer", "egmla-kv64", 0, 1.60, LONG, "document", steps=(1000, 2000))
    write_run(folder, "longer", "mla-kv256", 0, 1.62, LONG, "document", steps=(1000, 2000))
    write_run(folder, "longer", "egmla-kv64", 1, 1.61, LONG, "document", steps=(1000, 2000))
    write_run(folder, "longer", "mla-kv256", 1, 1.70, LONG, "document", steps=(500, 1000))
    runs = claims.load_runs([folder])
    (budget,) = runs
    assert claims.pairs(runs[budget], "egmla-kv64", "mla-kv256")[1] == [1]
    assert claims.paired(runs[budget], "egmla-kv64", "mla-kv256") == {0: pytest.approx(-0.02)}
    assert list(claims.gap_curves(runs[budget], "egmla-kv64", "mla-kv256")) == [0]
    assert "seed 1: runs on different corpora or schedules, not paired" in claims.claims_table(runs)


def test_report_gives_each_other_corpus_its_own_mark(tmp_path):
    """Runs on two other builds of the corpus are two marks, never one row (its seeds on different data)."""
    folder = tmp_path / "runs"
    for seed, tokens in enumerate((100, 105, 107)):
        write_run(folder, "longer", "egmla-kv64", seed, 1.60 + seed / 100, LONG, "document",
                  corpus={"train_split_tokens": tokens})
        write_run(folder, "longer", "mla-kv256", seed, 1.70 + seed / 100, LONG, "document",
                  corpus={"train_split_tokens": tokens if seed == 2 else 100})
    text = report.tables(report.load_groups(folder))
    assert "| egmla-kv64 | 1.6000 | - | - | 1.6000 | - |" in text
    assert "| egmla-kv64 † | - | 1.6100 | - | 1.6100 | - |" in text
    assert "| egmla-kv64 †† | - | - | 1.6200 | 1.6200 | - |" in text
    assert "| mla-kv256 | 1.7000 | 1.7100 | - | 1.7050 | 0.0071 |" in text
    assert "| mla-kv256 †† | - | - | 1.7200 |" in text
    assert "†: 105, ††: 107 training tokens: trained on other builds of the python-source corpus (the others 100)" \
        in text


def test_report_seed_tables_leave_out_a_diverged_run(tmp_path):
    """A NaN final loss is no loss to average: left out of the per-seed tables (statistics.stdev raised on it)."""
    folder = tmp_path / "runs"
    for seed, loss in enumerate((1.60, 1.62, float("nan"))):
        write_run(folder, "longer", "egmla-kv64", seed, loss, LONG, "document")
        write_run(folder, "seeds", "egmla-kv64", seed, loss, 1000, None)
        write_run(folder, "seeds", "mla-kv256", seed, 1.7, 1000, None)
    groups = report.load_groups(folder)
    assert "| egmla-kv64 | 1.6000 | 1.6200 | - | 1.6100 | 0.0141 |" in report.tables(groups)
    assert report.seed_losses(groups)["egmla-kv64"] == {0: 1.60, 1: 1.62}


def test_mixed_seeds_with_a_significant_mean_say_both():
    """Seeds of both signs give 'a tie' / 'the seeds disagree' unless the mean differs significantly (possible from
    four seeds on): then the verdict says on average, and which side; equal zero differences test as t = 0, p = 1."""
    matches = next(c for c in claims.CLAIMS if c.kind == "matches")
    beats = next(c for c in claims.CLAIMS if c.kind == "beats")
    spread = {0: -0.050, 1: -0.048, 2: -0.052, 3: -0.049, 4: 0.001}  # four clearly ahead, one barely behind
    assert claims.paired_t_test(list(spread.values()))["p"] < claims.SIGNIFICANT
    assert claims.verdict(matches, spread).startswith("**supported on average**")
    assert claims.verdict(beats, {s: -d for s, d in spread.items()}).startswith("**contradicted on average**")
    assert claims.verdict(matches, {0: 0.01, 1: -0.01}).startswith("**a tie**")  # not significant: unchanged
    zero = claims.paired_t_test([0.0, 0.0, 0.0])
    assert (zero["t"], zero["p"]) == (0.0, 1.0)
    assert claims.describe({0: 0.0, 1: 0.0})[2] == "t(1) = 0.00, p = 1.000"


def test_a_claim_whose_sides_ran_other_seeds_says_so():
    claim = claims.CLAIMS[0]
    assert claims.verdict(claim, {}, [], ([0, 1], [2])) == (
        f"no seed run by both yet ({claim.a}: seed 0, 1; {claim.b}: seed 2)")
    assert claims.verdict(claim, {}, [], ([0], [])) == "not yet run"
    assert claims.verdict(claim, {}, [3], ([3], [3])) == "no pair on one corpus yet"


def test_missing_runs_name_per_corpus_what_gives_every_claim_its_seeds(tmp_path, capsys):
    """--missing N: on each corpus the records read, the (config, seed) runs still to train so that every claim has N
    paired seeds (new seeds: the lowest without a pair; a corpus that already holds a side is not asked for it),
    fewest runs first, with a command each. Older records (tokens only) and newer ones (with an id) of one corpus are
    one corpus."""
    old = {"train_split_tokens": 10, "val_split_tokens": 1}
    new = {"train_split_tokens": 20, "val_split_tokens": 2, "corpus_id": "feedc0ffee00"}
    folder = tmp_path / "longer"
    for config in {c for claim in claims.CLAIMS for c in (claim.a, claim.b)}:  # seed 0 of every config, old corpus
        write_run(folder, "longer", config, 0, 1.5, LONG, "document", corpus=old)
    write_run(folder, "longer", "egmla-kv64", 1, 1.5, LONG, "document", corpus={**old, "corpus_id": "0ld0ld0ld0ld"})
    for config in ("mla-kv256", "egmla-kv64-add"):
        write_run(folder, "longer", config, 1, 1.4, LONG, "document", corpus=new)
    runs = claims.load_runs([folder])
    plans = claims.missing_runs(runs, 2)
    assert [claims.corpus_label(corpus) for corpus, _, _ in plans] == ["feedc0ffee00", "0ld0ld0ld0ld"]  # 5 runs, 6
    configs = sorted({c for claim in claims.CLAIMS for c in (claim.a, claim.b)})
    corpus, needed, gains = plans[0]
    assert needed == [(c, 1) for c in configs if c not in ("mla-kv256", "egmla-kv64-add")]  # those are there
    assert set(gains) == {claim.text for claim in claims.CLAIMS} and all(s == [1] for s in gains.values())
    assert plans[1][1] == [(c, 1) for c in configs if c != "egmla-kv64"]  # egmla-kv64 seed 1 is on that corpus
    assert all(needed == [] for _, needed, _ in claims.missing_runs(runs, 1))  # every claim has its one seed
    assert claims.main([str(folder), "--missing", "2"]) == 0
    out = capsys.readouterr().out
    assert "- corpus feedc0ffee00 (its runs trained on synthetic): 5 runs: " in out  # the device: which machine
    assert "- corpus 0ld0ld0ld0ld (its runs trained on synthetic): 6 runs: " in out  # builds that corpus again
    assert "paper_repro.py longer --only egmla-kv64 --seeds 1 --retrain-other-corpora" in out
    assert claims.main([str(folder), "--missing", "1"]) == 0
    assert capsys.readouterr().out.strip() == "every claim has 1 paired seed: no run is missing"
    assert f"On synthetic: {5 * LONG / 1.0 / 60:.0f} min of training steps" in out  # 5 runs at the recorded 1 token/s


def test_a_seed_paired_on_two_corpora_counts_once_with_the_mean_of_both(tmp_path):
    """A rerun on another corpus adds a pair to its seed; it never replaces the pair a verdict read before."""
    first, second = {"train_split_tokens": 100, "corpus_id": "aaa"}, {"train_split_tokens": 105, "corpus_id": "bbb"}
    folder = tmp_path / "runs"
    for config, loss in (("egmla-kv64", 1.60), ("mla-kv256", 1.58)):
        write_run(folder, "longer", config, 0, loss, LONG, "document", corpus=first)
    write_run(folder, "longer", "egmla-kv64", 1, 1.62, LONG, "document", corpus=first)
    write_run(folder, "longer", "mla-kv256", 1, 1.61, LONG, "document", corpus=first)
    runs = claims.load_runs([folder])
    (budget,) = runs
    assert claims.paired(runs[budget], "egmla-kv64", "mla-kv256") == {0: pytest.approx(0.02), 1: pytest.approx(0.01)}
    for config, loss in (("egmla-kv64", 1.70), ("mla-kv256", 1.74)):  # seed 0 again, on the second corpus
        write_run(folder, "longer", config, 0, loss, LONG, "document", corpus=second, suffix="-cbbb")
    runs = claims.load_runs([folder])
    assert claims.paired(runs[budget], "egmla-kv64", "mla-kv256") == {0: pytest.approx(-0.01), 1: pytest.approx(0.01)}
    assert claims.per_corpus(runs[budget], "egmla-kv64", "mla-kv256") == {0: [("aaa", pytest.approx(0.02)),
                                                                             ("bbb", pytest.approx(-0.04))]}
    table = claims.claims_table(runs)
    assert "-0.0100 (seed 0: mean of +0.0200 on aaa and -0.0400 on bbb), +0.0100 (seed 1)" in table
    curve = claims.gap_curves(runs[budget], "egmla-kv64", "mla-kv256")[0]
    assert [d for _, d in curve] == pytest.approx([-0.01, -0.01])  # the mean of both pairs at each evaluation
