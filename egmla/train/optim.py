"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

No decay on norms, biases, the token embedding (tied to the output head) or EG-MLA's gate tables:
decaying a lookup table shrinks rows of rare tokens toward zero for no reason.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from egmla.train.config import TrainConfig


def no_decay(name: str, param: torch.Tensor) -> bool:
    return param.dim() < 2 or name.endswith(("tok_embeddings.weight", "gate_embed.weight", "output.weight"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                             betas=(config.beta1, config.beta2), eps=config.eps)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine, WSD or constant."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    final = config.lr * config.min_lr_ratio
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "wsd":  # warmup-stable-decay: flat, then a linear decay over the last steps
        decay_steps = max(1, round(config.decay_fraction * config.steps))
        decay_start = config.steps - decay_steps
        if step < decay_start:
            return config.lr
        return config.lr + (final - config.lr) * min(1.0, (step - decay_start + 1) / decay_steps)
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps + 1) / span)
    return final + (config.lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
