"""Activation checkpointing (train.activation_checkpointing = N): every Nth block keeps only its input for the
backward and runs its forward again there, instead of keeping every intermediate (the attention's projections, the
gate and its LayerNorm, the MLP's 4x-wide activations) from forward to backward.

Applied from outside the model, as torchtitan does, by replacing each chosen block's `forward` with a
`torch.utils.checkpoint` call of it (the non-reentrant form, which torch.compile and FSDP2 take): parameter names,
state dicts and checkpoints stay exactly those of the plain model. Apply before torch.compile and before
parallelize, so the compiled function and the FSDP2 hooks wrap the recomputing forward.
"""
from __future__ import annotations

import functools
import weakref
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def recompute_blocks(model: nn.Module, every: int, checkpoint_function: Callable | None = None) -> list[int]:
    """Make blocks 0, every, 2*every, ... of model.layers recompute their forward in the backward, and the others
    keep theirs (every = 0: none recompute, as the plain model); returns the recomputing blocks' indices.
    checkpoint_function(forward, *args) runs a block: default `torch.utils.checkpoint.checkpoint`, non-reentrant,
    without saving the RNG state (the forward has no randomness); transformers passes its own. A block recomputes
    only in a training forward with grad enabled; in eval or under no_grad it runs its plain forward."""
    if every < 0:
        raise ValueError(f"train.activation_checkpointing={every}: must be >= 0 (0 = off, N = every Nth block)")
    run = checkpoint_function or functools.partial(checkpoint, use_reentrant=False, preserve_rng_state=False)
    chosen = list(range(0, len(model.layers), every)) if every else []
    for index, block in enumerate(model.layers):
        block.__dict__.pop("forward", None)  # the class's forward again
        if index in chosen:
            # the block through a weak reference: a partial of its own bound forward, kept in its own __dict__, would
            # be a reference cycle, and a deleted model's memory would wait for the garbage collector
            block.forward = functools.partial(_recomputed, run, type(block).forward, weakref.ref(block))
    return chosen


def _recomputed(run: Callable, forward: Callable, block: weakref.ref, *args, **kwargs):
    module = block()
    # only a training forward that records a graph has a backward to recompute for: in eval or under no_grad the block
    # runs as is (as transformers' GradientCheckpointingLayer gates it), where a reentrant checkpoint warned that no
    # input requires grad
    if module.training and torch.is_grad_enabled():
        return run(functools.partial(forward, module), *args, **kwargs)
    return forward(module, *args, **kwargs)
