"""What EG-MLA's decode paths ask of a table read by token id (its gate table G_l = E_l W_UE^T, or for the bias
controls' kernels its embedding E_l): `GateRows`. The table lies whole on the device (`DeviceRows`), or in host memory
with the rows of the ids in use resident on the device (egmla.infer.offload.OffloadedRows: the very same rows). The
layer (egmla.attention.egmla) reads either through these few calls, never asking which one it holds.
"""
from __future__ import annotations

import torch


class GateRows:
    """Rows [*, width] of a table, read by token id: gathered in PyTorch (`table[ids]`) or handed to a Triton kernel
    (`kernel_table`, `kernel_rows`, `kernel_slots`)."""

    device: torch.device  # where the rows are read

    def __getitem__(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The rows of token_ids (int64) [*token_ids.shape, width]."""
        raise NotImplementedError

    def kernel_table(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For a kernel that maps ids to rows itself (an `id_to_row` argument): the rows it reads [n, width], in dtype
        where given, and the map id -> row [vocab], or None where row = id (the whole table)."""
        raise NotImplementedError

    def kernel_rows(self, token_ids: torch.Tensor,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """For a kernel that gathers rows by index: `kernel_table`'s rows and each id's row in them (token_ids' shape:
        the ids themselves where row = id)."""
        table, id_to_row = self.kernel_table(dtype)
        return table, token_ids if id_to_row is None else id_to_row[token_ids.long()]

    def kernel_slots(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Each id's row in `kernel_table`'s rows, for a kernel given no map (the fused decode): the ids themselves, or
        an offload's slots, gathered once per forward for each ids tensor (every layer reads the cache's ids)."""
        raise NotImplementedError


class DeviceRows(GateRows):
    """A table held whole on the device: row = id. `table` is the tensor [vocab, width] the kernels read."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    @property
    def device(self) -> torch.device:
        return self.table.device

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    def __getitem__(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.table[token_ids]

    def kernel_table(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, None]:
        return (self.table if dtype is None else self.table.to(dtype)), None

    def kernel_slots(self, token_ids: torch.Tensor) -> torch.Tensor:
        return token_ids
