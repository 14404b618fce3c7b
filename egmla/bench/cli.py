"""`egmla bench ...`: dispatches to the sub-benchmarks; a module not built yet is skipped.

Each module provides `add_arguments(parser)` and `main(args) -> int` and imports heavy things in main."""
import argparse
import importlib

BENCHMARKS = {
    "decode": ("egmla.bench.decode", "decode attention per layer: every variant and path vs its floor"),
    "generate": ("egmla.bench.generate", "end-to-end generation: tokens/s and step latency per decode path"),
    "train": ("egmla.bench.train", "training step time and tokens/s per variant"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if not err.name or not err.name.startswith("egmla"):
                raise
            continue  # not built yet
        command = sub.add_parser(name, help=help_text, description=help_text,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(bench_handler=module.main)
    parser.set_defaults(bench_parser=parser)


def main(args) -> int:
    handler = getattr(args, "bench_handler", None)
    if handler is None:
        args.bench_parser.print_help()
        return 2
    return handler(args) or 0
