"""A capturable one-token decode step's context in one launch (reference: decode_context_ref.py).

Every layer of the engine's CUDA-graph step reads the same few per-row tensors: the new token's position, the row
index of the cache writes, the decode kernels' lengths and the RoPE angles at the position; the cache also records
the token id. Built in PyTorch that is ~8 launches per step (arange, add, clamp, arange, index_put, two gathers,
add), each a few µs inside a graph whatever the batch; here one program per sequence writes them all.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from egmla.kernels import block


@triton.jit
def _decode_context_kernel(lengths_ptr, tokens_ptr, token_ids_ptr, cos_table_ptr, sin_table_ptr, positions_ptr,
                           rows_ptr, decode_lengths_ptr, cos_ptr, sin_ptr, stride_tok, stride_ids, stride_table,
                           max_len, HALF: tl.constexpr, BLOCK: tl.constexpr, HAS_IDS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    position = tl.minimum(tl.load(lengths_ptr + row), max_len - 1)
    tl.store(positions_ptr + row, position)
    tl.store(rows_ptr + row, row)
    tl.store(decode_lengths_ptr + row, position + 1)
    if HAS_IDS:
        token = tl.load(tokens_ptr + row * stride_tok)
        tl.store(token_ids_ptr + row * stride_ids + position, token.to(token_ids_ptr.dtype.element_ty))
    offs = tl.arange(0, BLOCK)
    live = offs < HALF
    cos = tl.load(cos_table_ptr + position * stride_table + offs, mask=live).to(tl.float32)
    sin = tl.load(sin_table_ptr + position * stride_table + offs, mask=live).to(tl.float32)
    tl.store(cos_ptr + row * HALF + offs, cos, mask=live)
    tl.store(sin_ptr + row * HALF + offs, sin, mask=live)


def decode_context(lengths: torch.Tensor, tokens: torch.Tensor, token_ids: torch.Tensor | None,
                   rope_cos: torch.Tensor, rope_sin: torch.Tensor, max_len: int) -> tuple[torch.Tensor, ...]:
    """`decode_context_ref` in one launch: lengths [batch] int64 (contiguous), tokens [batch, 1], token_ids [batch,
    max_len] (contiguous rows) or None, rope tables [>= max_len, half] with contiguous rows (fp32, or a 16-bit
    float that fp32 holds exactly). No host sync; CUDA-graph capturable."""
    batch = tokens.shape[0]
    if tuple(tokens.shape) != (batch, 1) or tuple(lengths.shape) != (batch,) or lengths.stride(0) != 1:
        raise ValueError(f"decode_context: tokens {tuple(tokens.shape)} and lengths {tuple(lengths.shape)}: expected "
                         f"[batch, 1] and [batch] (contiguous), one new token per sequence")
    if rope_cos.shape != rope_sin.shape or rope_cos.stride() != rope_sin.stride() or rope_cos.stride(1) != 1 \
            or rope_cos.shape[0] < max_len or rope_cos.dtype == torch.float64:
        raise ValueError(f"decode_context: rope tables {tuple(rope_cos.shape)} / {tuple(rope_sin.shape)} "
                         f"({rope_cos.dtype}): expected two alike [>= {max_len}, half] tables, contiguous rows, "
                         f"fp32 or 16-bit")
    if token_ids is not None and (token_ids.shape[0] != batch or token_ids.shape[1] < max_len
                                  or token_ids.stride(1) != 1):
        raise ValueError(f"decode_context: token_ids {tuple(token_ids.shape)}: expected [{batch}, >= {max_len}] with "
                         f"contiguous rows")
    device, half = lengths.device, rope_cos.shape[1]
    positions = torch.empty(batch, 1, dtype=torch.long, device=device)
    rows = torch.empty(batch, 1, dtype=torch.long, device=device)
    decode_lengths = torch.empty(batch, dtype=torch.long, device=device)
    cos = torch.empty(batch, 1, half, dtype=torch.float32, device=device)
    sin = torch.empty_like(cos)
    if batch:
        ids = token_ids if token_ids is not None else positions  # (unread without ids)
        _decode_context_kernel[(batch,)](
            lengths, tokens, ids, rope_cos, rope_sin, positions, rows, decode_lengths, cos, sin, tokens.stride(0),
            ids.stride(0), rope_cos.stride(0), max_len, HALF=half, BLOCK=block(half),
            HAS_IDS=token_ids is not None, num_warps=1)
    return positions, rows, decode_lengths, cos, sin
