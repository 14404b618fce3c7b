"""Keep EG-MLA's gate tables in host memory; hold on the GPU only the rows of token ids in use.

The paper offloads the embedding parameters at inference. Per layer the gate needs one row per token
id: E_l[i] (the d_e-wide embedding, `naive` path) or G_l[i] = W_UE E_l[i] (the precomputed gate
table: `gate-table`, `kernel`, `grouped`, the bias controls' `absorbed`). Those tables are V x d_e
(or V x n_h(d_n+d_v)) per layer, but a batch of contexts uses only its distinct ids (docs/design.md §4b:
per 4K tokens, 612 of 32K ids in code, 1,187 in English). So:

    host:    E_l (and G_l) for every layer, moved off the device
    device:  rows[slot] for the ids seen so far, one slot map id -> slot shared by all layers

A forward pre-hook on the model copies the rows of any new ids in `tokens` to the device before the
layers run (a few rows per decode step), so every cached position's id is always resident. Lookups
are then two on-device gathers, and the values are the very same rows: logits are bit-identical to
the on-device path. Staging rows go through pinned memory when CUDA is used, so the copy is async.
The Triton kernels read the same rows: the 'grouped' decode's gate-row gathers get the resident rows and the slot
map (`kernel_table`, its `id_to_row` argument: row = slot_of_id[id], one load more per gathered row, none where no
map is given); the fused 'kernel' decode the resident rows and the cached ids' slots, gathered once per forward for
all layers (`kernel_slots`); the statistics passes, the cache-append launch and the bias
controls' 'absorbed' kernels the resident rows and the ids' slots in them (`kernel_rows`) instead of the whole
table and the ids. The grouped decode still groups by token id.

On CUDA the new ids are found and their rows copied on the device (`on_device`, egmla/kernels/gate_rows.py): two
launches that a CUDA graph captures, no host sync per step. The host tables are pinned and the kernel reads the new
rows from them directly; the row cache has a fixed address between growths, so a decode step with offloaded tables is
replayed from a graph like any other. The caller that replays graphs keeps room ahead of the ids (`reserve`,
`make_room`: a growth moves the rows, and the graphs that read them must be captured again); GenerationEngine does.
Used without such a caller (a model called directly), each forward first counts its new ids on the host.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
from torch import nn

from egmla.attention import decode_path_table
from egmla.attention.gate_table import DeviceRows, GateRows


def offloadable(config, path: str) -> bool:
    """Whether an offload can serve decode path `path` of `config`: its gate rows are read through `gate_embed(ids)` /
    `gate_table[ids]` or, in its Triton kernels, `kernel_table` / `kernel_slots`, which the resident rows serve
    (`DecodePath.gate_rows_by_id`: every EG-MLA path today). A model without a gate has nothing to offload."""
    path_entry = decode_path_table(config).get(path)
    return not config.is_gated or (path_entry is not None and path_entry.gate_rows_by_id)


class OffloadedRows(nn.Module, GateRows):
    """Stands in for `gate_embed` (called with ids) or `gate_table` (indexed with ids): the layer reads either through
    `GateRows` (egmla.attention.gate_table), served from the rows resident on the device."""

    exact_stand_in = True  # serves E_l's own rows: not a wrapper that changes them (egmla.attention.precomputed)

    def __init__(self, offload: "GateTableOffload", key: tuple[int, str]):
        super().__init__()
        self.offload, self.key = offload, key

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.offload.rows(self.key, token_ids)

    def __getitem__(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.offload.rows(self.key, token_ids)

    def kernel_table(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """For a kernel that maps ids to rows itself (an `id_to_row` argument): the resident rows [capacity, width]
        (cast to dtype where given) and the slot map id -> row [vocab] (int64), in place of the whole table."""
        rows = self.offload.device_rows[self.key]
        return (rows if dtype is None else rows.to(dtype)), self.offload.slot_of_id

    def kernel_slots(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The slots of token_ids in the resident rows (`slot_of_id[token_ids]`), gathered once per forward for each
        ids tensor: every layer reads the cache's ids, and a kernel reading rows[slot] directly skips a map lookup per
        position per layer. (With that lookup in the fused decode, an offload made its step 1.29-1.44x slower at
        batch 32-128 on an H100, the grouped decode's 1.03-1.07x; with the slots 1.01-1.07x at batch 1-128,
        docs/bench/offload_h100/, second section.)"""
        return self.offload.slots(token_ids)

    @property
    def device(self) -> torch.device:
        return self.offload.device  # as a table's: where the rows it serves are read

    @property
    def num_embeddings(self) -> int:
        return self.offload.vocab_size  # as nn.Embedding's: the ids it serves, not the rows resident


