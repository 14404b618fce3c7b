"""Plain PyTorch reference of the token-groups append kernel (egmla/kernels/token_groups.py): a decode step registers
one token per sequence in the cache's `TokenGroups` (egmla/attention/cache.py, docs/grouped-decode.md), in place,
vectorised over the batch with no host sync:

    slot  = the index of ids[b] among distinct_ids[b, :n_distinct[b]], or n_distinct[b] (a new id, appended there)
    slots[b, positions[b]] = slot;  ranks[b, positions[b]] = counts[b, slot];  counts[b, slot] += 1;  lengths[b] += 1

for the rows with n_new[b] > 0; a row with n_new[b] = 0 (padding, a finished sequence) changes nothing.
"""
from __future__ import annotations

import torch


def append_one_ref(distinct_ids: torch.Tensor, n_distinct: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor,
                   ranks: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
                   n_new: torch.Tensor) -> None:
    """distinct_ids, slots, counts, ranks [batch, max_len] int32; n_distinct, lengths [batch] int64; ids, positions,
    n_new [batch] (any integer dtype)."""
    valid = n_new > 0
    ids = ids.to(torch.int32)
    known = torch.arange(distinct_ids.shape[1], device=ids.device)[None, :] < n_distinct[:, None]
    match = (distinct_ids == ids[:, None]) & known
    found = match.any(dim=1)
    slot = torch.where(found, match.int().argmax(dim=1), n_distinct)
    rows = torch.arange(ids.shape[0], device=ids.device)
    is_new = valid & ~found
    new_slot = torch.where(is_new, n_distinct, torch.zeros_like(n_distinct))
    distinct_ids[rows, new_slot] = torch.where(is_new, ids, distinct_ids[rows, new_slot])
    n_distinct += is_new.long()
    write_at = torch.where(valid, positions, torch.zeros_like(positions))
    slots[rows, write_at] = torch.where(valid, slot.to(torch.int32), slots[rows, write_at])
    slot = torch.where(valid, slot, torch.zeros_like(slot))  # a row that appends nothing touches nothing
    count = counts[rows, slot]
    ranks[rows, write_at] = torch.where(valid, count, ranks[rows, write_at])
    counts[rows, slot] = count + valid.int()
    lengths += valid.long()
