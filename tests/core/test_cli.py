"""The `egmla` command's own edges: unknown options, --version, help, the OpenMP wait policy."""
import os
import subprocess
import sys

import pytest

import egmla
from egmla.cli import main


def error_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, usage, hint", [
    (["generate", "--promt", "hi"], "usage: egmla generate", "unrecognized arguments: --promt hi (did you mean --prompt?)"),
    (["bench", "decode", "--quik"], "usage: egmla bench decode", "--quik (did you mean --quick?)"),
    (["plan", "--memory-gb=60", "--contxt=4096"], "usage: egmla plan", "(did you mean --context?)"),
])
def test_a_mistyped_option_names_the_closest_one_of_its_command(capsys, argv, usage, hint):
    err = error_of(capsys, *argv)
    assert err.startswith(usage) and hint in err


def test_leftovers_that_resemble_no_option_get_no_guess(capsys):
    err = error_of(capsys, "kv-report", "--zzzzzz", "extra")
    assert "unrecognized arguments: --zzzzzz extra\n" in err and "did you mean" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"egmla {egmla.__version__}\n"


def test_help_lists_only_commands_that_exist(capsys):
    assert main([]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert " run," not in out and "train, compare, generate, plan, serve" in out


def test_kv_report_help_lists_the_model_fields(capsys):
    with pytest.raises(SystemExit):
        main(["kv-report", "--help"])
    out = capsys.readouterr().out
    assert "  kv_lora_rank = 64" in out and "d_c: width of the cached latent" in out and "  gate_placement = up" in out


def test_kv_report_help_explains_every_model_field():
    """Each field's line carries the comment beside it in ModelConfig; a field without one printed bare."""
    import dataclasses

    from egmla.commands.kv_report import model_fields_help
    from egmla.config import ModelConfig

    lines = {line.split("=")[0].strip(): line for line in model_fields_help().splitlines()}
    for field in dataclasses.fields(ModelConfig):
        default_and_text = lines[field.name].split("=", 1)[1].split()
        assert len(default_and_text) > 1, f"ModelConfig.{field.name} has no comment to explain it in --help"


def every_option():
    """(command, action, its parser's formatter) of every option of `egmla` and its subcommands."""
    import argparse

    from egmla.cli import build_parser

    found, parsers = [], [("egmla", build_parser())]
    while parsers:
        name, parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{name} {sub}", subparser) for sub, subparser in action.choices.items()]
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                found.append((name, action, parser._get_formatter()))
    return found


def test_every_option_has_help_and_its_default_in_it():
    """`bench generate --paths` and `bench train --compile-mode` hid their default, auto: their text used the word
    ("what generation takes by default", the compile mode named default), which the formatter took for the default."""
    import re

    for command, action, formatter in every_option():
        where = f"{command} {'/'.join(action.option_strings) or action.dest}"
        assert (action.help or "").strip(), f"{where}: no help text"
        default = action.default
        if action.nargs == 0 or default is None or not isinstance(default, (str, int, float)):
            continue  # a flag says what it turns on; an unset default (or a list, as --set's []) needs no mention
        text = formatter._get_help_string(action)
        stated = re.search(r"\(default|default:|default " + re.escape(str(default)), text, re.IGNORECASE)
        assert stated, f"{where}: its default, {default!r}, is not in its help"


@pytest.mark.skipif(sys.platform != "linux", reason="torch's OpenMP runtime is libgomp only on Linux")
@pytest.mark.parametrize("command", [["egmla", "kv-report", "--preset", "tiny", "--json"],
                                     ["egmla.train", "--dry-run"]])  # also what torchrun -m egmla.train runs
def test_the_command_asks_openmp_for_passive_waiting_unless_told_otherwise(command):
    """libgomp (torch's OpenMP on Linux) prints its settings with OMP_DISPLAY_ENV; passive = spin count 0."""
    def spin_count(**env) -> str:
        environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"OMP_DISPLAY_ENV": "VERBOSE"}
        done = subprocess.run([sys.executable, "-m", *command], env=environ | env, capture_output=True, text=True,
                              check=True)
        assert "GOMP_SPINCOUNT" in done.stderr, "libgomp printed no settings"
        return done.stderr.split("GOMP_SPINCOUNT = '")[1].split("'")[0]

    assert spin_count() == "0"
    assert spin_count(OMP_WAIT_POLICY="ACTIVE") != "0"  # the user's choice stands


def test_warnings_print_as_one_line_while_a_command_runs(monkeypatch, capsys):
    import warnings

    import egmla.commands.kv_report as kv_report

    shown = []
    monkeypatch.setattr(kv_report, "main", lambda args: shown.append(
        warnings.formatwarning("kernel: using the PyTorch reference", RuntimeWarning, "x.py", 3, "warn(...)")))
    before = warnings.formatwarning
    assert main(["kv-report"]) == 0
    assert shown == ["egmla: RuntimeWarning: kernel: using the PyTorch reference\n"]  # no file, no source line
    assert warnings.formatwarning is before  # restored for whoever called main()


def test_every_option_of_every_command_explains_itself():
    """`--help` explains every option: an argument added without help text fails here."""
    import argparse

    from egmla.cli import build_parser

    def unexplained(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from unexplained(sub, f"{path} {name}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                yield f"{path} {'/'.join(action.option_strings) or action.dest}"

    assert list(unexplained(build_parser(), "egmla")) == []


def test_a_reader_that_leaves_stops_the_command_quietly():
    """`egmla plan --json | head -1`: the write into a closed pipe ends the command with status 141 (128 + SIGPIPE, as
    a shell reports a tool that SIGPIPE stopped) and no traceback."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader has left before the first write
    try:
        done = subprocess.run([sys.executable, "-m", "egmla", "plan", "--preset", "tiny", "--context", "64",
                               "--memory-gb", "1", "--json"], stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr


def test_kernel_sweep_without_a_gpu_says_how_to_check_it(monkeypatch, capsys):
    """`egmla bench kernel-sweep` on a machine without CUDA: one line naming the CPU way, not torch's assertion."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "kernel-sweep", "--kernels", "mla"]) == 2
    assert "--device cuda: no CUDA device here" in capsys.readouterr().err
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["bench", "kernel-sweep", "--kernels", "mla", "--device", "cpu"]) == 2
    assert "set TRITON_INTERPRET=1" in capsys.readouterr().err
