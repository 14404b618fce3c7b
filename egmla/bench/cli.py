"""`egmla bench ...`: dispatches to the sub-benchmarks.

Each module provides `add_arguments(parser)` and `main(args) -> int` and imports heavy things in main."""
import argparse

BENCHMARKS = {
    "decode": ("egmla.bench.decode", "decode attention per layer: every variant and path vs its floor"),
    "generate": ("egmla.bench.generate", "end-to-end generation: tokens/s and step latency per decode path"),
    "train": ("egmla.bench.train", "training step time and tokens/s per variant"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from egmla.cli import add_subcommands

    add_subcommands(parser, BENCHMARKS, dest="benchmark", handler_key="bench_handler")
    parser.set_defaults(bench_parser=parser)


def main(args) -> int:
    handler = getattr(args, "bench_handler", None)
    if handler is None:
        args.bench_parser.print_help()
        return 2
    return handler(args) or 0
