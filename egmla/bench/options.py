"""Command-line pieces shared by the engine benchmarks that build a random-weight model from a preset
(`egmla bench calls`, `egmla bench prefill`, `egmla bench serve`): the model's shape, the device, and where results
go."""
from __future__ import annotations

import argparse


def add_preset_arguments(parser: argparse.ArgumentParser, fits: str) -> None:
    """--preset and --set; `fits`: what max_seq_len is raised to fit by default."""
    parser.add_argument("--preset", default="auto", help="model shape with random weights: tiny, paper-base, "
                        "paper-1b; auto = paper-base on CUDA, tiny elsewhere")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a model field of the preset (repeatable); max_seq_len is raised to fit {fits} "
                             "by default")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --json, --markdown and --report (the table of a result file, nothing measured)."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, ...; auto = cuda if available")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto = bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table here")
    parser.add_argument("--report", metavar="JSON", help="measure nothing: the table of this result file")


def report(args, markdown) -> int:
    """The table `markdown(meta)` of the result file args.report, printed and written to --markdown."""
    from egmla.bench.generate import write_table

    return write_table(markdown(read_result(args.report, "--report")), args.markdown)


def read_result(path, flag: str) -> dict:
    """The result file `path` that the user named with `flag` (a JSON object an `egmla bench` command wrote with
    --json), or a ValueError naming the flag, the path and what to give instead: the CLI prints it as one line."""
    import json
    from pathlib import Path

    fix = "give a result file an `egmla bench` command wrote with --json"
    named = f"{flag}{path}" if flag.endswith("=") else f"{flag} {path}"  # --ab LABEL=PATH, --report PATH
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ValueError(f"{named}: no such file; {fix}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise ValueError(f"{named}: cannot be read ({error.__class__.__name__}); {fix}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{named}: not JSON ({error}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{named}: a JSON {type(data).__name__}, not a result object; {fix}")
    return data
