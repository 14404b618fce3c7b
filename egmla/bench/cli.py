"""`egmla bench ...`: dispatches to the sub-benchmarks.

Each module provides `add_arguments(parser)` and `main(args) -> int` and imports heavy things in main.
Results go to --out (a file, or a folder under the working directory by default), never into tests."""
import argparse

BENCHMARKS = {
    "decode": ("egmla.bench.decode", "decode attention per layer: every variant and path vs its floor"),
    "generate": ("egmla.bench.generate", "end-to-end generation: tokens/s and step latency per decode path"),
    "ab": ("egmla.bench.ab_run",
           "A/B of code versions: one generate command per version and round, rotated, each from its own tree"),
    "calls": ("egmla.bench.calls",
              "successive generate() calls of decreasing length on one engine: the kept cache and graphs reused or not"),
    "prefill": ("egmla.bench.prefill",
                "prompt prefill time per variant, path, batch and prefill token budget, beside transformers' Llama"),
    "generate-suite": ("egmla.bench.generate_suite",
                       "the generation table of docs/benchmarks.md: every variant and path, then gate tables offloaded"),
    "fp8-loss": ("egmla.bench.fp8_loss", "what an fp8 KV cache costs a trained run's loss on held-out text, and the "
                                         "range of the values it rounds (whether a scale would help)"),
    "grouped": ("egmla.bench.grouped_study", "grouped EG-MLA decode study: distinct ids per corpus, every path"),
    "kernel-sweep": ("egmla.bench.kernel_sweep", "launch-configuration sweep of the Triton decode kernels"),
    "launches": ("egmla.bench.launches",
                 "launches of a CUDA-graph decode step per layer and per step, counted on the CPU (TRITON_INTERPRET=1)"),
    "kernel-resources": ("egmla.bench.kernel_resources",
                         "registers, spills and shared memory of the decode kernels, compiled for a GPU (no GPU needed)"),
    "serve": ("egmla.bench.serve", "serving under a stream of requests: continuous batching, static batches and "
                                   "transformers' continuous batching (tokens/s, time to first token, latency)"),
    "text": ("egmla.bench.text", "a server's host time per row and decode step for its text: detokenizing, stop "
                                 "strings, requests that read only their result (CPU)"),
    "train": ("egmla.bench.train", "training step time and tokens/s per variant"),
    "train-run": ("egmla.bench.train_run", "a paper-base EG-MLA kv64 training run of a few minutes, from nothing"),
    "multigpu": ("egmla.bench.multigpu",
                 "DDP and FSDP2 settings against one GPU on one global batch: scaling, drift, losses, resume, profile"),
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


def run(name: str, argv: list[str]) -> int:
    """`egmla bench NAME ARGV...` from Python: the benchmark's own parser and main."""
    import importlib

    from egmla.cli import ArgumentParser

    module = importlib.import_module(BENCHMARKS[name][0])
    parser = ArgumentParser(prog=f"egmla bench {name}")
    module.add_arguments(parser)
    return module.main(parser.parse_args(argv)) or 0
