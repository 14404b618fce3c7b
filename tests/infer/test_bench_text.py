"""`egmla bench text`: every mode runs the scheduler's per-token text path on real text and the table is made from
the JSON (no timing is asserted: the figures are the benchmark's)."""
import json

import pytest


def test_text_bench_times_every_mode_and_writes_its_table(tmp_path, capsys):
    from egmla.bench.cli import run
    from egmla.bench.text import MODES

    out, md = tmp_path / "text.json", tmp_path / "text.md"
    assert run("text", ["--vocab-size", "1024", "--rows", "3", "--steps", "16", "--repeats", "1",
                        "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["rows"]] == list(MODES)
    assert all(r["us_per_row_step"] > 0 and len(r["runs_s"]) == 1 for r in data["rows"])
    assert data["meta"]["rows"] == 3 and "1024" in data["meta"]["tokenizer"]
    run("text", ["--markdown", str(out), str(md)])
    table = md.read_text()
    assert "| streamed, two decodes per token |" in table and table.count("\n| ") == len(MODES) + 1


@pytest.mark.parametrize("option", ["--rows", "--steps", "--repeats"])
def test_a_count_below_1_is_refused_before_the_tokenizer_is_trained(option, monkeypatch):
    """--rows 0 trained a tokenizer, then failed with an IndexError."""
    from egmla.bench import text
    from egmla.bench.cli import run

    monkeypatch.setattr(text, "token_windows", lambda *a: pytest.fail("got past the check"))
    with pytest.raises(ValueError, match=rf"^{option} 0: must be >= 1$"):
        run("text", [option, "0"])
