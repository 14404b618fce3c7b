"""The training loss: mean token cross-entropy of the output head, whole or over chunks of tokens.

Whole (the default): the model's logits [batch, seq, vocab], then their cross-entropy in fp32 (`cross_entropy`;
under torch.compile two fused passes over the bf16 logits). Autograd keeps the logits for the backward: at
paper-base, 16 x 1024 tokens x 32K vocab is 1 GB in bf16, and the backward's fp32 gradient of them another 2 GB.

Chunked (train.loss_chunk_tokens = N): the model stops at its final norm (`return_hidden=True`) and
`linear_cross_entropy` applies the output head N tokens at a time, computing each chunk's loss and its gradients
with respect to the hidden states and the head's weight at once (the gradient of a softmax cross-entropy is
softmax - one-hot, known in the forward), so only one chunk's logits exist at any time and the backward only
scales the kept gradients. Same FLOPs as the whole form (three GEMMs per chunk), nothing recomputed; the price is
the [tokens, d_model] and [vocab, d_model] gradients held from forward to backward, and a host loop over chunks.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from egmla.train.distributed import unwrap

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: targets of this value (padding) count for nothing


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy in fp32 of logits [batch, seq, vocab] (bf16 under autocast)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


@functools.cache
def compiled_cross_entropy():
    """cross_entropy under torch.compile: the fp32 upcast and the log-softmax (and their backward) fuse into
    passes over the bf16 logits instead of materialising fp32 copies of a [tokens, vocab] tensor (2 GB per
    16 x 1024 batch at 32K vocab). Built on first use (importing the compiler costs seconds)."""
    return torch.compile(cross_entropy)


def chunk_loss_and_gradient(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits [tokens, vocab] and targets [tokens]: the summed cross-entropy (fp32) and its gradient with
    respect to the logits, softmax - one-hot, in the logits' dtype. The softmax is taken in fp32. A target of
    IGNORE_INDEX adds nothing to either, as in F.cross_entropy."""
    counted = (targets != IGNORE_INDEX)[:, None]
    targets = targets[:, None].where(counted, 0)  # an index gather can take; the row is zeroed below
    logits32 = logits.float()
    log_norm = logits32.logsumexp(-1, keepdim=True)
    loss = (log_norm - logits32.gather(-1, targets)).where(counted, 0).sum()
    gradient = (logits32 - log_norm).exp_()
    gradient.scatter_add_(-1, targets, gradient.new_full(targets.shape, -1.0))
    return loss, gradient.where(counted, 0).to(logits.dtype)


@functools.cache
def compiled_chunk_loss_and_gradient():
    """chunk_loss_and_gradient under torch.compile: one fused pass over a chunk's logits instead of ~5 eager ones."""
    return torch.compile(chunk_loss_and_gradient, dynamic=False)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden [tokens, d_model] @ weight[vocab, d_model]^T, chunk by chunk; the gradients
    are computed in the forward and scaled by the upstream gradient in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, compute_dtype: torch.dtype, compiled: bool):
        step = compiled_chunk_loss_and_gradient() if compiled else chunk_loss_and_gradient
        head = weight.to(compute_dtype)  # under autocast: the one bf16 copy of the head, as F.linear would cast it
        # only the gradients autograd will ask for: a frozen head would otherwise hold an fp32 [vocab, d_model]
        wants_hidden, wants_weight = ctx.needs_input_grad[:2]
        hidden_grad = torch.empty(hidden.shape, dtype=compute_dtype, device=hidden.device) if wants_hidden else None
        weight_grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_weight else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk = hidden[start:start + chunk_tokens].to(compute_dtype)
            chunk_loss, logits_grad = step(chunk @ head.T, targets[start:start + chunk_tokens])
            loss += chunk_loss
            if wants_hidden:
                hidden_grad[start:start + chunk_tokens] = logits_grad @ head
            if wants_weight:
                weight_grad += (logits_grad.T @ chunk).float()  # summed over chunks in fp32
        ctx.save_for_backward(hidden_grad, weight_grad)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    @once_differentiable  # the gradients were formed in the forward: no graph to differentiate again
    def backward(ctx, loss_grad):
        hidden_grad, weight_grad = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((hidden_grad * loss_grad).to(hidden_dtype) if ctx.needs_input_grad[0] else None,
                (weight_grad * loss_grad).to(weight_dtype) if ctx.needs_input_grad[1] else None,
                None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                         reduction: str = "mean", compiled: bool = False) -> torch.Tensor:
    """cross_entropy(F.linear(hidden, weight), targets) for hidden [..., d_model], weight [vocab, d_model],
    targets [...], without ever holding more than chunk_tokens rows of logits. The matmuls run in autocast's dtype
    where autocast is on (as F.linear would), the softmax in fp32. Targets of IGNORE_INDEX (-100) count for nothing
    and 'mean' averages over the others, as F.cross_entropy does. Reference: `cross_entropy` of the full logits."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: linear_cross_entropy takes 'mean' or 'sum'")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be positive (tokens per chunk of logits)")
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    with torch.autocast(device, enabled=False):  # the dtypes are set here, as autocast would set them
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            total = LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, compute_dtype, compiled)
        else:  # validation: the loss alone, no gradients formed
            head = weight.to(compute_dtype)
            total = sum((cross_entropy(hidden[start:start + chunk_tokens, None].to(compute_dtype) @ head.T,
                                       targets[start:start + chunk_tokens, None], "sum")
                         for start in range(0, hidden.shape[0], chunk_tokens)),
                        torch.zeros((), device=hidden.device))  # a tensor for no tokens too
    return total / (targets != IGNORE_INDEX).sum() if reduction == "mean" else total


def token_loss(model, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
               compiled: bool = False, chunk_tokens: int = 0) -> torch.Tensor:
    """The model's cross-entropy on (inputs, targets) [batch, seq]: whole logits, or chunk_tokens at a time."""
    if not chunk_tokens:
        logits = model(inputs)
        return (compiled_cross_entropy() if compiled else cross_entropy)(logits, targets, reduction)
    hidden = model(inputs, return_hidden=True)
    return linear_cross_entropy(hidden, unwrap(model).output.weight, targets, chunk_tokens, reduction, compiled)
