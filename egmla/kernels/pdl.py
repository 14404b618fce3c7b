"""Programmatic dependent launch for the decode kernels (the rule they follow: egmla/kernels/__init__.py).

    flags = pdl.launch_flags(device)         # {'PDL': bool[, 'launch_pdl': True]} for kernel[grid](..., **flags)
    ...independent loads...                  # in the kernel: nothing the previous kernel writes
    pdl.wait(PDL)                            # the previous kernel has finished and its writes are visible;
                                             # the next kernel may now start
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from egmla.kernels import pdl_enabled


def launch_flags(device: torch.device | str) -> dict:
    """The PDL constexpr of one launch on `device`, and the launch option where it is on (only then: a Triton backend
    without PDL does not take the option at all)."""
    enabled = pdl_enabled(device)
    return {"PDL": enabled, "launch_pdl": True} if enabled else {"PDL": False}


@triton.jit
def wait(PDL: tl.constexpr):
    """Wait for the previous kernel in the stream (a no-op without PDL), then let the next one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
