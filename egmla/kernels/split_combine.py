"""Flash-decoding plumbing shared by the decode kernels: how many context splits, and the combine.

A decode step has one query token per sequence, so the (batch x heads) grid alone leaves most of
the GPU idle at small batch. Each sequence's context is cut into `num_splits` contiguous pieces;
each program returns an unnormalised partial output with its running max m (log2 domain) and
softmax denominator l, and `combine_splits` merges them:

    out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s,    M = max_s m_s

optionally followed by a per-head affine (EG-MLA's LayerNorm gamma/beta of the value slice; beta only where some
split had positions, so that a sequence with none gets 0).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from egmla.kernels.pdl import launch_flags, wait as pdl_wait

MAX_SPLITS = 64


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch: int, programs_per_split: int, max_len: int, block_t: int,
                      device: torch.device, min_tiles_per_split: int = 4, waves: int = 4) -> int:
    """Enough programs for `waves` programs per multiprocessor, each split at least a few tiles long."""
    if device.type != "cuda":
        return max(1, min(2, triton.cdiv(max_len, block_t)))  # interpreter: exercise the combine cheaply
    target = waves * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    splits = triton.cdiv(target, batch * programs_per_split)
    return max(1, min(splits, triton.cdiv(max_len, block_t * min_tiles_per_split), MAX_SPLITS))


@triton.jit
def split_range(length, split, num_splits, BLOCK_T: tl.constexpr):
    """[start, end) of this program's piece of a sequence of `length` cached positions."""
    split_len = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_T) * BLOCK_T
    start = split * split_len
    return start, tl.minimum(start + split_len, length)



@triton.jit
def _combine_kernel(part_acc_ptr, part_ml_ptr, out_ptr, weight_ptr, bias_ptr,
                    num_splits, n_heads, stride_ob, stride_oh, affine_head_stride, affine_offset,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)  # the partials come from the kernel right before
    head = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements at large batch
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < D
    rows = (batch * num_splits + offs_s) * n_heads + head  # [batch, split, head] row index
    m = tl.load(part_ml_ptr + rows * 2, mask=s_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + rows * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: weights 0, output 0
    w = tl.exp2(m - m_max)
    acc = tl.load(part_acc_ptr + rows[:, None] * D + offs_d[None, :],
                  mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(acc * w[:, None], axis=0)
    denom = tl.sum(l * w, axis=0)
    y = tl.where(denom > 0, total / tl.where(denom > 0, denom, 1.0), 0.0)  # no 0/0, even discarded
    affine = head * affine_head_stride + affine_offset + offs_d
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + affine, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:  # only where the softmax had positions: a sequence with none gets 0
        y = y + tl.where(denom > 0, tl.load(bias_ptr + affine, mask=d_mask, other=0.0).to(tl.float32), 0.0)
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + offs_d, y.to(out_ptr.dtype.element_ty), mask=d_mask)


def partial_buffers(batch: int, num_splits: int, n_heads: int, dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split partials: acc [batch, splits, heads, dim] fp32 and (m, l) [batch, splits, heads, 2]."""
    return (torch.empty(batch, num_splits, n_heads, dim, dtype=torch.float32, device=device),
            torch.empty(batch, num_splits, n_heads, 2, dtype=torch.float32, device=device))


def combine_splits(part_acc: torch.Tensor, part_ml: torch.Tensor, out: torch.Tensor,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   affine_head_stride: int = 0, affine_offset: int = 0) -> torch.Tensor:
    """Merge partials into out [batch, heads, dim]; out[b, h] *= weight[h*stride + offset + d] (+ bias)."""
    batch, num_splits, n_heads, dim = part_acc.shape
    _combine_kernel[(n_heads, batch)](
        part_acc, part_ml, out, weight if weight is not None else part_acc, bias if bias is not None else part_acc,
        num_splits, n_heads, out.stride(0), out.stride(1), affine_head_stride, affine_offset,
        D=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, num_warps=2, **launch_flags(out.device))
    return out


_FIRST_FIT: dict[tuple, int] = {}


def launch_first_fitting(key: tuple, configs: list, launch):
    """launch(config) with the first of `configs` whose compiled kernel fits the device (shared memory,
    registers); the index that fits is remembered per `key` (dtype and shapes), so later calls go straight to it."""
    from triton.runtime.errors import OutOfResources

    for index in range(_FIRST_FIT.get(key, 0), len(configs)):
        try:
            result = launch(configs[index])
        except OutOfResources:
            if index == len(configs) - 1:
                raise
            continue
        _FIRST_FIT[key] = index
        return result
