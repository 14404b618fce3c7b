"""Lazy Adam on the touched rows of EG-MLA's gate tables, one launch per table (reference: row_adam_ref.py).

A gate table is [vocab, d_e] and a batch touches a few thousand of its rows, but its gradient is dense (the
embedding backward, DDP and clipping see a plain tensor). Each program reads the gradient of a few rows; only
the touched ones (a non-zero gradient) read and write weights and moments. The bytes moved are
the gradient once (4 B per element) plus 28 B per element of touched rows, where dense AdamW moves 28 B per
element of every row, and there is no gather, scatter or host sync (the gather path's row counts).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 4


@triton.jit
def _row_adam_kernel(param_ptr, grad_ptr, avg_ptr, sq_ptr, n_rows, n_cols, lr_step, beta1, beta2, eps, bias2_sqrt,
                     ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """ROWS rows per program as one [ROWS, BLOCK_C] tile: the gradient is read whole, weights and moments only
    under the touched rows' mask (masked lanes move no memory), so every load is in flight at once rather than
    one branch per row."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    g = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    touched = tl.sum((g != 0).to(tl.int32), axis=1) > 0  # g != 0 holds for NaN: a NaN row counts as touched
    live = inside & touched[:, None]
    avg = tl.load(avg_ptr + offs, mask=live, other=0.0).to(tl.float32)
    sq = tl.load(sq_ptr + offs, mask=live, other=0.0).to(tl.float32)
    p = tl.load(param_ptr + offs, mask=live, other=0.0).to(tl.float32)
    avg = avg + (1 - beta1) * (g - avg)
    sq = sq * beta2 + (1 - beta2) * g * g
    p = p - lr_step * (avg / (tl.sqrt(sq) / bias2_sqrt + eps))
    tl.store(avg_ptr + offs, avg.to(avg_ptr.dtype.element_ty), mask=live)
    tl.store(sq_ptr + offs, sq.to(sq_ptr.dtype.element_ty), mask=live)
    tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=live)


def row_adam_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              lr: float, beta1: float, beta2: float, eps: float, step: int) -> None:
    """`row_adam_ref`'s update in one launch: param / grad / exp_avg / exp_avg_sq are [rows, cols], contiguous,
    on one device; step is 1-based."""
    tensors = dict(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    for name, tensor in tensors.items():
        if tensor.dim() != 2 or tensor.shape != param.shape or not tensor.is_contiguous():
            raise ValueError(f"row_adam_: {name} must be a contiguous [rows, cols] tensor of param's shape "
                             f"{tuple(param.shape)}; got {tuple(tensor.shape)}, contiguous={tensor.is_contiguous()}")
    if step < 1:
        raise ValueError(f"row_adam_: step={step}; the bias corrections need the 1-based step count")
    n_rows, n_cols = param.shape
    if n_rows == 0:
        return
    _row_adam_kernel[(triton.cdiv(n_rows, ROWS_PER_PROGRAM),)](
        param, grad, exp_avg, exp_avg_sq, n_rows, n_cols, lr / (1 - beta1 ** step), beta1, beta2, eps,
        (1 - beta2 ** step) ** 0.5, ROWS=ROWS_PER_PROGRAM, BLOCK_C=triton.next_power_of_2(n_cols), num_warps=4)
