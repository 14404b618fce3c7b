"""Lazy Adam on the touched rows of a table: the plain PyTorch reference of row_adam.py.

A row is touched when any element of its gradient is non-zero (NaN counts as touched). A touched row's
moments and weights take exactly torch.optim.Adam's step (torch.optim.adam._multi_tensor_adam's order of
operations); an untouched row, its moments included, is left as it is. No weight decay (the tables have none).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def row_adam_ref(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 lr: float, beta1: float, beta2: float, eps: float, step: int) -> int:
    """Update the touched rows of param / exp_avg / exp_avg_sq [rows, cols] in place for Adam step `step`
    (1-based, for the bias corrections); returns how many rows were touched."""
    rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
    g = grad.index_select(0, rows)
    avg, sq, p = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows), param.index_select(0, rows)
    avg.lerp_(g, 1 - beta1)
    sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    p.addcdiv_(avg, denom, value=-lr / (1 - beta1 ** step))
    exp_avg.index_copy_(0, rows, avg)
    exp_avg_sq.index_copy_(0, rows, sq)
    param.index_copy_(0, rows, p)
    return rows.numel()
