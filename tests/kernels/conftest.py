"""Kernel tests run the real kernels: on a GPU when there is one, else in Triton's CPU interpreter (chosen in
tests/conftest.py, before any test module imports a kernel)."""
import pytest
import torch


def kernel_device() -> str:
    from egmla.kernels import interpreting

    return "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN: any element the kernel fails to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def nan_past(x: torch.Tensor, lengths: torch.Tensor, spare: int = 3, fill=float("nan")) -> torch.Tensor:
    """x [batch, T, ...] again, as the view [:, :T] of a longer buffer that holds `fill` (NaN; for an integer tensor
    give an integer) at every position t >= lengths[b] and in the `spare` positions past T: a cache's padding, which
    a decode kernel must mask, never read into its sums (0 * NaN is NaN)."""
    batch, max_len = x.shape[:2]
    buffer = torch.full((batch, max_len + spare, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    seen = torch.arange(max_len, device=x.device)[None, :] < lengths.to(x.device)[:, None]
    buffer[:, :max_len][seen] = x[seen]
    return buffer[:, :max_len]


def resident_rows(table: torch.Tensor, spare: int = 3, id_dtype=torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """A gate-table offload's view of `table` (egmla.infer.offload), for a kernel's `id_to_row`: every id's row at
    a shuffled slot of a row cache with `spare` NaN rows, and the id -> slot map [vocab]. A kernel that read rows
    by id, or any row but the id's slot, would give other gates or NaN."""
    vocab = table.shape[0]
    id_to_row = torch.randperm(vocab + spare, device=table.device)[:vocab].to(id_dtype)
    rows = torch.full((vocab + spare, table.shape[1]), float("nan"), dtype=table.dtype, device=table.device)
    rows[id_to_row.long()] = table
    return rows, id_to_row


requires_triton = pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
