"""What an fp8 KV cache costs a trained model: next-token loss on held-out text decoded through the cache one token at
a time (teacher forcing), with the cache in the model's dtype and in fp8, beside the full forward without a cache; and
the range of the values the fp8 cache rounds, which says whether a scale would help.

    egmla bench fp8-loss --run RUN [--path auto] [--windows 32] [--length 256] [--prompt 16] [--json out.json]
    egmla bench fp8-loss --report a.json b.json ... [--markdown table.md]     # the table of result files

Held-out text: the run's own validation split (its data config and tokenizer, prepared as training did), or --text
FILE tokenized by the run's tokenizer. Each window's first --prompt tokens are prefilled into the cache (attending over
their own unrounded K/V, as generation does); every later token is one decode step over the cache, scored on the token
after it. Reported: the mean loss per scored token of each, the fp8 cache's difference from the cache in the model's
dtype with its standard error over windows, the KL divergence KL(model's dtype || fp8) of the two caches' predicted
distributions and how often their most likely tokens agree (per position, as llama.cpp reports for quantized models;
the two caches decode in lockstep), and per cached tensor the fp8 cache rounds (`latent`, `k_rope`, MHA's `k` and
`v`) the largest |value|, the share past +-448 (saturated), the share of nonzero values below e4m3's smallest normal
2**-6, and the rounding's relative error ||fp8(x) - x|| / ||x||, over every layer of the cache in the model's dtype.
Measured: docs/bench/fp8_loss_h100 and fp8_loss_h100_longer (paper-base on an H100), docs/bench/fp8_cache_cpu (tiny
models on a CPU).
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="a run directory of `egmla train` (any variant) or an `egmla export --to hf` folder "
                                 "(then --text)")
    p.add_argument("--text", metavar="FILE", help="held-out text to score (UTF-8), tokenized by the run's tokenizer; "
                                                 "default: the run's validation split")
    p.add_argument("--path", default="auto", help="the decode path; auto = what generation takes for --windows "
                                                  "sequences of --length on this device (on a CPU the model's default)")
    p.add_argument("--windows", type=int, default=32, help="windows of held-out text, decoded as one batch")
    p.add_argument("--length", type=int, default=256, help="tokens per window")
    p.add_argument("--prompt", type=int, default=16, help="tokens of each window prefilled before decoding; the "
                                                          "rest are decoded one at a time and scored")
    p.add_argument("--cache-dtype", default="fp8", choices=["fp8", "fp8-keep-rope"],
                   help="the cache compared with one in the model's dtype: fp8 (every tensor) or fp8-keep-rope (the "
                        "RoPE keys kept in the model's dtype), as `egmla generate --cache-dtype` keeps them")
    p.add_argument("--fp8-tensors", default="", metavar="NAMES",
                   help="with --cache-dtype fp8: round only these cached tensors to fp8, comma-separated (latent, "
                        "k_rope; MHA's k, v), the rest kept in the model's dtype: which tensor's rounding costs what; "
                        "default: every tensor, the fp8 cache generation keeps")
    p.add_argument("--device", default="auto", help="cpu, cuda, ...; auto = cuda if available")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the model's (and the cache's, where not fp8) dtype; auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write the result as JSON here")
    p.add_argument("--report", nargs="+", metavar="JSON", help="measure nothing: the table of these result files, "
                                                             "one row each (docs/bench/fp8_loss_h100)")
    p.add_argument("--markdown", metavar="PATH", help="with --report: also write the table here")


def report_table(metas: list[dict], names: list[str]) -> str:
    """One row per result file (named `names`, linked as given): the losses, the fp8 cache's difference, the two
    caches' KL and top-1 agreement where the file has them (files from before 2026-12-07's KL do not), and the largest
    |value| of each tensor it rounds where the file has `fp8_range`."""
    lines = ["| model, path | device, dtype | scored tokens | full forward | cache in the model's dtype | cache in fp8 "
             "| fp8 − model's dtype (± s.e.) | KL(model's dtype ‖ fp8) (± s.e.) | same top-1 token "
             "| largest \\|value\\| rounded | file |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for meta, name in zip(metas, names):
        ranges = ", ".join(f"{tensor} {stats['max_abs']:.3g}" for tensor, stats in meta.get("fp8_range", {}).items())
        kl, same = "", ""
        if "kl_native_fp8" in meta:
            kl = f"{meta['kl_native_fp8']:.3g} ± {meta['kl_native_fp8_stderr']:.2g}"  # spans orders of magnitude
            same = f"{meta['top1_agreement']:.2%}"
        only = meta.get("fp8_tensors", "all")
        only = "" if only == "all" else f", fp8 {' and '.join(only)} only"
        only += ", fp8-keep-rope" if meta.get("cache_dtype") == "fp8-keep-rope" else ""
        lines.append(f"| {meta['variant']}, `{meta['path']}`{only} | {meta['device']}, {meta['dtype']} | "
                     f"{meta['scored_tokens']:,} | {meta['loss_full_forward']:.6f} | {meta['loss_cache_native']:.6f} | "
                     f"{meta['loss_cache_fp8']:.6f} | {meta['fp8_minus_native']:+.5f} ± "
                     f"{meta['fp8_minus_native_stderr']:.5f} | {kl} | {same} | {ranges} | "
                     f"[{name.rsplit('/', 1)[-1]}]({name}) |")
    return "\n".join(lines) + "\n"


def decode_through_both(model, tokens: torch.Tensor, prompt: int, cache_dtype, fp8_tensors=()) -> dict:
    """The windows decoded in lockstep through a cache in the model's dtype and one in `cache_dtype` (or, given
    fp8_tensors, one in the model's dtype with only those tensors in fp8): each position prompt .. length-1 predicted
    by a decode step (the first by the prefill). Per window, means over those positions: each cache's next-token loss,
    KL(model's dtype || the other) of the two predicted distributions, and how often their most likely tokens agree;
    and the two caches filled."""
    batch, length = tokens.shape
    caches = [model.new_cache(batch, max_len=length),
              model.new_cache(batch, max_len=length, fp8_tensors=fp8_tensors) if fp8_tensors
              else model.new_cache(batch, max_len=length, dtype=cache_dtype)]
    logits = [model(tokens[:, :prompt], cache)[:, -1] for cache in caches]
    losses, kl, agree = ([], []), [], []
    for t in range(prompt, length):
        native, other = (torch.log_softmax(step.float(), -1) for step in logits)
        for loss, logp in zip(losses, (native, other)):
            loss.append(-logp.gather(1, tokens[:, t:t + 1])[:, 0])
        kl.append((native.exp() * (native - other)).sum(-1))
        agree.append((native.argmax(-1) == other.argmax(-1)).float())
        if t + 1 < length:
            logits = [model(tokens[:, t:t + 1], cache)[:, 0] for cache in caches]
    mean = lambda values: torch.stack(values, 1).mean(1)  # noqa: E731
    return {"native": mean(losses[0]), "other": mean(losses[1]), "kl": mean(kl), "top1_agreement": mean(agree),
            "caches": caches}


def fp8_range(cache, fp8_cache) -> dict[str, dict[str, float]]:
    """Per cached tensor that `fp8_cache` stores in fp8, over every layer of `cache` (the same model's, in its dtype):
    max |x|, the share past +-448, the share of nonzero |x| < 2**-6, and ||fp8(x) - x|| / ||x||. Unfilled positions
    are zeros and are left out."""
    from egmla.attention.cache import FP8, FP8_MAX, quantize

    values: dict[str, list[torch.Tensor]] = {}
    for layer, fp8_layer in zip(cache.layers, fp8_cache.layers):
        for name in sorted(fp8_layer.fp8):
            values.setdefault(name, []).append(layer.buffers[name].float().flatten())
    out = {}
    for name, parts in values.items():
        x = torch.cat(parts)
        x = x[x != 0]
        if x.numel() == 0:
            continue
        rounded = quantize(x, FP8).float()
        out[name] = {"max_abs": x.abs().max().item(), "share_saturated": (x.abs() > FP8_MAX).float().mean().item(),
                     "share_subnormal": (x.abs() < 2.0 ** -6).float().mean().item(),
                     "rounding_rel_error": ((rounded - x).norm() / x.norm()).item()}
    return out


def held_out_tokens(args, needed: int) -> torch.Tensor:
    """The first `needed` tokens (or fewer, where there are fewer) of the run's validation split, or of --text
    tokenized by the run's tokenizer."""
    from egmla.runs import load_tokenizer, read_run_config

    tokenizer = load_tokenizer(args.run)
    if args.text:
        try:
            with open(args.text, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--text {args.text}: cannot be read as UTF-8 text ({error.__class__.__name__}: "
                             f"{error}); give a text file") from None
        return torch.tensor(tokenizer.encode(text).ids[:needed], dtype=torch.long)
    from egmla.data.shards import prepare_shards
    from egmla.train.config import RunConfig

    from egmla.hf.export import is_hf_export

    if is_hf_export(args.run):
        raise ValueError(f"--run {args.run}: a Hugging Face export, which keeps no data config, so there is no "
                         f"validation split to score; pass held-out text with --text FILE")
    config = read_run_config(args.run)
    if "data" not in config:
        raise ValueError(f"--run {args.run}: its config.json has no data section (not written by `egmla train`), so "
                         f"there is no validation split to score; pass held-out text with --text FILE")
    data = RunConfig.from_dict(config).data
    split = prepare_shards(data, tokenizer, progress=False, log=lambda *_: None).tokens("val")
    return torch.as_tensor(split[:needed].astype("int64"))


def measure(args) -> dict:
    from egmla.attention import fastest_decode_path
    from egmla.attention.cache import FP8
    from egmla.infer.cli import resolve_device_dtype
    from egmla.runs import load_model

    for option in ("windows", "length", "prompt"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option} {getattr(args, option)}: must be >= 1")
    if args.prompt >= args.length:
        raise ValueError(f"--prompt {args.prompt}: must be below --length {args.length}, so that some tokens are "
                         f"decoded through the cache")
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model, _ = load_model(args.run, dtype=dtype, device=device)
    if args.length > model.config.max_seq_len:
        raise ValueError(f"--length {args.length}: longer than the model's max_seq_len {model.config.max_seq_len}; "
                         f"use --length {model.config.max_seq_len} or less")
    path = args.path
    if path == "auto":
        path = (fastest_decode_path(model.config, device, args.windows, args.length) if device.type == "cuda"
                else model.decode_path)
    model.set_decode_path(model.usable_decode_path(path))
    fp8_tensors = tuple(name.strip() for name in args.fp8_tensors.split(",") if name.strip())
    if fp8_tensors and args.cache_dtype != "fp8":
        raise ValueError(f"--fp8-tensors {args.fp8_tensors} with --cache-dtype {args.cache_dtype}: --fp8-tensors names "
                         f"the tensors rounded itself; give one or the other")
    if fp8_tensors:
        model.new_cache(1, max_len=1, fp8_tensors=fp8_tensors)  # unknown names: the error names this cache's tensors
    tokens = held_out_tokens(args, args.windows * args.length)
    count = min(args.windows, len(tokens) // args.length)
    if count < 2:
        raise ValueError(f"--length {args.length}: the held-out text has {len(tokens)} tokens, {count} window(s); at "
                         f"least 2 are needed for a standard error: give more text or a smaller --length")
    windows = tokens[: count * args.length].to(device).view(count, args.length)
    with torch.no_grad():
        full = F.cross_entropy(model(windows)[:, args.prompt - 1:-1].flatten(0, 1).float(),
                               windows[:, args.prompt:].flatten(), reduction="none").view(count, -1).mean(1)
        decoded = decode_through_both(model, windows, args.prompt, FP8 if args.cache_dtype == "fp8" else args.cache_dtype,
                                      fp8_tensors)
        ranges = fp8_range(*decoded["caches"])
    native, fp8, kl, agree = decoded["native"], decoded["other"], decoded["kl"], decoded["top1_agreement"]
    diff = fp8 - native
    stderr = lambda values: (values.std() / math.sqrt(count)).item()  # noqa: E731
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return {"run": str(args.run), "variant": model.config.variant_name(), "path": model.decode_path,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": dtype_name,
            "windows": count, "length": args.length, "prompt": args.prompt, "fp8_tensors": list(fp8_tensors) or "all",
            "cache_dtype": args.cache_dtype,
            "scored_tokens": count * (args.length - args.prompt),
            "loss_full_forward": full.mean().item(), "loss_cache_native": native.mean().item(),
            "loss_cache_fp8": fp8.mean().item(), "fp8_minus_native": diff.mean().item(),
            "fp8_minus_native_stderr": stderr(diff),
            "kl_native_fp8": kl.mean().item(), "kl_native_fp8_stderr": stderr(kl),
            "top1_agreement": agree.mean().item(), "top1_agreement_stderr": stderr(agree),
            "native_cache_minus_full_forward": (native - full).mean().item(), "fp8_range": ranges}


def main(args) -> int:
    if args.report:
        from egmla.bench.generate import write_table
        from egmla.bench.options import read_result

        return write_table(report_table([read_result(path, "--report") for path in args.report], args.report),
                           args.markdown)
    if not args.run:
        raise ValueError("--run: missing; name a run directory of `egmla train` to measure (or --report result "
                         "files to tabulate)")
    result = measure(args)
    only = "" if result["fp8_tensors"] == "all" else f" (fp8: {', '.join(result['fp8_tensors'])} only)"
    only += " (fp8-keep-rope: the RoPE keys in the model's dtype)" if result["cache_dtype"] == "fp8-keep-rope" else ""
    print(f"{result['variant']}, path {result['path']}, {result['device']}, {result['dtype']}: {result['windows']} "
          f"windows of {result['length']} tokens, {result['scored_tokens']:,} scored{only}")
    print(f"loss per token: full forward {result['loss_full_forward']:.6f}, cache in {result['dtype']} "
          f"{result['loss_cache_native']:.6f}, cache in fp8 {result['loss_cache_fp8']:.6f}")
    print(f"fp8 - {result['dtype']}: {result['fp8_minus_native']:+.6f} +- {result['fp8_minus_native_stderr']:.6f} "
          f"nats per token (standard error over windows)")
    print(f"KL({result['dtype']} || fp8) of the predicted distributions: {result['kl_native_fp8']:.3g} +- "
          f"{result['kl_native_fp8_stderr']:.2g} nats per token; most likely token the same at "
          f"{result['top1_agreement']:.2%} +- {result['top1_agreement_stderr']:.2%} of the positions")
    for name, stats in result["fp8_range"].items():
        print(f"{name}: max |x| {stats['max_abs']:.3g}, saturated {stats['share_saturated']:.2%}, below 2**-6 "
              f"{stats['share_subnormal']:.2%}, rounding error {stats['rounding_rel_error']:.2%} of the norm")
    if args.json_path:
        with open(args.json_path, "w") as file:
            json.dump(result, file, indent=2)
    return 0
