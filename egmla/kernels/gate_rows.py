"""Claiming device rows for token ids and copying their gate-table rows from host memory, with no host sync
(reference: gate_rows_ref.py).

The offload (egmla.infer.offload) serves each EG-MLA layer's gate rows from a device cache of the ids seen so far.
Finding the new ids of a step on the host costs a device-to-host sync per step and cannot be replayed from a CUDA
graph; these two launches do it on the device, so a decode step with offloaded tables is captured like any other:

    claim: one program per id: an atomic compare-and-swap on resident[id] picks one program per new id, which takes
           the next free row (an atomic add on n_resident) and records it in slot_of_id
    copy:  one program per (id, table): a program whose id was claimed copies the id's row of that table from host
           memory (pinned, read through unified addressing) into the row it got

Rows come in the order the atomics give them, not in order of first occurrence as in the reference: which row an id
gets differs, the rows served for every id do not. The tables are copied as 16-bit words, so any dtype goes and one
launch serves every table (their addresses are read from a small device tensor, `GateRowTables`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _claim_kernel(ids_ptr, resident_ptr, slot_of_id_ptr, n_resident_ptr, claimed_ptr, capacity):
    pid = tl.program_id(0)
    token_id = tl.load(ids_ptr + pid)
    slot = token_id * 0 - 1  # int64: no row to copy
    if tl.atomic_cas(resident_ptr + token_id, 0, 1) == 0:  # this program is the one that saw the id first
        taken = tl.atomic_add(n_resident_ptr, 1).to(tl.int64)
        if taken < capacity:  # past capacity the id is counted (the caller checks) but gets no row
            tl.store(slot_of_id_ptr + token_id, taken)
            slot = taken
    tl.store(claimed_ptr + pid, slot)


@triton.jit
def _copy_kernel(ids_ptr, claimed_ptr, src_ptr, dst_ptr, words_ptr, BLOCK: tl.constexpr):
    pid, table = tl.program_id(0), tl.program_id(1)
    slot = tl.load(claimed_ptr + pid)
    if slot >= 0:
        token_id = tl.load(ids_ptr + pid)
        words = tl.load(words_ptr + table)  # 16-bit words per row
        src = tl.load(src_ptr + table).to(tl.pointer_type(tl.int16)) + token_id * words
        dst = tl.load(dst_ptr + table).to(tl.pointer_type(tl.int16)) + slot * words
        for start in range(0, words, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < words
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@dataclass
class GateRowTables:
    """Where the copy launch reads and writes: each host table's address, its device rows' address and its row size
    in 16-bit words (int64 tensors on the device, rewritten in place when the rows move, so a captured launch that
    reads them stays valid as long as the rows do)."""
    src: torch.Tensor
    dst: torch.Tensor
    words: torch.Tensor
    block: int

    @classmethod
    def build(cls, host_tables: list[torch.Tensor], device_rows: list[torch.Tensor]) -> "GateRowTables":
        device = device_rows[0].device
        words = [_row_words(t) for t in host_tables]
        for host, rows, w in zip(host_tables, device_rows, words):
            if rows.dtype != host.dtype or _row_words(rows) != w or not rows.is_contiguous():
                raise ValueError(f"device rows {tuple(rows.shape)} {rows.dtype} do not match their host table "
                                 f"{tuple(host.shape)} {host.dtype} (contiguous, same width and dtype)")
        return cls(torch.tensor([t.data_ptr() for t in host_tables], dtype=torch.int64, device=device),
                   torch.tensor([r.data_ptr() for r in device_rows], dtype=torch.int64, device=device),
                   torch.tensor(words, dtype=torch.int64, device=device),
                   min(triton.next_power_of_2(max(words)), 4096))

    def moved(self, device_rows: list[torch.Tensor]) -> None:
        """The device rows were reallocated: point the copy at the new ones (in place)."""
        self.dst.copy_(torch.tensor([r.data_ptr() for r in device_rows], dtype=torch.int64))


def _row_words(table: torch.Tensor) -> int:
    if not table.is_contiguous() or (table.shape[1] * table.element_size()) % 2:
        raise ValueError(f"a gate table of {tuple(table.shape)} {table.dtype}: must be contiguous with rows of an even "
                         f"number of bytes")
    return table.shape[1] * table.element_size() // 2


def claim_gate_rows(ids: torch.Tensor, resident: torch.Tensor, slot_of_id: torch.Tensor, n_resident: torch.Tensor,
                    capacity: int, tables: GateRowTables) -> None:
    """claim_gate_rows_ref's effect (rows in the atomics' order) in two launches, no host sync: ids any shape int64
    on the device; resident [vocab] int32, slot_of_id [vocab] int64, n_resident [1] int32 updated in place; the rows
    of `tables` written. Host tables must be readable by the device (pinned memory on CUDA)."""
    # the kernels read ids[pid]: a strided view (a column of a [batch, seq] tensor) must be made contiguous first
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    count = flat.numel()
    if count == 0:
        return
    claimed = torch.empty(count, dtype=torch.int64, device=flat.device)
    _claim_kernel[(count,)](flat, resident, slot_of_id, n_resident, claimed, capacity, num_warps=1)
    _copy_kernel[(count, tables.src.numel())](flat, claimed, tables.src, tables.dst, tables.words, BLOCK=tables.block,
                                                num_warps=4)
