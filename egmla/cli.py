"""`egmla ...`: thin subcommands over the library. Each subcommand lives in its own module with
`add_arguments(parser)` and `main(args) -> int`; this file only wires them up."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import re
import sys
import warnings

# name -> (module, one-line help). Modules import heavy dependencies inside main(), so --help is fast.
SUBCOMMANDS = {
    "kv-report": ("egmla.commands.kv_report", "KV-cache elements and bytes per token for every attention variant"),
    "train": ("egmla.train.cli", "train a model (TOML config + --set overrides); torchrun for several GPUs"),
    "compare": ("egmla.train.compare", "train several configs on the same data and budget, print a table and plot"),
    "generate": ("egmla.infer.cli", "generate text from a trained run (batched, streaming, any decode path)"),
    "serve": ("egmla.infer.serve_cli", "an OpenAI-compatible HTTP server with continuous batching"),
    "plan": ("egmla.infer.plan_cli", "how many sequences of length T fit in M GB, per attention variant"),
    "bench": ("egmla.bench.cli", "benchmarks: decode attention, generation, training speed"),
    "export": ("egmla.commands.export", "export a run to Hugging Face (or DeepSeek-V3) format"),
    "eval": ("egmla.commands.eval", "lm-evaluation-harness on a run: egmla's local tasks or any of lm-eval's"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where it says something and the help text does not already give it."""

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == [] or \
            action.default is argparse.SUPPRESS  # a 0 is shown: `in (False, ...)` hid it, 0 == False
        # the text gives the default itself ("(default: x)", "default x"; a flag's text says what it turns on or off),
        # not merely uses the word ("what generation takes by default", the compile mode named default)
        stated = "default" in text.lower() and (action.nargs == 0 or re.search(
            r"\(default|default:|default " + re.escape(str(action.default)), text, re.IGNORECASE))
        if stated or quiet:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports an unknown option from the (sub)command it was given to, with the closest
    known option: `egmla generate --promt hi` -> "unrecognized arguments: --promt hi (did you mean --prompt?)".
    Plain argparse hands the leftovers up to the top-level parser, which knows no option of the command."""

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)  # for error(): a required option mistyped
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message):
        super().error(message + self._closest_option())

    def _closest_option(self) -> str:
        """' (did you mean --x?)' for the first given option that this parser does not know, or ''."""
        known = list(self._option_string_actions)
        for word in getattr(self, "_given", []):
            name = word.split("=", 1)[0]
            if name.startswith("-") and not any(option.startswith(name) for option in known):
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                if close:
                    return f" (did you mean {close[0]}?)"
        return ""


def add_subcommands(parser: argparse.ArgumentParser, table: dict, dest: str, handler_key: str) -> None:
    """One subparser per entry of `table` (name -> (module, help)); the module's `add_arguments`
    fills it and its `main` becomes `args.<handler_key>`. Shared by `egmla` and `egmla bench`."""
    sub = parser.add_subparsers(dest=dest, metavar=dest.upper(), parser_class=ArgumentParser)
    for name, (module_name, help_text) in table.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        module.add_arguments(command)
        command.set_defaults(**{handler_key: module.main})


def build_parser() -> argparse.ArgumentParser:
    from egmla import __version__

    parser = ArgumentParser(
        prog="egmla", description="Embedding-Gated Multi-head Latent Attention: every attention variant with "
                                  "exact compressed KV caches; train, compare, generate, plan, serve, benchmark, "
                                  "export.")
    parser.add_argument("--version", action="version", version=f"egmla {__version__}")
    add_subcommands(parser, SUBCOMMANDS, dest="command", handler_key="handler")
    return parser


def quiet_cpu_threads() -> None:
    """OpenMP threads that wait for work spin on their core by default; on a machine whose cores other
    processes also use, that slowed 2-thread CPU training up to 15x (docs/training.md). Ask for passive
    waiting unless the user chose a policy. The runtime reads the variable once, when torch loads it, so
    this only acts in a process that has not imported torch yet: the `egmla` command, not a Python session."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"egmla: {category.__name__}: {message}\n"  # not the source line that raised it


def main(argv: list[str] | None = None) -> int:
    quiet_cpu_threads()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0 if args.command is None else 2
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.handler(args) or 0
    except ValueError as err:  # configuration and input errors: one clear line, no traceback
        print(f"egmla {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`egmla plan --json | head`): stop quietly, as other Unix tools do
        # Python flushes stdout again at exit; point it at /dev/null so that flush cannot raise once more
        with contextlib.suppress(OSError, ValueError, AttributeError):  # a stdout without a descriptor: nothing to do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":
    sys.exit(main())