class GateTableOffload:
    """Moves every EG-MLA layer's gate tables to host memory and serves rows from a device cache.

    Call after `model.set_decode_path(...)` (the paths that read G_l build it on the device first); to switch the
    decode path later, `restore()` the tables to the device first, or switch between paths that read G_l with
    `set_decode_path(path, keep_precomputed=True)`, which keeps the offloaded tables (GenerationEngine's 'auto' choosing
    between 'kernel' and 'grouped')."""

    def __init__(self, model: nn.Module, initial_rows: int = 256, on_device: bool | None = None):
        """on_device: find new ids and copy their rows by Triton kernels (default: on CUDA), else on the host with a
        sync per forward (the CPU's way; on the CPU the kernels need TRITON_INTERPRET=1)."""
        self.model = model
        if not offloadable(model.config, model.decode_path):
            served = [name for name in decode_path_table(model.config) if offloadable(model.config, name)]
            raise ValueError(f"offload_gate_tables with decode_path={model.decode_path!r}: that path reads the "
                             f"whole gate table on the device; use one of {', '.join(served)}")
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = model.config.vocab_size
        self.pin = self.device.type == "cuda"
        self.on_device = self.pin if on_device is None else on_device
        self.managed = False  # while a caller that keeps room ahead of the ids runs (`managed_by_caller`); else each
        # forward counts its new ids
        self._moved_unmanaged = False  # a forward that counted its ids grew the rows: the next make_room tells
        self.evictions = 0  # times make_room dropped the rows of ids no longer live
        self.host_tables: dict[tuple[int, str], torch.Tensor] = {}
        with torch.no_grad():
            for index, layer in enumerate(model.layers):
                attn = layer.attn
                if not hasattr(attn, "gate_embed"):
                    continue
                if isinstance(attn.gate_embed, OffloadedRows):
                    raise ValueError("offload_gate_tables: this model's gate tables are already offloaded; "
                                     "restore() the previous GateTableOffload first")
                self.host_tables[(index, "embed")] = self._to_host(attn.gate_embed.weight)
                attn.gate_embed = OffloadedRows(self, (index, "embed"))
                if attn.gate_table is not None:  # the table on the device (`DeviceRows`)
                    self.host_tables[(index, "table")] = self._to_host(attn.gate_table.table)
                    attn.gate_table = OffloadedRows(self, (index, "table"))
        if not self.host_tables:
            raise ValueError(f"offload_gate_tables: {model.config.variant_name()} has no gate tables; "
                             f"only EG-MLA models can offload them")
        self.initial_rows = initial_rows
        self.device_rows: dict[tuple[int, str], torch.Tensor] = {}
        self._slots: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # `slots` of this forward: (ids, slots)
        self.reset()
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _to_host(self, table: torch.Tensor) -> torch.Tensor:
        host = table.detach().to("cpu", copy=True).contiguous()
        return host.pin_memory() if self.pin and self.on_device else host  # the claim kernel reads it in place

    def restore(self) -> None:
        """Put the tables back on the device as they were and remove the hook."""
        self._hook.remove()
        with torch.no_grad():
            for (index, kind), table in self.host_tables.items():
                attn = self.model.layers[index].attn
                delattr(attn, "gate_embed" if kind == "embed" else "gate_table")  # drop the OffloadedRows
                if kind == "embed":
                    attn.gate_embed = nn.Embedding.from_pretrained(table.to(self.device), freeze=False)
                else:
                    attn.gate_table = DeviceRows(table.to(self.device))
        self.host_tables, self.device_rows = {}, {}

    # ---- the device-side row cache ---------------------------------------------------------
    def reset(self) -> None:
        """Forget the resident rows (between batches); the host tables stay. On the device the row cache keeps its
        capacity and address (graphs that read it stay valid)."""
        with torch.inference_mode(False), torch.no_grad():
            if self.on_device and self.device_rows:
                self.resident.zero_()
                self.n_resident_device.zero_()
                self.upper = 0
                return
            self.resident_host = np.zeros(self.vocab_size, dtype=bool)
            self.n_resident_host = 0
            self.slot_of_id = torch.zeros(self.vocab_size, dtype=torch.long, device=self.device)
            rows = min(self.initial_rows, self.vocab_size)
            self.device_rows = {key: torch.empty(rows, table.shape[1], dtype=table.dtype, device=self.device)
                                for key, table in self.host_tables.items()}
            if self.on_device:
                from egmla.kernels.gate_rows import GateRowTables

                self.resident = torch.zeros(self.vocab_size, dtype=torch.int32, device=self.device)
                self.n_resident_device = torch.zeros(1, dtype=torch.int32, device=self.device)
                self.upper = 0  # at least as many ids as are resident (counted on the host, no sync)
                self.tables = GateRowTables.build(list(self.host_tables.values()), list(self.device_rows.values()))

    @property
    def n_resident(self) -> int:
        """Ids with a resident row (on the device: read back, a sync)."""
        return int(self.n_resident_device.item()) if self.on_device else self.n_resident_host

    def ensure(self, token_ids: torch.Tensor) -> None:
        """Copy the rows of ids not yet resident to the device."""
        if self.on_device:
            self._claim(token_ids)
            return
        ids = token_ids.detach().flatten().unique().cpu().numpy()
        new = ids[~self.resident_host[ids]]
        if new.size == 0:
            return
        first, end = self.n_resident_host, self.n_resident_host + new.size
        with torch.inference_mode(False), torch.no_grad():
            if end > self.capacity:
                self._grow(min(max(end, 2 * self.capacity), self.vocab_size))
            new_ids = torch.from_numpy(new).long()
            for key, table in self.host_tables.items():
                staging = torch.empty(new.size, table.shape[1], dtype=table.dtype, pin_memory=self.pin)
                torch.index_select(table, 0, new_ids, out=staging)
                self.device_rows[key][first:end].copy_(staging, non_blocking=self.pin)
            self.slot_of_id[new_ids.to(self.device)] = torch.arange(first, end, device=self.device)
        self.resident_host[new] = True
        self.n_resident_host = end

    def _claim(self, token_ids: torch.Tensor) -> None:
        from egmla.kernels.gate_rows import claim_gate_rows

        ids = token_ids.detach()
        capturing = ids.is_cuda and torch.cuda.is_current_stream_capturing()
        if not self.managed and not capturing:  # no caller keeps room: count this forward's new ids (a sync)
            distinct = ids.flatten().unique()
            self._moved_unmanaged |= self._room(int((self.resident[distinct] == 0).sum()))
        with torch.inference_mode(False), torch.no_grad():
            claim_gate_rows(ids, self.resident, self.slot_of_id, self.n_resident_device, self.capacity, self.tables)

    def reserve(self, rows: int) -> bool:
        """Room for at least `rows` resident ids in all (at most the vocabulary). True if the rows moved: a graph
        that reads them must be captured again."""
        rows = min(rows, self.vocab_size)
        if not self.on_device or rows <= self.capacity:
            return False
        self._grow(rows)
        return True

    def make_room(self, new_ids: int, live_ids: Callable[[], torch.Tensor] | None = None) -> bool:
        """Room for up to `new_ids` more ids before the next forward(s) (on the device; the host path grows as it
        copies). Counted on the host against an upper bound of what is resident, so it syncs only when the bound
        nears the capacity; then it reads the true count and grows if that is short too. With `live_ids` (the ids
        the cache still holds: a server's, whose rows would otherwise pile up over requests) a shortage first evicts
        every other id (their rows claimed again, at new slots of the same rows), and grows only where the live ids
        and the new ones would fill more than half the rows. True if the rows moved (a graph that reads them must be
        captured again)."""
        if not self.on_device:
            return False
        self.managed = True  # the caller keeps room: forwards stop counting their ids (till `managed_by_caller` ends)
        moved, self._moved_unmanaged = self._room(new_ids, live_ids) or self._moved_unmanaged, False
        return moved

    @contextlib.contextmanager
    def managed_by_caller(self):
        """While a caller that keeps room ahead of the ids (make_room before every forward) runs: its forwards do
        not count their ids; after it, forwards (the model called directly) count theirs again."""
        saved, self.managed = self.managed, True
        try:
            yield
        finally:
            self.managed = saved

    def _room(self, new_ids: int, live_ids: Callable[[], torch.Tensor] | None = None) -> bool:
        if self.upper + new_ids <= self.capacity or self.capacity >= self.vocab_size:
            self.upper = min(self.upper + new_ids, self.vocab_size)
            return False
        self.upper = self.check()
        moved = False
        if self.upper + new_ids > self.capacity and live_ids is not None:
            moved = self._evict(live_ids(), new_ids)
        elif self.upper + new_ids > self.capacity:
            moved = self.reserve(max(self.upper + new_ids, 2 * self.capacity))
        self.upper = min(self.upper + new_ids, self.vocab_size)
        return moved

    def _evict(self, live_ids: torch.Tensor, new_ids: int) -> bool:
        """Keep only the rows of live_ids (claimed again from the host tables, a one-off copy), growing first where
        they and new_ids would fill more than half the rows. True if the rows moved."""
        from egmla.kernels.gate_rows import claim_gate_rows

        distinct = live_ids.flatten().unique()
        live = distinct.numel()
        moved = self.reserve(2 * (live + new_ids)) if 2 * (live + new_ids) > self.capacity else False
        with torch.inference_mode(False), torch.no_grad():
            self.resident.zero_()
            self.n_resident_device.zero_()
            claim_gate_rows(distinct, self.resident, self.slot_of_id, self.n_resident_device, self.capacity,
                            self.tables)
        self.upper = live
        self.evictions += 1
        return moved

    def check(self) -> int:
        """The resident count, read back (a sync); an error if ids went past the capacity (their rows are missing:
        the room kept ahead of them was short, a bug of the caller)."""
        count = self.n_resident
        if count > self.capacity:
            raise RuntimeError(f"gate-row cache overflow: {count} ids resident in {self.capacity} rows; the ids past "
                               f"the capacity have no rows (make_room was not called with enough room before a "
                               f"forward)")
        return count

    def slots(self, token_ids: torch.Tensor) -> torch.Tensor:
        """slot_of_id[token_ids], memoized until the next forward (the ids are written before the layers run)."""
        key = (token_ids.data_ptr(), tuple(token_ids.shape), token_ids.stride())
        if key not in self._slots:  # the ids kept beside their slots: no other tensor takes their memory meanwhile
            self._slots[key] = (token_ids, self.slot_of_id[token_ids.long()])
        return self._slots[key][1]

    def rows(self, key: tuple[int, str], token_ids: torch.Tensor) -> torch.Tensor:
        """Gate rows [*token_ids.shape, width] for resident ids."""
        return self.device_rows[key][self.slot_of_id[token_ids.long()]]

    @property
    def capacity(self) -> int:
        return next(iter(self.device_rows.values())).shape[0]

    def _grow(self, capacity: int) -> None:
        kept = self.capacity if self.on_device else self.n_resident_host  # on the device: not known without a sync
        with torch.inference_mode(False), torch.no_grad():
            for key, old in self.device_rows.items():
                grown = torch.empty(capacity, old.shape[1], dtype=old.dtype, device=self.device)
                grown[:kept] = old[:kept]
                self.device_rows[key] = grown
            if self.on_device:
                self.tables.moved(list(self.device_rows.values()))

    def _before_forward(self, module, args, kwargs):
        self._slots = {}  # the slots gathered in the last forward: this one's cache ids may differ
        tokens = args[0] if args else kwargs["tokens"]
        self.ensure(tokens)

    # ---- accounting ------------------------------------------------------------------------
    def host_bytes(self) -> int:
        """Bytes of gate tables moved off the device."""
        return sum(t.numel() * t.element_size() for t in self.host_tables.values())

    def device_bytes(self) -> int:
        """Bytes the device holds instead: the row cache (at its current capacity) and the slot map; none once
        restored."""
        if not self.host_tables:
            return 0
        maps = [self.slot_of_id] + ([self.resident] if self.on_device else [])
        return sum(t.numel() * t.element_size() for t in [*self.device_rows.values(), *maps])

    def bytes_per_id(self) -> int:
        """Device bytes of one resident id's rows: its row of every offloaded table."""
        return sum(t.shape[1] * t.element_size() for t in self.host_tables.values())

    def bytes_saved(self) -> int:
        return self.host_bytes() - self.device_bytes()
