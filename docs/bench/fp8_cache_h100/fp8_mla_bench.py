"""Scratch A/B (not project code): MLA decode kernel over a bf16 cache, an fp8 cache (the committed kernel), and an
fp8 cache through variants _v1 (fp16 dots), _v2 (widened through fp32 by a runtime multiply), _v3."""
import sys
import torch
sys.path.insert(0, ".gpujobs")
import mla_variants as mv
from egmla.bench.decode import cuda_median_us
from egmla.kernels.mla_decode import mla_decode, LOG2E
from egmla.kernels.split_combine import choose_num_splits, partial_buffers, combine_splits
from egmla.kernels.pdl import launch_flags
from egmla.attention.cache import quantize, FP8

def variant(fn, q, qp, lat, kr, lengths, scale, tile=64, warps=4, stages=3):
    batch, heads, d_c = q.shape
    max_len = lat.shape[1]
    splits = choose_num_splits(batch, 1, max_len, tile, lat.device)
    acc, ml = partial_buffers(batch, splits, heads, d_c, lat.device)
    out = torch.empty(batch, heads, d_c, dtype=q.dtype, device=q.device)
    fn[(splits, batch)](q, qp, lat, kr, lengths, out, acc, ml, q.stride(0), q.stride(1), qp.stride(0), qp.stride(1),
        lat.stride(0), lat.stride(1), kr.stride(0), kr.stride(1), out.stride(0), out.stride(1), max_len, splits,
        scale * LOG2E, N_HEADS=heads, D_C=64, D_R=64, BLOCK_H=16, BLOCK_C=64, BLOCK_R=64, BLOCK_T=tile,
        DOT_PRECISION="tf32", ONE_SPLIT=False, num_warps=warps, num_stages=stages, **launch_flags(lat.device))
    combine_splits(acc, ml, out)
    return out

print("| B | T | kernel | tile | warps | stages | us |")
for B, T in ((128, 16384), (1024, 4096), (128, 2048)):
    torch.manual_seed(0)
    q = torch.randn(B, 12, 64, device="cuda", dtype=torch.bfloat16); qp = torch.randn(B, 12, 64, device="cuda", dtype=torch.bfloat16)
    lat8 = quantize(torch.randn(B, T, 64, device="cuda"), FP8); kr8 = quantize(torch.randn(B, T, 64, device="cuda"), FP8)
    lengths = torch.full((B,), T, device="cuda")
    for name in ("_v1", "_v2"):
        for tile, warps, stages in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 8, 3), (128, 4, 4), (256, 8, 3)):
            try:
                us = cuda_median_us(lambda: variant(getattr(mv, name), q, qp, lat8, kr8, lengths, 0.1, tile, warps, stages), 10, 60)
            except Exception as e:
                us = float("nan")
            print(f"| {B} | {T} | {name} | {tile} | {warps} | {stages} | {us:.1f} |", flush=True)
