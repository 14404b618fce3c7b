"""`egmla export --run DIR --to hf|deepseek OUT`: a run as a Hugging Face folder."""
import argparse

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR", help="run directory written by `egmla train`")
    parser.add_argument("--to", required=True, choices=("hf", "deepseek"),
                        help="hf: EgmlaForCausalLM (any variant; load after `import egmla.hf`, or with trust_remote_code=True "
                             "where egmla is installed); "
                             "deepseek: transformers' DeepseekV3ForCausalLM (MLA runs only; no egmla code needed)")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty)")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="checkpoint folder to export (default: the run's latest valid checkpoint)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="cast the weights (default: keep the checkpoint's dtype)")


def main(args) -> int:
    import torch

    from egmla.hf.export import export_deepseek, export_hf
    from egmla.runs import StorageError, storage_problem

    dtype = getattr(torch, args.dtype) if args.dtype else None
    export = export_hf if args.to == "hf" else export_deepseek
    try:
        out = export(args.run, args.out, checkpoint=args.checkpoint, dtype=dtype)
    except Exception as err:  # a full disk: one line (the half-written folder is already removed)
        reason = storage_problem(err)
        if reason is None:
            raise
        raise StorageError(f"{reason} (exporting to {args.out}); nothing was written there") from None
    needs = ("import egmla.hf first, or pass trust_remote_code=True" if args.to == "hf"
             else "transformers' DeepseekV3ForCausalLM, no egmla needed")
    print(f"exported {args.run} -> {out}; load with AutoModelForCausalLM.from_pretrained({str(out)!r}) ({needs})")
    return 0
