"""`egmla generate` given what a demanding user types: each bad input is one line on stderr that names the option,
its value and the fix, with nothing half-printed on stdout and no traceback."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from egmla.cli import main as egmla_main

REPO = Path(__file__).resolve().parents[2]


def generate(capsys, *argv):
    code = egmla_main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bad_settings_fail_before_the_prompt_is_printed(capsys, run_dir):
    """A single prompt is echoed before its stream: an error found after that left the prompt on stdout."""
    base = ["--run", str(run_dir), "--prompt", "To be, or"]
    for extra, expected in ((["--max-new-tokens", "0"], "--max-new-tokens 0"),
                            (["--max-new-tokens", "-3"], "--max-new-tokens -3"),
                            (["--stop", ""], "--stop ''")):
        code, out, err = generate(capsys, *base, *extra)
        assert code == 2 and out == "" and expected in err, (extra, out, err)
    code, out, err = generate(capsys, *base, "--logprobs", "100000")  # known once the model is loaded
    assert code == 2 and out == "" and "--logprobs 100000: more than the vocabulary's" in err, (out, err)
    code, out, err = generate(capsys, "--run", str(run_dir), "--prompt", "to be " * 40)
    assert code == 2 and out == "" and "--prompt 'to be to be" in err and "max_seq_len=48" in err


def test_prompt_errors_name_where_the_prompt_came_from(capsys, run_dir, tmp_path):
    batch = tmp_path / "prompts.txt"
    batch.write_text("To be\n" + "to be " * 40 + "\n")
    code, out, err = generate(capsys, "--run", str(run_dir), "--prompt", "x", "--batch", str(batch))
    assert code == 2 and out == "" and f"--batch {str(batch)!r} line 2" in err and "max_seq_len=48" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = generate(capsys, "--run", str(run_dir), "--prompt-file", str(empty))
    assert code == 2 and f"--prompt-file {str(empty)!r}" in err and "empty" in err


def test_batch_lines_split_on_newlines_only(capsys, run_dir, tmp_path):
    """str.splitlines() also splits at form feeds, U+2028 and U+0085, cutting one prompt into several."""
    batch = tmp_path / "prompts.txt"
    batch.write_text("To be\x0cor not\r\nCafé\u2028naïve\n", newline="")
    code, out, _ = generate(capsys, "--run", str(run_dir), "--batch", str(batch), "--max-new-tokens", "2",
                            "--json", "--temperature", "0")
    import json
    assert code == 0 and [r["prompt"] for r in json.loads(out)] == ["To be\x0cor not", "Café\u2028naïve"]


def test_files_that_are_not_utf8_or_start_with_a_bom(capsys, run_dir, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Café\n".encode("latin-1"))
    for option in ("--batch", "--prompt-file"):
        code, out, err = generate(capsys, "--run", str(run_dir), option, str(bad))
        assert code == 2 and out == "" and f"{option} {str(bad)!r}" in err and "UTF-8" in err, err
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffTo be\r\n".encode())  # Windows editors' UTF-8: a BOM and CRLF
    code, out, _ = generate(capsys, "--run", str(run_dir), "--prompt-file", str(bom), "--max-new-tokens", "2",
                            "--json")
    import json
    assert code == 0 and json.loads(out)[0]["prompt"] == "To be"


def test_bad_device_is_one_clear_line(capsys, run_dir):
    code, _, err = generate(capsys, "--run", str(run_dir), "--prompt", "x", "--device", "nope")
    assert code == 2 and "--device 'nope'" in err
    if not torch.cuda.is_available():  # it blamed the run: "run is unusable ... trying the previous checkpoint"
        code, _, err = generate(capsys, "--run", str(run_dir), "--prompt", "x", "--device", "cuda")
        assert code == 2 and "--device 'cuda'" in err and "unusable" not in err


def test_corrupt_tokenizer_is_one_clear_line(capsys, run_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "tokenizer.json").write_text("{")
    code, _, err = generate(capsys, "--run", str(broken), "--prompt", "x")
    assert code == 2 and "tokenizer.json" in err and str(broken) in err


def test_empty_eos_token_is_refused(capsys, run_dir):
    """--eos-token '' fell back to the default end-of-text token without a word."""
    code, _, err = generate(capsys, "--run", str(run_dir), "--prompt", "x", "--eos-token", "")
    assert code == 2 and "--eos-token ''" in err


def test_output_closed_early_is_no_traceback(run_dir):
    """`egmla generate ... | head -c 3`: the pipe closes mid-stream."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "egmla.cli", "generate", "--run", str(run_dir), "--prompt",
                             "To be", "--max-new-tokens", "40", "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    proc.stdout.read(3)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "Exception ignored" not in err, err
