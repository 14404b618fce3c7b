"""Triton decode-attention kernels, each beside its plain PyTorch reference (`*_ref.py`).

    mla_decode.py      MLA absorbed decode (also EG-MLA with gate placement `latent`)
    egmla_decode.py    EG-MLA fused decode (placement `up`): K/V rebuilt on chip, never in HBM
    grouped_decode.py  EG-MLA decode grouped by token id (three launches); studies/ holds four one-launch
                       forms of it, each exact and measured slower (not the model's path)
    bias_decode.py     the bias control's absorbed decode (MLA's, plus per-id terms)
    rope.py, decode_elementwise.py, latent_append.py, kv_append.py
                       the decode step's small launches fused (RoPE; add + RMSNorm and SwiGLU's activation; MLA's
                       cache append with its norm, RoPE, the query's RoPE and EG-MLA's norm statistics; MHA / GQA's
                       with both rotations), used where no gradient is wanted on a GPU
    decode_context.py, token_groups.py
                       a CUDA-graph decode step's context (positions, lengths, RoPE angles, token-id write) and its
                       token-groups append, one launch each
    row_adam.py        lazy Adam on the touched rows of the gate tables (training)
    split_combine.py   flash-decoding split heuristic and the cross-split combine

Importing this package does not import Triton; the kernel modules do. `kernel_unavailable_reason`
says why a kernel cannot run on a device, so callers fall back to the reference with one warning.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from contextlib import contextmanager

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


def no_grad_kernel_can_run(x: torch.Tensor) -> bool:
    """Whether a forward-only kernel (no backward) may replace PyTorch ops on x: a GPU tensor, no gradient wanted
    (decode, evaluation), not inside torch.compile (whose own fused kernels cover the same ops), Triton able to run.
    Only CUDA: in the CPU interpreter these small kernels would be slower, so the CPU tests call them directly."""
    if not x.is_cuda or (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
        return False
    return kernel_unavailable_reason(x.device) is None


def rows(x: torch.Tensor) -> torch.Tensor:
    """x itself where its last dim is contiguous (the kernels take the other strides as arguments), else a
    contiguous copy: a query sliced per head out of a projection ([batch, heads, d] with a head stride wider
    than d) reaches the kernel without the copy kernel `.contiguous()` would launch for it, every layer."""
    return x if x.stride(-1) == 1 else x.contiguous()


# Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may start while the kernel
# before it in the stream finishes, so its launch and its independent loads (weights) overlap that kernel's tail.
# Every kernel launched so calls `pdl.wait` (kernels/pdl.py) before it reads anything the previous kernel may write
# and before it writes anything, and lets its own dependents start only after that wait: so when a kernel starts
# early, every kernel but the one right before it has finished. The split-KV decode kernels (mla, egmla, gqa), their
# combine and the statistics pass use it; the grouped and bias-control launches measured slower with it and do not
# (docs/kernels.md, "Programmatic dependent launch").
_pdl_setting: bool | None = None  # None: EGMLA_PDL (default on) where the GPU supports it


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_enabled(device: torch.device | str) -> bool:
    """Whether the decode kernels launch with PDL on `device`: an NVIDIA GPU of compute capability >= 9, and neither
    EGMLA_PDL=0 nor `pdl_setting(False)`. (ROCm devices are "cuda" to torch too; Triton's AMD backend has no PDL.)"""
    device = torch.device(device)
    if device.type != "cuda" or interpreting() or torch.version.hip is not None:
        return False
    wanted = _pdl_setting if _pdl_setting is not None else os.environ.get("EGMLA_PDL", "1") not in ("", "0")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return wanted and _capability_major(index) >= 9


@contextmanager
def pdl_setting(enabled: bool | None):
    """Launch the decode kernels with (True) or without (False) PDL inside the block, e.g. to time both in one
    run; None restores the default. Kernels captured in a CUDA graph keep the setting of their capture."""
    global _pdl_setting
    before, _pdl_setting = _pdl_setting, enabled
    try:
        yield
    finally:
        _pdl_setting = before


GROUPED_CHUNK = 16  # positions per attend program of the grouped decode (its plan's block_t; grouped_decode.CHUNK)


def grouped_workspace_bytes(heads: int, d_c: int, d_v: int, context: int, distinct_ids: int, item: int,
                            chunk: int = GROUPED_CHUNK) -> int:
    """Bytes per sequence that the grouped decode allocates for one decode step beside the cache (kept here, free
    of Triton, for the memory planner): the step's plan (grouped order, slot offsets, row maps, int32) and one
    layer's buffers (absorbed queries per distinct id and value sums per row, heads x d_c each in the model's dtype
    of `item` bytes, over an fp8 cache too; per-chunk softmax statistics, fp32). tests/kernels/test_grouped_decode.py checks it against
    what make_plan and grouped_decode really allocate."""
    chunks = -(-context // chunk)
    rows = distinct_ids + chunks
    plan = 4 * (3 * context + 2 * rows) + 3 * 8  # order, its slots, offsets; row -> chunk, row -> id; summary
    layer = (max(distinct_ids, 1) + rows) * heads * block(d_c) * item  # absorbed queries, value sums
    layer += chunks * 3 * block(heads) * 4  # chunk statistics
    layer += heads * (2 * 4 + d_v * 4)  # q sums; fp32 output sums (split up-projection)
    return plan + layer


def computes_like(cache_tensor: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The tensor whose dtype a decode kernel computes in and writes its output in: the cache's own, or over an fp8
    cache (float8_e4m3fn) the query's, the model's dtype (the kernel widens each tile as it reads it)."""
    return query if cache_tensor.dtype == torch.float8_e4m3fn else cache_tensor


__all__ = ["GROUPED_CHUNK", "block", "computes_like", "grouped_workspace_bytes", "interpreting",
           "kernel_unavailable_reason", "pdl_enabled", "pdl_setting", "triton_available", "warn_fallback_once"]

