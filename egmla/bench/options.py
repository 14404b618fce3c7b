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
    import json
    from pathlib import Path

    from egmla.bench.generate import write_table

    return write_table(markdown(json.loads(Path(args.report).read_text())), args.markdown)
