"""Plain PyTorch reference of the decode-context kernel (egmla/kernels/decode_context.py): what a capturable
one-token decode step (the generation engine's CUDA-graph step) builds once for every layer, in the ops the model
runs otherwise (`Transformer._cached_context`):

    positions[b, 0] = min(lengths[b], max_len - 1)     (a full row that appends nothing stays inside the cache)
    rows[b, 0] = b;  decode_lengths[b] = positions[b, 0] + 1
    token_ids[b, positions[b, 0]] = tokens[b, 0]       (the cache's token ids, where it keeps them)
    cos[b, 0], sin[b, 0] = rope_cos[positions[b, 0]], rope_sin[positions[b, 0]]   (in fp32)
"""
from __future__ import annotations

import torch


def decode_context_ref(lengths: torch.Tensor, tokens: torch.Tensor, token_ids: torch.Tensor | None,
                       rope_cos: torch.Tensor, rope_sin: torch.Tensor, max_len: int) -> tuple[torch.Tensor, ...]:
    """(positions [batch, 1], rows [batch, 1], decode_lengths [batch], cos, sin [batch, 1, half] fp32) from lengths
    [batch] and tokens [batch, 1]; writes token_ids [batch, max_len] in place if given."""
    positions = (lengths[:, None] + torch.arange(1, device=lengths.device)).clamp(max=max_len - 1)
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
    if token_ids is not None:
        token_ids[rows, positions] = tokens.to(token_ids.dtype)
    cos, sin = rope_cos[positions].float(), rope_sin[positions].float()
    return positions, rows, positions[:, 0] + 1, cos, sin
