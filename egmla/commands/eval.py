"""`egmla eval --run DIR`: lm-evaluation-harness on a run (or an exported folder), egmla's model registered.

    egmla eval --run runs/latest                                 # egmla's two local tasks, no download
    egmla eval --run runs/latest --tasks piqa,arc_easy --dtype bfloat16 --device cuda --batch-size 32
    egmla eval --run runs/latest --limit 8 -- --log_samples --seed 1   # anything after -- goes to lm_eval as is

It is `python -m egmla.hf.lm_eval_model --model egmla --model_args run=DIR,...` with egmla's defaults (the local
tasks egmla_mc and egmla_ppl, the device the run would generate on); lm_eval's own options pass through after `--`.
"""
from __future__ import annotations

import argparse

LOCAL_TASKS = "egmla_mc,egmla_ppl"
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR",
                        help="run directory written by `egmla train`, or a folder from `egmla export --to hf`")
    parser.add_argument("--tasks", default=LOCAL_TASKS,
                        help="comma-separated lm-eval tasks or groups (egmla's egmla_mc and egmla_ppl need no "
                             "download; lm-eval's own, e.g. piqa,arc_easy,hellaswag, download from the Hugging Face hub)")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="checkpoint folder to evaluate; None = the run's latest valid checkpoint")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; None = cuda if there is one, else cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="the weights' dtype while evaluating")
    parser.add_argument("--batch-size", type=int, default=8, help="requests scored per forward")
    parser.add_argument("--decode-path", default=None,
                        help="decode path for generation tasks (egmla generate's --decode-path); None = the fastest "
                             "on the device")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task; None = each "
                        "task's own default")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task (a fraction if < 1): a quick look, not a score to report")
    parser.add_argument("--output-path", default=None, metavar="DIR",
                        help="write lm-eval's results JSON (and samples with -- --log_samples) under this folder")
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="-- LM_EVAL_ARGS",
                        help="after --, options passed to lm_eval unchanged (e.g. --log_samples, --seed, --gen_kwargs)")


def lm_eval_argv(args) -> list[str]:
    """The lm_eval command line that `args` stands for."""
    # batch size and device go as lm_eval's own options: it hands them to the model itself, and refuses them twice
    model_args = [f"run={args.run}", f"dtype={args.dtype}"]
    if args.checkpoint:
        model_args.append(f"checkpoint={args.checkpoint}")
    if args.decode_path:
        model_args.append(f"decode_path={args.decode_path}")
    for value, name in ((args.run, "--run"), (args.checkpoint, "--checkpoint"), (args.decode_path, "--decode-path")):
        if value and ("," in value or "=" in value):  # lm-eval splits model_args on ',' and '='
            raise ValueError(f"{name}={value!r}: lm-eval cannot pass a value holding ',' or '='; rename or link it")
    argv = ["--model", "egmla", "--model_args", ",".join(model_args), "--tasks", args.tasks,
            "--batch_size", str(args.batch_size)]
    if args.device:
        argv += ["--device", args.device]
    if args.num_fewshot is not None:
        argv += ["--num_fewshot", str(args.num_fewshot)]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    if args.output_path:
        argv += ["--output_path", args.output_path]
    extra = list(args.lm_eval_args or [])
    return argv + (extra[1:] if extra[:1] == ["--"] else extra)


def main(args) -> int:
    argv = lm_eval_argv(args)
    try:
        from egmla.hf.lm_eval_model import main as lm_eval_main
    except ModuleNotFoundError as err:
        if err.name not in ("lm_eval", "transformers"):
            raise
        raise SystemExit(f"egmla eval needs lm-evaluation-harness ({err.name} is not installed): "
                         f"pip install 'egmla[eval]'") from None
    print("lm_eval " + " ".join(argv), flush=True)
    lm_eval_main(argv)
    return 0
