import json

from egmla.cli import main


def test_kv_report_table(capsys):
    assert main(["kv-report", "--preset", "paper-base"]) == 0
    out = capsys.readouterr().out
    for line_start, figure in (("MHA ", "18,432"), ("GQA-4", "6,144"), ("MLA kv256", "3,840"),
                               ("EG-MLA kv64 ", "1,536"), ("EG-MLA kv16", "960")):
        assert any(line.startswith(line_start) and figure in line for line in out.splitlines()), line_start


def test_kv_report_json(capsys):
    assert main(["kv-report", "--preset", "paper-base", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["variant"]: r for r in rows}
    assert by_name["EG-MLA kv64"]["kv_lora_rank"] == 64
    assert by_name["EG-MLA kv64"]["measured_bytes_per_token"] == 1536 * 2 + 4  # bf16 + one int32 id
    assert {"variant", "kv_lora_rank", "elements_per_token", "measured_bytes_per_token"} <= set(rows[0])


def test_cli_error_is_one_clear_line(capsys):
    assert main(["kv-report", "--preset", "paper-huge"]) == 2
    assert "unknown preset" in capsys.readouterr().err
