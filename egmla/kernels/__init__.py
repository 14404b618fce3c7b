"""Triton decode-attention kernels, each beside its plain PyTorch reference (`*_ref.py`).

    mla_decode.py      MLA absorbed decode (also EG-MLA with gate placement `latent`)
    egmla_decode.py    EG-MLA fused decode (placement `up`): K/V rebuilt on chip, never in HBM
    grouped_decode.py  EG-MLA decode grouped by token id (three launches); grouped_fused.py in one launch
    bias_decode.py     the bias control's absorbed decode (MLA's, plus per-id terms)
    row_adam.py        lazy Adam on the touched rows of the gate tables (training)
    split_combine.py   flash-decoding split heuristic and the cross-split combine

Importing this package does not import Triton; the kernel modules do. `kernel_unavailable_reason`
says why a kernel cannot run on a device, so callers fall back to the reference with one warning.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

_warned: set[str] = set()


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_unavailable_reason(device: torch.device | str) -> str | None:
    """None if the Triton kernels can run on tensors of `device`, else a one-line reason."""
    if not triton_available():
        return "Triton is not installed (pip install 'egmla[triton]', Linux only)"
    if torch.device(device).type == "cuda":
        return None
    if interpreting():
        return None  # CPU tensors through Triton's interpreter: slow, for tests
    return (f"tensors are on {torch.device(device).type}, not CUDA (set TRITON_INTERPRET=1 before starting "
            f"Python to run the kernels in Triton's slow CPU interpreter)")


def warn_fallback_once(what: str, reason: str) -> None:
    """Warn once per (what, reason) that a kernel path falls back to its PyTorch reference."""
    key = what + reason
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{what}: using the PyTorch reference instead of the Triton kernel: {reason}",
                      RuntimeWarning, stacklevel=3)


def block(dim: int) -> int:
    """Smallest power of two >= dim and >= 16 (tl.dot needs every dimension >= 16): the kernels' tile widths."""
    return max(16, 1 << (dim - 1).bit_length())


GROUPED_CHUNK = 16  # positions per attend program of the grouped decode (its plan's block_t; grouped_decode.CHUNK)


def grouped_workspace_bytes(heads: int, d_c: int, d_v: int, context: int, distinct_ids: int, item: int,
                            chunk: int = GROUPED_CHUNK) -> int:
    """Bytes per sequence that the grouped decode allocates for one decode step beside the cache (kept here, free
    of Triton, for the memory planner): the step's plan (grouped order, slot offsets, row maps, int32) and one
    layer's buffers (absorbed queries per distinct id and value sums per row, heads x d_c each in the cache dtype
    of `item` bytes; per-chunk softmax statistics, fp32). tests/kernels/test_grouped_decode.py checks it against
    what make_plan and grouped_decode really allocate."""
    chunks = -(-context // chunk)
    rows = distinct_ids + chunks
    plan = 4 * (3 * context + 2 * rows) + 3 * 8  # order, its slots, offsets; row -> chunk, row -> id; summary
    layer = (max(distinct_ids, 1) + rows) * heads * block(d_c) * item  # absorbed queries, value sums
    layer += chunks * 3 * block(heads) * 4  # chunk statistics
    layer += heads * (2 * 4 + d_v * 4)  # q sums; fp32 output sums (split up-projection)
    return plan + layer


__all__ = ["GROUPED_CHUNK", "block", "grouped_workspace_bytes", "interpreting", "kernel_unavailable_reason",
           "triton_available", "warn_fallback_once"]
