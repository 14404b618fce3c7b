"""`egmla eval --run DIR`: lm-evaluation-harness on a run (or an exported folder), egmla's model registered.

    egmla eval --run runs/latest                                 # egmla's two local tasks, no download
    egmla eval --run runs/latest --tasks piqa,arc_easy --dtype bfloat16 --device cuda --batch-size 32
    egmla eval --run runs/latest --limit 8 --output-path results -- --log_samples --seed 1   # after --: lm_eval's own

It is `python -m egmla.hf.lm_eval_model --model egmla --model_args {"pretrained": DIR, ...}` with egmla's defaults (the
local tasks egmla_mc and egmla_ppl, the device the run would generate on); lm_eval's own options pass through after
`--`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

LOCAL_TASKS = "egmla_mc,egmla_ppl"
DTYPES = ("float32", "bfloat16", "float16")
TASK_OPTIONS = ("--tasks", "-t")  # lm_eval's spellings of the option egmla eval also builds


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 or more")
    return value


def document_limit(text: str) -> float:
    """lm-eval reads --limit as a fraction below 1 and as a count from 1 up: a count that is not whole would be cut
    to fewer documents than asked, and 0 or less to none (its errors then do not name --limit)."""
    value = float(text)
    if not (0 < value < 1 or (value >= 1 and value.is_integer())):
        raise argparse.ArgumentTypeError(f"{text}: give a fraction of each task in (0, 1), e.g. 0.1, or a whole "
                                         f"number of documents, e.g. 8")
    return value


EPILOG = """examples:
  egmla eval --run runs/latest                                   egmla_mc and egmla_ppl, no download
  egmla eval --run runs/latest --limit 0.25 --output-path results -- --log_samples --seed 1
                                                                 (lm_eval refuses --log_samples without an output path)
  egmla eval --run exported/egmla-hf --tasks piqa,arc_easy --dtype bfloat16 --device cuda --batch-size 32

It prints the command it runs (python -m egmla.hf.lm_eval_model ..., which runs the same by itself), then lm_eval's
table. --output-path DIR: lm_eval writes results_<time>.json (and samples) into a subfolder of DIR it names.
Exit status: 0 when lm_eval finished; 2 for an error egmla or lm_eval names (a missing task, a bad option); 1 for
any other failure, with its traceback."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    # the examples keep their lines; the options keep egmla's help format (defaults shown where useful)
    parser.formatter_class = type("EvalHelpFormatter", (argparse.RawDescriptionHelpFormatter, parser.formatter_class),
                                  {})
    parser.add_argument("--run", required=True, metavar="DIR",
                        help="run directory written by `egmla train`, or a folder from `egmla export --to hf`")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated lm-eval tasks or groups (default {LOCAL_TASKS}: egmla's own, no "
                             f"download; lm-eval's own, e.g. piqa,arc_easy,hellaswag, download from the Hugging Face "
                             f"hub). `-- --tasks ...` is taken instead of the default")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="checkpoint folder to evaluate (default: the run's latest valid checkpoint)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if there is one, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="the weights' dtype while evaluating")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="requests scored per forward")
    parser.add_argument("--decode-path", default=None,
                        help="decode path for generation tasks (egmla generate's --decode-path; default: the "
                             "fastest on the device)")
    parser.add_argument("--cache-dtype", default="auto", choices=["auto", "fp8", "fp8-keep-rope"],
                        help="the KV cache of generation tasks (egmla generate's --cache-dtype: auto = --dtype, fp8, "
                             "fp8-keep-rope); scoring tasks run whole forwards and keep no cache")
    parser.add_argument("--num-fewshot", type=non_negative_int, default=None,
                        help="few-shot examples per task (default: each task's own)")
    parser.add_argument("--limit", type=document_limit, default=None,
                        help="documents per task (a fraction if < 1): a quick look, not a score to report")
    parser.add_argument("--output-path", default=None, metavar="DIR",
                        help="write lm-eval's results JSON (and samples with -- --log_samples) under this folder")
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="-- LM_EVAL_ARGS",
                        help="after --, options passed to lm_eval unchanged (e.g. --log_samples, --seed, --gen_kwargs)")


def passed_through(args) -> list[str]:
    """The options after `--`, as given."""
    extra = list(args.lm_eval_args or [])
    return extra[1:] if extra[:1] == ["--"] else extra


def gives_tasks(extra: list[str]) -> bool:
    return any(word in TASK_OPTIONS or word.startswith("--tasks=") for word in extra)


def tasks_argv(args, extra: list[str]) -> list[str]:
    """egmla eval's --tasks for lm_eval, unless the tasks come after `--`: lm_eval adds a second --tasks to the
    first (egmla's default tasks would run too), so those given there are the only ones."""
    if not gives_tasks(extra):
        return ["--tasks", args.tasks or LOCAL_TASKS]
    if args.tasks is not None:
        raise ValueError(f"--tasks={args.tasks!r} and --tasks after --: lm_eval would run both lists; give the tasks "
                         f"once")
    return []


def default_device() -> str:
    """cuda if there is one, else cpu: said to lm_eval, whose own default (cuda:0) the model would otherwise move
    off with a warning on a machine without CUDA."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def eval_device(device: str | None) -> str:
    """--device for lm_eval, checked here: a bad one reached the loader, which called every checkpoint unusable in
    torch's words."""
    if device is None:
        return default_device()
    from egmla.infer.cli import resolve_device_dtype

    return str(resolve_device_dtype(device, "fp32")[0])


def lm_eval_argv(args) -> list[str]:
    """The lm_eval command line that `args` stands for."""
    if not Path(args.run).is_dir():
        raise ValueError(f"--run={args.run!r}: no such directory; pass a run directory written by `egmla train` or a "
                         f"folder written by `egmla export --to hf`")
    # model_args as a JSON object, which lm_eval takes as it is: its key=value form splits on ',' and '=', reads
    # quotes and brackets, and turns values that look like numbers or booleans (a run named 2024) into them
    model_args = {"pretrained": args.run, "dtype": args.dtype}  # lm-eval names its output folder after pretrained
    if args.checkpoint:
        model_args["checkpoint"] = args.checkpoint
    if args.decode_path:
        model_args["decode_path"] = args.decode_path
    if args.cache_dtype != "auto":
        model_args["cache_dtype"] = args.cache_dtype
    extra = passed_through(args)
    # batch size and device go as lm_eval's own options: it hands them to the model itself, and refuses them twice
    argv = ["--model", "egmla", "--model_args", json.dumps(model_args), *tasks_argv(args, extra),
            "--batch_size", str(args.batch_size), "--device", eval_device(args.device)]
    if args.num_fewshot is not None:
        argv += ["--num_fewshot", str(args.num_fewshot)]
    if args.limit is not None:
        argv += ["--limit", str(int(args.limit)) if args.limit >= 1 else str(args.limit)]
    if args.output_path:
        argv += ["--output_path", args.output_path]
    return argv + extra


def main(args) -> int:
    argv = lm_eval_argv(args)
    try:
        from egmla.hf.lm_eval_model import main as lm_eval_main
    except ModuleNotFoundError as err:
        if err.name not in ("lm_eval", "transformers"):
            raise
        raise SystemExit(f"egmla eval needs lm-evaluation-harness ({err.name} is not installed): "
                         f"pip install 'egmla[eval]'") from None
    # the command that runs the same by itself (plain `lm_eval` does not know the egmla model), quoted for a shell
    print(shlex.join([sys.executable, "-m", "egmla.hf.lm_eval_model", *argv]), flush=True)
    lm_eval_main(argv)
    return 0
