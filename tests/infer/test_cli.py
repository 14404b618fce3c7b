"""`egmla generate` on run directories written the way `egmla train` writes them."""
import json

import pytest

from egmla.cli import main as egmla_main
from egmla.runs import FORMAT_VERSION
from tests.infer.helpers import tiny_model, write_run


def generate(capsys, *argv):
    code = egmla_main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_streams_one_prompt(capsys, run_dir):
    code, out, err = generate(capsys, "--run", str(run_dir), "--prompt", "To be, or", "--max-new-tokens", "12",
                              "--temperature", "0")
    assert code == 0 and out.startswith("To be, or") and len(out) > len("To be, or\n")
    assert "EG-MLA kv16" in err and "tokens/s" in err
    code, again, _ = generate(capsys, "--run", str(run_dir.parent / "latest"), "--prompt", "To be, or",
                              "--max-new-tokens", "12", "--temperature", "0", "--decode-path", "gate-table",
                              "--offload-gate-tables")
    assert code == 0 and again == out  # runs/latest symlink, another path, offloaded tables: same text


def test_generate_batch_json_and_seeds(capsys, run_dir, tmp_path):
    batch = tmp_path / "prompts.txt"
    batch.write_text("To be\n\nwhether 'tis nobler in the mind\n")
    args = ["--run", str(run_dir), "--batch", str(batch), "--prompt", "Café", "--max-new-tokens", "10",
            "--temperature", "1.0", "--ignore-eos"]
    code, out, _ = generate(capsys, *args, "--json", "--seed", "1")
    results = json.loads(out)
    assert code == 0 and [r["prompt"] for r in results] == ["Café", "To be", "whether 'tis nobler in the mind"]
    assert all(len(r["token_ids"]) == 10 and r["finish_reason"] == "length" for r in results)
    assert json.loads(generate(capsys, *args, "--json", "--seed", "1")[1]) == results
    assert json.loads(generate(capsys, *args, "--json", "--seed", "2")[1]) != results
    code, out, _ = generate(capsys, *args)  # without --json: each sequence printed when it finishes
    assert code == 0 and out.count("--- [") == 3 and "(length)" in out
    # reading each step's tokens back before queueing the next: the same samples
    assert json.loads(generate(capsys, *args, "--json", "--seed", "1", "--no-overlap")[1]) == results


def test_generate_bad_input_is_one_clear_line(capsys, run_dir, tmp_path, tokenizer):
    code, _, err = generate(capsys, "--run", str(run_dir), "--prompt", "x", "--decode-path", "absorbed")
    assert code == 2 and "decode_path='absorbed'" in err and "naive, gate-table" in err
    code, _, err = generate(capsys, "--run", str(run_dir), "--prompt", "")
    assert code == 2 and "empty" in err
    code, _, err = generate(capsys, "--run", str(run_dir), "--prompt", "to be " * 40)
    assert code == 2 and "max_seq_len=48" in err
    code, _, err = generate(capsys, "--run", str(run_dir))
    assert code == 2 and "no prompt" in err
    old = write_run(tmp_path / "old-run", tiny_model("mla"), tokenizer, format_version=FORMAT_VERSION + 1)
    code, _, err = generate(capsys, "--run", str(old), "--prompt", "x")
    assert code == 2 and f"format_version={FORMAT_VERSION + 1}" in err
    code, _, err = generate(capsys, "--run", str(tmp_path / "missing"), "--prompt", "x")
    assert code == 2 and "no config.json" in err


def test_a_device_egmla_does_not_run_on_is_one_line_not_every_checkpoint_unusable(capsys, run_dir):
    """--device meta passed torch.device() and reached the loader: each checkpoint was "unusable (device meta is
    invalid)", then "no usable weights"."""
    for device, error in (("meta", "egmla runs on cpu or cuda"), ("tpu", "not a device")):
        code, _, err = generate(capsys, "--run", str(run_dir), "--prompt", "x", "--device", device)
        assert code == 2 and f"--device '{device}': {error}; use cpu, cuda, cuda:1, ... or auto" in err
        assert "unusable" not in err


def test_generate_says_when_the_context_cuts_it_short(capsys, run_dir, tokenizer):
    args = ["--run", str(run_dir), "--prompt", "To be", "--temperature", "0", "--ignore-eos"]
    code, _, err = generate(capsys, *args, "--max-new-tokens", "5000")
    room = 48 - len(tokenizer.encode("To be").ids) + 1  # the last new token is never fed back
    assert code == 0 and (f"note: sequence 0 stopped at the model's context (max_seq_len=48) after {room} of "
                          f"--max-new-tokens 5000 new tokens") in err
    code, _, err = generate(capsys, *args, "--max-new-tokens", "5")
    assert code == 0 and "note:" not in err  # within the context: nothing to say


def test_a_prompt_file_that_is_a_folder_says_so(tmp_path):
    from types import SimpleNamespace

    from egmla.infer.cli import labelled_prompts

    args = SimpleNamespace(prompt=[], prompt_file=[], batch=None, num_samples=1)
    for field, value in (("prompt_file", [str(tmp_path)]), ("batch", str(tmp_path))):
        option = "--" + field.replace("_", "-")
        with pytest.raises(ValueError, match=f"{option} '{tmp_path}': a folder; give a text file"):
            labelled_prompts(SimpleNamespace(**{**vars(args), field: value}))
