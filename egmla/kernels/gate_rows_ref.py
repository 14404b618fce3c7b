"""Claiming device rows for token ids and copying their gate-table rows: the plain PyTorch reference of gate_rows.py.

The offload (egmla.infer.offload) keeps each layer's gate tables in host memory and a device cache of the rows of the
ids seen so far. For each id of `ids` not yet resident, in order of first occurrence: mark it resident, give it the
next free row (n_resident, then n_resident + 1, ...) and copy its row of every host table to that row of the table's
device rows. An id past `capacity` is marked and counted but gets no row (the caller checks n_resident <= capacity).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def claim_gate_rows_ref(ids: torch.Tensor, resident: torch.Tensor, slot_of_id: torch.Tensor, n_resident: torch.Tensor,
                        capacity: int, host_tables: list[torch.Tensor], device_rows: list[torch.Tensor]) -> None:
    """ids: any shape, int64; resident [vocab] int32 (1 = has a row), slot_of_id [vocab] int64, n_resident [1] int32:
    updated in place, as are device_rows (each [capacity, width] beside its host table [vocab, width])."""
    count = int(n_resident[0])
    for token_id in ids.flatten().tolist():
        if int(resident[token_id]):
            continue
        resident[token_id] = 1
        slot, count = count, count + 1
        if slot < capacity:
            slot_of_id[token_id] = slot
            for host, rows in zip(host_tables, device_rows):
                rows[slot] = host[token_id].to(rows.device)
    n_resident[0] = count
