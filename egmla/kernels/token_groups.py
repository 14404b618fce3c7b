"""A decode step's token-groups append in one launch (reference: token_groups_ref.py).

The grouped decode and the bias controls' absorbed decode keep, per sequence, its distinct token ids and each
position's slot among them (`TokenGroups`, egmla/attention/cache.py). Registering one new token per sequence is
a search of the sequence's distinct ids and four scalar writes; in PyTorch, vectorised over the batch, that was
~30 small launches per step (comparisons, where, index and index_put), the same at batch 1 and 128. Here one
program per sequence walks its distinct ids in blocks (a few hundred to a few thousand int32) and writes the
slot, rank, count and lengths itself.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_IDS = 1024  # distinct ids compared per step of a program's walk


@triton.jit
def _append_one_kernel(ids_ptr, positions_ptr, n_new_ptr, distinct_ptr, n_distinct_ptr, slots_ptr, counts_ptr,
                       ranks_ptr, lengths_ptr, stride_i, stride_p, stride_n, stride_db, stride_sb, stride_cb,
                       stride_rb, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    token = tl.load(ids_ptr + row * stride_i).to(tl.int32)
    position = tl.load(positions_ptr + row * stride_p).to(tl.int64)
    valid = tl.load(n_new_ptr + row * stride_n) > 0
    n = tl.load(n_distinct_ptr + row)
    slot = n  # a new id takes the next slot
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        known = tl.load(distinct_ptr + row * stride_db + offs, mask=offs < n, other=0)
        first = tl.min(tl.where((known == token) & (offs < n), offs, n))
        slot = tl.minimum(slot, first)
    is_new = valid & (slot == n)
    tl.store(distinct_ptr + row * stride_db + n, token, mask=is_new)
    tl.store(n_distinct_ptr + row, n + 1, mask=is_new)
    tl.store(slots_ptr + row * stride_sb + position, slot.to(tl.int32), mask=valid)
    count = tl.load(counts_ptr + row * stride_cb + slot, mask=valid, other=0)
    tl.store(ranks_ptr + row * stride_rb + position, count, mask=valid)
    tl.store(counts_ptr + row * stride_cb + slot, count + 1, mask=valid)
    tl.store(lengths_ptr + row, tl.load(lengths_ptr + row) + 1, mask=valid)


def append_one(distinct_ids: torch.Tensor, n_distinct: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor,
               ranks: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
               n_new: torch.Tensor) -> None:
    """`append_one_ref` in one launch, in place: distinct_ids, slots, counts, ranks [batch, max_len] int32 (rows of
    any stride, contiguous within a row); n_distinct, lengths [batch] int64, contiguous; ids, positions, n_new [batch]
    integers (any stride). No host sync; CUDA-graph capturable."""
    batch = ids.shape[0]
    for name, tensor in (("distinct_ids", distinct_ids), ("slots", slots), ("counts", counts), ("ranks", ranks)):
        if tensor.dtype != torch.int32 or tensor.dim() != 2 or tensor.shape[0] != batch or tensor.stride(1) != 1:
            raise ValueError(f"append_one: {name} {tuple(tensor.shape)} {tensor.dtype}, stride {tensor.stride()}: "
                             f"expected [{batch}, max_len] int32 with contiguous rows")
    for name, tensor in (("n_distinct", n_distinct), ("lengths", lengths)):
        if tensor.dtype != torch.int64 or tuple(tensor.shape) != (batch,) or tensor.stride(0) != 1:
            raise ValueError(f"append_one: {name} {tuple(tensor.shape)} {tensor.dtype}: expected [{batch}] int64, "
                             f"contiguous")
    for name, tensor in (("positions", positions), ("n_new", n_new)):
        if tuple(tensor.shape) != (batch,):
            raise ValueError(f"append_one: {name}.shape={tuple(tensor.shape)}, expected ({batch},) like ids")
    if batch == 0:
        return
    _append_one_kernel[(batch,)](
        ids, positions, n_new, distinct_ids, n_distinct, slots, counts, ranks, lengths, ids.stride(0),
        positions.stride(0), n_new.stride(0), distinct_ids.stride(0), slots.stride(0), counts.stride(0),
        ranks.stride(0), BLOCK=BLOCK_IDS, num_warps=4)
