"""`egmla bench grouped`'s tables: the per-step plan's share per layer is added to every grouped row."""
import json


def test_markdown_adds_the_plan_share(tmp_path):
    from egmla.bench.grouped_study import _speedups, markdown

    base = {"text": "python-source", "batch": 32, "context": 4096}
    rows = [dict(base, variant="MHA", path="sdpa", median_us=100.0),
            dict(base, variant="MLA kv64", path="kernel", median_us=25.0),
            dict(base, variant="EG-MLA kv64", path="kernel", median_us=200.0),
            dict(base, variant="EG-MLA kv64", path="grouped", median_us=50.0, plan_us_per_layer=10.0,
                 median_us_with_plan=60.0),
            dict(base, variant="EG-MLA kv64", path="grouped-plan", median_us=120.0)]
    _speedups(rows)
    grouped = rows[3]
    assert grouped["x_mha"] == 2.0 and abs(grouped["x_mha_with_plan"] - 100 / 60) < 1e-12
    source, table = tmp_path / "g.json", tmp_path / "g.md"
    source.write_text(json.dumps({"meta": {"device": "NVIDIA H200", "copy_gbs": None}, "rows": rows}))
    markdown(str(source), str(table))
    text = table.read_text()
    assert "| python-source | 32 | 4096 | equal | EG-MLA kv64 grouped | 50.0 | 2.00 | 0.50 | 4.00 | 60.0 | 1.67 |" in text
    assert "grouped-plan" not in text.split("|---|")[-1]  # the plan is folded into the rows, not a row


def test_speedups_compare_rows_of_the_same_lengths():
    from egmla.bench.grouped_study import _speedups

    base = {"text": "python-source", "batch": 32, "context": 4096}
    rows = [dict(base, lengths=kind, variant=variant, path=path, median_us=us)
            for kind, scale in (("equal", 1.0), ("ragged", 0.5))
            for variant, path, us in (("MHA", "sdpa", 100.0), ("MLA kv64", "kernel", 20.0),
                                      ("EG-MLA kv64", "grouped", 50.0 * scale))]
    _speedups(rows)
    grouped = {r["lengths"]: r for r in rows if r["path"] == "grouped"}
    assert grouped["equal"]["x_mha"] == 2.0 and grouped["ragged"]["x_mha"] == 4.0
    assert grouped["ragged"]["x_mla"] == 0.8
