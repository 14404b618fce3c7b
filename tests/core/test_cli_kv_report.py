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


def test_an_unknown_set_key_is_named_as_typed(capsys):
    """`kv-report --set nope=1` named the key `model.nope` (ModelConfig's check, for keys of `egmla train`'s [model]
    section); the message names what was typed, and the fix. The benchmarks and `plan` share the check."""
    assert main(["kv-report", "--set", "nope=1"]) == 2
    err = capsys.readouterr().err
    assert "--set 'nope=1': nope: unknown model field; known keys: vocab_size, n_layers" in err and "model.nope" not in err
    assert main(["kv-report", "--set", "kv_lora_rnk=16"]) == 2
    assert "--set 'kv_lora_rnk=16': kv_lora_rnk: unknown model field; did you mean 'kv_lora_rank'?" in (
        capsys.readouterr().err)
    assert main(["kv-report", "--set", "model.kv_lora_rnk=16"]) == 2  # the section's spelling, as typed
    assert "--set 'model.kv_lora_rnk=16': model.kv_lora_rnk: unknown model field; did you mean" in capsys.readouterr().err
    assert main(["kv-report", "--preset", "tiny", "--set", "model.kv_lora_rank=16", "--json"]) == 0
