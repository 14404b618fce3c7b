"""What an fp8 KV cache costs a trained model: next-token loss on held-out text, decoded through the cache one token at a
time (teacher forcing), with the cache in the model's dtype and in fp8, beside the full forward without a cache.

    python docs/bench/fp8_cache_cpu/fp8_loss.py RUN_DIR [--windows 32] [--length 256] [--prompt 16] [--path naive]
        [--device cpu] [--dtype fp32]        # on a GPU: --device cuda --dtype bf16 --path kernel

RUN_DIR: a run of `egmla train` (any variant). The held-out text is the run's own
validation split (its data config and tokenizer, prepared as training did). Each window's first --prompt tokens are
prefilled into the cache (attending over their own unrounded K/V); every later token is one decode step over the cache,
scored on the token after it. Prints the mean loss per scored token of each, and the fp8 cache's difference from the
cache in the model's dtype with its standard error over windows (the keys say fp32, the dtype of the runs committed
here; with --dtype they mean the cache in that dtype, which the result records), and the range of the values an fp8
cache rounds (`fp8_range`: whether a scale would help)."""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F


def decoded_loss(model, tokens: torch.Tensor, prompt: int, cache_dtype) -> tuple[torch.Tensor, object]:
    """Per window: the mean next-token loss of positions prompt .. length-2, each predicted by a decode step; and the
    cache it filled."""
    batch, length = tokens.shape
    cache = model.new_cache(batch, max_len=length, dtype=cache_dtype)
    logits = model(tokens[:, :prompt], cache)[:, -1]
    losses = []
    for t in range(prompt, length):
        losses.append(F.cross_entropy(logits.float(), tokens[:, t], reduction="none"))
        if t + 1 < length:
            logits = model(tokens[:, t:t + 1], cache)[:, 0]
    return torch.stack(losses, 1).mean(1), cache


def fp8_range(cache) -> dict[str, dict[str, float]]:
    """Per cached tensor an fp8 cache would round (a spec dtype of None, e.g. `latent`, `k_rope`), over every layer
    of a cache held in the model's dtype: the largest |value|, the share past +-448 (saturated in fp8), the share of
    nonzero values below e4m3's smallest normal 2**-6 (fewer than 3 mantissa bits there), and the relative error
    of the rounding, ||fp8(x) - x|| / ||x||. Says whether a scale (per tensor or per token) would buy anything."""
    from egmla.attention.cache import FP8, FP8_MAX, quantize

    values: dict[str, list[torch.Tensor]] = {}
    for layer in cache.layers:
        for name, buffer in layer.buffers.items():
            if buffer.dtype == cache.dtype and buffer.is_floating_point():
                values.setdefault(name, []).append(buffer.float().flatten())
    out = {}
    for name, parts in values.items():
        x = torch.cat(parts)
        x = x[x != 0]  # unfilled positions are zeros
        rounded = quantize(x, FP8).float()
        out[name] = {"max_abs": x.abs().max().item(), "share_saturated": (x.abs() > FP8_MAX).float().mean().item(),
                     "share_subnormal": (x.abs() < 2.0 ** -6).float().mean().item(),
                     "rounding_rel_error": ((rounded - x).norm() / x.norm()).item()}
    return out


def main() -> None:
    from egmla.attention.cache import FP8
    from egmla.data.shards import prepare_shards
    from egmla.runs import load_model, load_tokenizer, read_run_config
    from egmla.train.config import RunConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--path", default="naive", help="the decode path (on a CPU the PyTorch paths)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="the model's (and the "
                        "cache's, where not fp8) dtype")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, meta = load_model(args.run, dtype=dtype, device=args.device)
    model.set_decode_path(args.path)
    run = RunConfig.from_dict(read_run_config(args.run))
    tokens = prepare_shards(run.data, load_tokenizer(args.run), progress=False, log=lambda *_: None).tokens("val")
    count = min(args.windows, len(tokens) // args.length)
    windows = torch.as_tensor(tokens[: count * args.length].astype("int64")).view(count, args.length).to(args.device)
    full = F.cross_entropy(model(windows)[:, args.prompt - 1:-1].flatten(0, 1).float(),
                           windows[:, args.prompt:].flatten(), reduction="none").view(count, -1).mean(1)
    native, native_cache = decoded_loss(model, windows, args.prompt, None)
    fp8, _ = decoded_loss(model, windows, args.prompt, FP8)
    diff = fp8 - native
    device = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else args.device
    result = {"run": args.run, "variant": model.config.variant_name(), "path": args.path, "device": device,
              "dtype": args.dtype, "windows": count,
              "length": args.length, "prompt": args.prompt, "scored_tokens": count * (args.length - args.prompt),
              "loss_full_forward": full.mean().item(), "loss_cache_fp32": native.mean().item(),
              "loss_cache_fp8": fp8.mean().item(), "fp8_minus_fp32": diff.mean().item(),
              "fp8_minus_fp32_stderr": (diff.std() / math.sqrt(count)).item(),
              "fp32_cache_minus_full_forward": (native - full).mean().item(),
              "fp8_range": fp8_range(native_cache)}
    for key, value in result.items():
        if key == "fp8_range":
            for name, stats in value.items():
                print(f"range {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()))
        else:
            print(f"{key}: {value:.6f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
