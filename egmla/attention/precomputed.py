"""What the decode paths precompute from the weights (gate tables, folded absorption, the bias control's folded
weights, the merged products' concatenated weights) goes stale when a source weight changes in place (an optimizer
step, load_state_dict) or is moved or replaced. `weights_key` identifies the sources' current values without reading
them, so a layer can rebuild what it precomputed before a cached call reads it; `derived` keeps one such tensor.
`ReadsWeights` says when the fast paths may read a layer's weights at all (its linears may have been wrapped)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def weights_key(*tensors: torch.Tensor) -> tuple:
    """Storage, in-place version, dtype and device of each tensor: equal keys, equal values."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def sources_key(owner: nn.Module, *tensors: torch.Tensor) -> tuple:
    """weights_key of `tensors`, plus the owner's `ReadsWeights.weight_swaps`: the key of what a layer precomputes."""
    return weights_key(*tensors) + ((getattr(owner, "weight_swaps", 0),),)


def derived(owner: nn.Module, name: str, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """owner's tensor `name`, built by `build()` without autograd the first time and again whenever `key` (the
    sources' `sources_key`, and whatever else picks the sources) differs from the key it was built under. A plain
    attribute, not a parameter or buffer: it is not saved in the state_dict, and `.to(...)` changes the sources' key,
    which builds it again where they went."""
    held = getattr(owner, name, None)
    if held is None or held[0] != key:
        with torch.no_grad():
            held = (key, build())
        setattr(owner, name, held)
    return held[1]


PLAIN_WEIGHT_MODULES = (nn.Linear, nn.Embedding)


class ReadsWeights(nn.Module):
    """A layer whose fast paths read the weights of its nn.Linear / nn.Embedding children directly (folded,
    concatenated, up-projected into a table, passed to a kernel) instead of calling the modules. That is exact only
    while each child is the plain torch module: one replaced by a module that computes something else with the same
    `.weight` (peft's LoRA layers, a quantized linear) is named in `wrapped_weights`, and then the layer calls its
    modules (training, the naive decode) and the model refuses decode paths that cannot (`Transformer.forward`).
    Every replacement also bumps `weight_swaps`, which is part of the key of everything precomputed: peft's merge
    writes the merged weight through `.data`, which no version counter sees, before putting the plain module back."""

    weight_swaps: int = 0  # children replaced since construction (peft wrapping or unloading, an offload)
    wrapped_weights: tuple[str, ...] = ()  # weight children that are not plain nn.Linear / nn.Embedding now

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if isinstance(value, nn.Module):
            state = self.__dict__  # not through __setattr__: these are bookkeeping, not modules or tensors
            slots = state.setdefault("weight_slots", set())
            if name in slots:
                state["weight_swaps"] = self.weight_swaps + 1
            elif type(value) in PLAIN_WEIGHT_MODULES:
                slots.add(name)
            state["wrapped_weights"] = tuple(n for n in sorted(slots) if not _plain(self._modules.get(n)))


def _plain(module) -> bool:
    """A plain nn.Linear / nn.Embedding, or one of egmla's exact stand-ins (the gate-table offload's row server)."""
    return type(module) in PLAIN_WEIGHT_MODULES or getattr(module, "exact_stand_in", False)
