"""`egmla ...`: thin subcommands over the library. Each subcommand lives in its own module with
`add_arguments(parser)` and `main(args) -> int`; this file only wires them up."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules import heavy dependencies inside main(), so --help is fast.
SUBCOMMANDS = {
    "kv-report": ("egmla.commands.kv_report", "KV-cache elements and bytes per token for every attention variant"),
    "train": ("egmla.train.cli", "train a model (TOML config + --set overrides); torchrun for several GPUs"),
    "compare": ("egmla.train.compare", "train several configs on the same data and budget, print a table and plot"),
    "generate": ("egmla.infer.cli", "generate text from a trained run (batched, streaming, any decode path)"),
    "plan": ("egmla.infer.plan_cli", "how many sequences of length T fit in M GB, per attention variant"),
    "bench": ("egmla.bench.cli", "benchmarks: decode attention, generation, training speed"),
    "export": ("egmla.commands.export", "export a run to Hugging Face (or DeepSeek-V3) format"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where it says something and the help text does not already give it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, [], False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def add_subcommands(parser: argparse.ArgumentParser, table: dict, dest: str, handler_key: str) -> None:
    """One subparser per entry of `table` (name -> (module, help)); the module's `add_arguments`
    fills it and its `main` becomes `args.<handler_key>`. Shared by `egmla` and `egmla bench`."""
    sub = parser.add_subparsers(dest=dest, metavar=dest.upper())
    for name, (module_name, help_text) in table.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        module.add_arguments(command)
        command.set_defaults(**{handler_key: module.main})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egmla", description="Embedding-Gated Multi-head Latent Attention: train, compare, run, serve.")
    add_subcommands(parser, SUBCOMMANDS, dest="command", handler_key="handler")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return args.handler(args) or 0
    except ValueError as err:  # configuration and input errors: one clear line, no traceback
        print(f"egmla {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
