"""What autograd keeps from a forward for its backward, for the tests of the memory savers (recomputed blocks, the
chunked loss, transformers' activation checkpointing)."""
import torch


def saved_for_backward(fn) -> list[torch.Tensor]:
    """The tensors (parameters excluded) autograd saves while fn() runs its forward."""
    saved = []

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return saved


def kept_bytes(fn) -> int:
    return sum(t.numel() * t.element_size() for t in saved_for_backward(fn))
