"""What the decode paths precompute from the weights (gate tables, folded absorption, the bias control's folded
weights) goes stale when a source weight changes in place (an optimizer step, load_state_dict) or is moved or
replaced. `weights_key` identifies the sources' current values without reading them, so a layer can rebuild what it
precomputed before a cached call reads it."""
from __future__ import annotations

import torch


def weights_key(*tensors: torch.Tensor) -> tuple:
    """Storage, in-place version, dtype and device of each tensor: equal keys, equal values."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
