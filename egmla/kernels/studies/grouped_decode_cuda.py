"""EG-MLA decode grouped by token id in one fused CUDA launch (grouped_decode_cuda.cu) plus a small combine; the same
function as `grouped_decode_ref` and the three Triton launches of egmla/kernels/grouped_decode.py, with no
per-(sequence, id) intermediate in HBM (issue 17). A study: exact, and measured 1.9-2.2x slower than the three
launches on an H100 (docs/grouped-decode.md, "The fused kernel in CUDA"), so the model does not use it; `egmla bench
grouped --settings "grouped cuda s512 h4"` times it. It reads the Triton kernels' per-step plan (`make_plan`): the
grouped order `order` / `order_slots`, `distinct_ids` and `lengths`.

Scope: bf16, d_n = d_v = d_c = d_r = 64 (paper-base heads), at most 16 heads, gate op `mul` with LayerNorm or
RMSNorm, an NVIDIA GPU of compute capability 8.0 or newer (mma.sync) and nvcc or NVRTC to build it
(egmla/kernels/cuda_build.py). `supports` says whether a call fits.

Layout of the work: one block per (segment of `segment` grouped positions, sequence, group of `heads_per_block`
heads), two warps per head, W^K and W^V of its heads in shared memory (~180 KB at 4 heads and 512 positions: one
block per SM); the segments are flash-decoding splits, merged by `grouped_combine`, which also applies the value
slice's norm affine.
"""
from __future__ import annotations

import torch

from egmla.kernels.grouped_decode import GroupedPlan, _check_inputs

HEAD_DIM = 64
MAX_HEADS = 16
SEGMENT = 512  # grouped positions per block (a multiple of 64)
HEADS_PER_BLOCK = 4  # heads per block, two warps each; W^K and W^V of these heads sit in its shared memory


def supports(q_nope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, wkv_b: torch.Tensor) -> str | None:
    """None when the CUDA kernel takes these shapes and dtypes, else why not (for a clear error or a fallback)."""
    if not latent.is_cuda:
        return "the CUDA grouped kernel needs CUDA tensors"
    if torch.cuda.get_device_capability(latent.device)[0] < 8:
        return "the CUDA grouped kernel needs compute capability >= 8.0 (bf16 mma.sync)"
    if {q_nope.dtype, latent.dtype, k_rope.dtype, wkv_b.dtype} != {torch.bfloat16}:
        return f"the CUDA grouped kernel is bf16 only (got latent {latent.dtype}, q {q_nope.dtype})"
    heads, d_n = q_nope.shape[1:]
    if not (d_n == latent.shape[-1] == k_rope.shape[-1] == HEAD_DIM and wkv_b.shape[0] == heads * 2 * HEAD_DIM):
        return (f"the CUDA grouped kernel is built for d_n = d_v = d_c = d_r = {HEAD_DIM} (got d_n {d_n}, d_c "
                f"{latent.shape[-1]}, d_r {k_rope.shape[-1]}, wkv_b rows {wkv_b.shape[0]})")
    if heads > MAX_HEADS:
        return f"the CUDA grouped kernel takes at most {MAX_HEADS} heads (got {heads})"
    return None


_derived: dict = {}


def derived_weights(wkv_b: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                    heads: int) -> tuple[torch.Tensor, ...]:
    """(wkv_b with contiguous rows, W^K transposed per head [heads, d_c, d_n] bf16, and gamma^K, beta^K, gamma^V,
    beta^V as fp32 [heads, 64]), rebuilt when a source tensor changes (its data pointer or version). Build them before a CUDA-graph capture."""
    key = tuple((x.data_ptr(), x._version, tuple(x.shape)) if x is not None else None
                for x in (wkv_b, norm_weight, norm_bias))
    entry = _derived.get(id(wkv_b))
    if entry is None or entry[0] != key:
        d = HEAD_DIM
        wkv_b = wkv_b.contiguous()  # the kernel steps over rows of d_c
        per_head = wkv_b.view(heads, 2 * d, wkv_b.shape[1])
        wk_t = per_head[:, :d, :].transpose(1, 2).contiguous()
        ones = torch.ones(heads, 2 * d, dtype=torch.float32, device=wkv_b.device)
        weight = norm_weight.float().view(heads, 2 * d) if norm_weight is not None else ones
        bias = norm_bias.float().view(heads, 2 * d) if norm_bias is not None else torch.zeros_like(ones)
        tensors = (wkv_b, wk_t, weight[:, :d].contiguous(), bias[:, :d].contiguous(), weight[:, d:].contiguous(),
                   bias[:, d:].contiguous())
        _derived[id(wkv_b)] = entry = (key, tensors)
    return entry[1]


