"""What the decode paths precompute from the weights (gate tables, folded absorption, the bias control's folded
weights, the merged products' concatenated weights) goes stale when a source weight changes in place (an optimizer
step, load_state_dict) or is moved or replaced. `weights_key` identifies the sources' current values without reading
them, so a layer can rebuild what it precomputed before a cached call reads it; `derived` keeps one such tensor."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def weights_key(*tensors: torch.Tensor) -> tuple:
    """Storage, in-place version, dtype and device of each tensor: equal keys, equal values."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def derived(owner: nn.Module, name: str, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """owner's tensor `name`, built by `build()` without autograd the first time and again whenever `key` (the
    sources' weights_key, and whatever else picks the sources) differs from the key it was built under. A plain
    attribute, not a parameter or buffer: it is not saved in the state_dict, and `.to(...)` changes the sources' key,
    which builds it again where they went."""
    held = getattr(owner, name, None)
    if held is None or held[0] != key:
        with torch.no_grad():
            held = (key, build())
        setattr(owner, name, held)
    return held[1]