def _kernels(heads: int, segment: int, heads_per_block: int, min_blocks: int, device: torch.device):
    from egmla.kernels.cuda_build import load_kernels

    defines = {"N_HEADS": heads, "SEG": segment, "HPB": heads_per_block, "MIN_BLOCKS": min_blocks}
    kernels = load_kernels("studies/grouped_decode_cuda.cu", defines,
                           ("grouped_fused", "grouped_combine", "smem_bytes"), device)
    if "shared" not in kernels:
        size = torch.zeros(1, dtype=torch.int32, device=device)
        kernels["smem_bytes"]((1,), (1,), 0, [("ptr", size)])
        kernels["shared"] = int(size.item())
    limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    if kernels["shared"] > limit:
        raise ValueError(f"heads_per_block={heads_per_block}, segment={segment}: the kernel needs "
                         f"{kernels['shared']} B "
                         f"of shared memory, this GPU gives a block {limit}: use fewer heads per block or a shorter "
                         f"segment")
    return kernels


def grouped_decode_cuda(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                        ln_stats: torch.Tensor, plan: GroupedPlan, gate_table: torch.Tensor, wkv_b: torch.Tensor,
                        norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, scale: float,
                        segment: int = SEGMENT, heads_per_block: int = HEADS_PER_BLOCK, min_blocks: int = 1,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """o [batch, heads, d_v] bf16, the arguments as in `grouped_decode` (egmla/kernels/grouped_decode.py).
    `segment`: grouped positions per block (the flash-decoding split, a multiple of 64); `heads_per_block`: heads per
    block, two warps each (the largest divisor of the head count not above it is taken); `min_blocks`: blocks per SM
    the compiler must leave registers for (1 = no cap)."""
    reason = supports(q_nope, latent, k_rope, wkv_b)
    if reason:
        raise ValueError(reason + ": use egmla.kernels.grouped_decode.grouped_decode")
    if segment % 64 or segment <= 0:
        raise ValueError(f"segment={segment}: must be a positive multiple of 64")
    _check_inputs(q_nope, q_pe, latent, k_rope, ln_stats, plan, gate_table, wkv_b)
    if gate_table.dtype != torch.bfloat16:
        raise ValueError(f"gate_table.dtype={gate_table.dtype}: the CUDA grouped kernel reads a bf16 gate table")
    for name, x in (("q_nope", q_nope), ("q_pe", q_pe)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name}.stride()={x.stride()}: the head dim must be contiguous")
    batch, heads, _ = q_nope.shape
    device = latent.device
    if out is None:
        out = torch.empty(batch, heads, HEAD_DIM, dtype=torch.bfloat16, device=device)
    if plan.max_len == 0:
        return out.zero_()
    for name, x in (("latent", latent), ("k_rope", k_rope)):
        if x.data_ptr() % 16 or (x.stride(1) * x.element_size()) % 16 or x.stride(0) % 8:
            raise ValueError(f"{name}: rows must start on 16-byte boundaries (stride {x.stride()}, data_ptr "
                             f"{x.data_ptr()}): the kernel reads them as 16-byte vectors")
    wkv_b, wk_t, gamma_k, beta_k, gamma_v, beta_v = derived_weights(wkv_b, norm_weight, norm_bias, heads)
    per_block = max(d for d in range(1, min(heads_per_block, heads) + 1) if heads % d == 0)
    kernels = _kernels(heads, segment, per_block, min_blocks, device)
    n_segments = -(-plan.max_len // segment)
    part_o = torch.empty(batch, n_segments, heads, HEAD_DIM, dtype=torch.float32, device=device)
    part_s = torch.empty(batch, n_segments, heads, 4, dtype=torch.float32, device=device)
    order, order_slots = plan.order, plan.order_slots
    ids, lengths = plan.distinct_ids.to(torch.int32), plan.lengths.to(torch.int32)
    kernels["grouped_fused"](
        (n_segments, batch, heads // per_block), (64 * per_block,), kernels["shared"],
        [("ptr", q_nope), ("ptr", q_pe), ("ptr", latent), ("ptr", k_rope), ("ptr", ln_stats), ("ptr", order),
         ("ptr", order_slots), ("ptr", ids), ("ptr", lengths), ("ptr", gate_table), ("ptr", wk_t), ("ptr", wkv_b),
         ("ptr", gamma_k), ("ptr", beta_k), ("ptr", part_o), ("ptr", part_s),
         ("i64", q_nope.stride(0)), ("i64", q_nope.stride(1)), ("i64", q_pe.stride(0)), ("i64", q_pe.stride(1)),
         ("i64", latent.stride(0)), ("i64", latent.stride(1)), ("i64", k_rope.stride(0)), ("i64", k_rope.stride(1)),
         ("i64", ln_stats.stride(0)), ("i64", ln_stats.stride(1)), ("i64", order.stride(0)), ("i64", ids.stride(0)),
         ("i64", gate_table.stride(0)), ("i32", n_segments), ("f32", scale * 1.4426950408889634)])
    kernels["grouped_combine"](
        (heads, batch), (HEAD_DIM,), 0,
        [("ptr", part_o), ("ptr", part_s), ("ptr", lengths), ("ptr", gamma_v), ("ptr", beta_v), ("ptr", out),
         ("i64", out.stride(0)), ("i64", out.stride(1)), ("i32", n_segments)])
    return out
