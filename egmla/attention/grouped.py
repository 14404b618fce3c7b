"""EG-MLA decode grouped by token id (DESIGN.md §4b, docs/grouped-decode.md): exact, and its K/V
rebuild work scales with the distinct ids of a context, not with its length.

Gate placement `up`, gate op `mul`, norm LayerNorm (or RMSNorm: mu = 0, beta = 0). Per cached
position t the cache holds, besides c_t and k^R_t, the norm statistics of x_t = (W_UKV c_t) ⊙ g_t:
mu_t = mean(x_t), rho_t = 1/sqrt(var(x_t) + eps), computed once when the token is appended. Then

    a_{h,v}  = W^K_h^T (gamma^K_h ⊙ q^C_h ⊙ g^K_{h,v})                         once per distinct id v
    score_t  = scale * (rho_t (a_{h,i_t} . c_t - mu_t gamma^K_h . q^C_h) + beta^K_h . q^C_h + q^R_h . k^R_t)
    w_t      = softmax_t(score)_t * rho_t,      s_{h,v} = sum_{t: i_t = v} w_t c_t
    o_h      = gamma^V_h ⊙ sum_v g^V_{h,v} ⊙ (W^V_h s_{h,v}) - gamma^V_h sum_t w_t mu_t + beta^V_h

This module holds the bookkeeping (`TokenGroups`: each sequence's distinct ids and every position's
slot among them, updated incrementally when tokens are appended), the statistics written at append
time, the plain PyTorch reference of the equations above (`grouped_attention`), and the layer glue
that `EmbeddingGatedMLA` calls. The Triton kernels are in egmla/kernels/grouped_decode.py.
"""
from __future__ import annotations

import dataclasses

import torch

from egmla.attention.context import AttnContext
from egmla.config import ModelConfig


def supports_grouped(config: ModelConfig) -> bool:
    """The grouped decode needs the norm to factor per position (LayerNorm, RMSNorm) and the gate to
    multiply (an additive gate does not factor out of W_UKV c_t); the gate must sit after W_UKV."""
    return (config.attention == "eg-mla" and config.gate_placement == "up" and config.gate_op == "mul"
            and config.gate_norm in ("layernorm", "rmsnorm"))


# ---- bookkeeping: positions grouped by token id --------------------------------------------------
class TokenGroups:
    """Per sequence: the distinct token ids in order of first appearance, and each position's slot.

    `distinct_ids[b, :n_distinct[b]]` are sequence b's distinct ids; `slots[b, t]` is the index of
    position t's id among them, for t < lengths[b] (the positions registered so far); `counts[b, s]` is
    how many positions slot s has and `ranks[b, t]` is position t's index among them, so positions can
    be laid out grouped by id without sorting (offset of the slot + rank). Appends only add:
    a decode step compares the new id with the distinct ids (no host sync), a prefill dedups its
    chunk per sequence. Kept in the KVCache next to the token ids, shared by every layer.

    Only the first n_new[b] tokens of an append are registered: right-padding of a ragged prefill is
    not part of the sequence (it is overwritten later), so it never creates a group.
    """

    def __init__(self, batch_size: int, max_len: int, device=None):
        self.slots = torch.zeros(batch_size, max_len, dtype=torch.int32, device=device)
        self.distinct_ids = torch.zeros(batch_size, max_len, dtype=torch.int32, device=device)
        self.counts = torch.zeros(batch_size, max_len, dtype=torch.int32, device=device)
        self.ranks = torch.zeros(batch_size, max_len, dtype=torch.int32, device=device)
        self.n_distinct = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.stats_missing = False  # set when tokens were appended without norm statistics
        self.version = 0  # bumped on every change, so per-step plans derived from it can be memoised
        self._plan = None  # (version, block_t, GroupedPlan): the kernels' layout, shared by all layers

    def plan(self, block_t: int, vocab_size: int | None = None):
        """The Triton kernels' per-step layout (egmla.kernels.grouped_decode.make_plan), built once per step."""
        if self._plan is None or self._plan[:2] != (self.version, block_t):
            from egmla.kernels.grouped_decode import make_plan

            self._plan = (self.version, block_t, make_plan(self, block_t, vocab_size))
        return self._plan[2]

    def reset(self) -> None:
        self.counts.zero_()
        self.n_distinct.zero_()
        self.lengths.zero_()
        self.stats_missing = False
        self.version += 1

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only sequences `rows` (sorted int64), moved to the front, in place (as the generation
        engine compacts the cache when sequences finish)."""
        kept = rows.numel()
        for name in ("slots", "distinct_ids", "counts", "ranks", "n_distinct", "lengths"):
            buffer = getattr(self, name)
            buffer[:kept] = buffer.index_select(0, rows)
            setattr(self, name, buffer[:kept])
        self.version += 1

    def nbytes(self) -> int:
        per_position = (self.slots, self.distinct_ids, self.counts, self.ranks)  # like KVCache: no per-sequence scalars
        return sum(t.numel() * t.element_size() for t in per_position)

    def append(self, tokens: torch.Tensor, positions: torch.Tensor, n_new: torch.Tensor | None = None,
               with_stats: bool = True) -> None:
        """Register tokens [batch, seq] written at positions [batch, seq]; only the first n_new[b] count."""
        batch, seq = tokens.shape
        if n_new is None:
            n_new = torch.full((batch,), seq, dtype=torch.long, device=tokens.device)
        n_new = n_new.to(self.lengths.device, torch.long)
        if not with_stats:
            self.stats_missing = True
        if seq == 1:
            self._append_one(tokens[:, 0], positions[:, 0], n_new > 0)
        else:
            self._append_many(tokens, positions, n_new)
        self.lengths += n_new.clamp(max=seq)
        self.version += 1

    def _append_one(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """One token per sequence, vectorised over the batch without a host sync."""
        ids = ids.to(torch.int32)
        known = torch.arange(self.distinct_ids.shape[1], device=ids.device)[None, :] < self.n_distinct[:, None]
        match = (self.distinct_ids == ids[:, None]) & known
        found = match.any(dim=1)
        slot = torch.where(found, match.int().argmax(dim=1), self.n_distinct)
        rows = torch.arange(ids.shape[0], device=ids.device)
        is_new = valid & ~found
        new_slot = torch.where(is_new, self.n_distinct, torch.zeros_like(self.n_distinct))
        self.distinct_ids[rows, new_slot] = torch.where(is_new, ids, self.distinct_ids[rows, new_slot])
        self.n_distinct += is_new.long()
        write_at = torch.where(valid, positions, torch.zeros_like(positions))
        self.slots[rows, write_at] = torch.where(valid, slot.to(torch.int32), self.slots[rows, write_at])
        count = self.counts[rows, slot]
        self.ranks[rows, write_at] = torch.where(valid, count, self.ranks[rows, write_at])
        self.counts[rows, slot] = count + valid.int()

    def _append_many(self, tokens: torch.Tensor, positions: torch.Tensor, n_new: torch.Tensor) -> None:
        """A prefill chunk: per sequence, dedup [known ids; new ids] keeping first-appearance order."""
        for b, count in enumerate(n_new.tolist()):
            if count <= 0:
                continue
            known = self.distinct_ids[b, : int(self.n_distinct[b])]
            combined = torch.cat([known, tokens[b, :count].to(torch.int32)])
            uniq, inverse = torch.unique(combined, return_inverse=True)
            first = torch.full((len(uniq),), len(combined), dtype=torch.long, device=combined.device)
            first.scatter_reduce_(0, inverse, torch.arange(len(combined), device=combined.device), "amin")
            order = first.argsort()  # known ids keep their slots: they come first, in slot order
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order), device=order.device)
            self.distinct_ids[b, : len(uniq)] = uniq[order].to(torch.int32)
            self.n_distinct[b] = len(uniq)
            slots = rank[inverse[len(known):]]
            self.slots[b, positions[b, :count]] = slots.to(torch.int32)
            # rank among the slot's positions: those before this chunk, then order of appearance in it
            by_slot = torch.argsort(slots, stable=True)
            sorted_slots = slots[by_slot]
            index = torch.arange(count, device=slots.device)
            run_start = torch.where(torch.cat([sorted_slots.new_ones(1, dtype=torch.bool),
                                               sorted_slots[1:] != sorted_slots[:-1]]), index, 0).cummax(0).values
            ranks = torch.empty_like(slots)
            ranks[by_slot] = index - run_start
            self.ranks[b, positions[b, :count]] = (self.counts[b, slots] + ranks).to(torch.int32)
            self.counts[b].index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))


# ---- statistics written at append time -----------------------------------------------------------
def norm_kind(attn) -> str:
    return type(attn.gate_norm).__name__.lower().replace("identity", "none")


def append_stats(attn, latent: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq, 2] fp32 (mu, rho) of the new positions' x_t = (W_UKV c_t) ⊙ g_t, for latent
    [batch, seq, d_c] and their ids [batch, seq]: what the cache stores for the grouped decode."""
    from egmla.kernels.egmla_decode_ref import layernorm_stats

    return layernorm_stats(latent, attn.gate(token_ids), attn.wkv_b.weight, getattr(attn.gate_norm, "eps", 0.0),
                           attn.gate_op, norm_kind(attn))


# ---- the reference -----------------------------------------------------------------------------
def split_heads(vector: torch.Tensor | None, n_heads: int, d_n: int, fill: float,
                dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A [..., n_h*(d_n+d_v)] vector in wkv_b's per-head [k; v] layout -> its K [..., n_h, d_n] and V parts
    (`fill`, a scalar, for both when the vector is absent: no affine weight, or no bias)."""
    if vector is None:
        return fill, fill
    per_head = vector.to(dtype).unflatten(-1, (n_heads, -1))
    return per_head[..., :d_n], per_head[..., d_n:]


def grouped_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                      ln_stats: torch.Tensor, slots: torch.Tensor, gates: torch.Tensor, mask: torch.Tensor,
                      w_uk: torch.Tensor, w_uv: torch.Tensor, gamma: torch.Tensor | None,
                      beta: torch.Tensor | None, scale: float) -> torch.Tensor:
    """DESIGN.md §4b in PyTorch (fp32, or fp64 for fp64 inputs), one line per equation. Returns o [b, s, h, d_v].

    q_nope [b, s, h, d_n], q_pe [b, s, h, d_r]; cache latent [b, T, d_c], k_pe [b, T, d_r],
    ln_stats [b, T, 2] (mu, rho); slots [b, T] (index into the distinct ids), gates [b, U, h*(d_n+d_v)]
    (gate rows of the distinct ids, per-head [k; v] layout); mask [b, s, T] (True = attend);
    w_uk [h, d_n, d_c], w_uv [h, d_v, d_c]; gamma/beta [h*(d_n+d_v)] or None (RMSNorm: beta None)."""
    n_heads, d_n = q_nope.shape[2], q_nope.shape[3]
    dt = torch.promote_types(q_nope.dtype, torch.float32)
    q, q_pe, latent, k_pe = q_nope.to(dt), q_pe.to(dt), latent.to(dt), k_pe.to(dt)
    mu, rho = ln_stats[..., 0].to(dt)[:, None, None, :], ln_stats[..., 1].to(dt)[:, None, None, :]
    gate_k, gate_v = split_heads(gates, n_heads, d_n, 1.0, dt)  # [b, U, h, d_n], [b, U, h, d_v]
    gamma_k, gamma_v = split_heads(gamma, n_heads, d_n, 1.0, dt)
    beta_k, beta_v = split_heads(beta, n_heads, d_n, 0.0, dt)
    gq = gamma_k * q  # gamma^K ⊙ q^C  [b, s, h, d_n]
    absorbed = torch.einsum("bshd,buhd,hdc->bshuc", gq, gate_k, w_uk.to(dt))  # a_{h,v}, once per id
    index = slots.long().clamp(0, gates.shape[1] - 1)[:, None, None, :, None]
    index = index.expand(*absorbed.shape[:3], -1, latent.shape[-1])  # [b, s, h, T, d_c]: the slot of t
    content = torch.einsum("bshtc,btc->bsht", absorbed.gather(3, index), latent)  # a_{h,i_t} . c_t
    query_bias = (beta_k * q).sum(-1) if torch.is_tensor(beta_k) else torch.zeros_like(gq[..., 0])  # beta^K . q^C
    scores = (rho * (content - mu * gq.sum(-1)[..., None]) + query_bias[..., None]
              + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * scale
    visible = mask[:, :, None, :]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).masked_fill(~visible, 0.0)
    weights = probs.nan_to_num(0.0) * rho  # w_t = p_t rho_t; a query with nothing visible gets 0
    sums = torch.zeros_like(absorbed).scatter_add_(3, index, weights[..., None] * latent[:, None, None])  # s_{h,v}
    up = torch.einsum("bshuc,hdc->bshud", sums, w_uv.to(dt))  # W^V_h s_{h,v}
    grouped = (gate_v.permute(0, 2, 1, 3)[:, None] * up).sum(3)  # sum_v g^V_{h,v} ⊙ (W^V_h s_{h,v})
    mean_term = (weights * mu).sum(-1)[..., None]  # sum_t w_t mu_t
    out = gamma_v * (grouped - mean_term) + beta_v
    return out * visible.any(-1)[..., None]


# ---- layer glue (called by EmbeddingGatedMLA) ------------------------------------------------------
def forward(attn, x: torch.Tensor, ctx: AttnContext, cache) -> torch.Tensor:
    """MultiHeadLatentAttention.forward for decode path 'grouped': also writes (mu, rho) of the new
    positions, then attends with `attn.attend_grouped` over the registered positions."""
    if "ln_stats" not in cache.buffers or ctx.kv_groups is None:
        raise ValueError("decode_path='grouped' needs a cache with LayerNorm statistics and token groups: "
                         "call model.set_decode_path('grouped') before model.new_cache(...)")
    return forward_with_stats(attn, x, ctx, cache, attn.attend_grouped)


def forward_with_stats(attn, x: torch.Tensor, ctx: AttnContext, cache, attend) -> torch.Tensor:
    """Forward for decode paths whose cache keeps each position's norm statistics ('grouped', and the
    fused 'kernel'): (mu, rho) are computed once, when a token is appended, then `attend` reads them
    from ctx.kv_ln_stats."""
    q_nope, q_pe = attn.query(x, ctx)
    latent, k_pe = attn.latent(x, ctx)
    cache.write(ctx.positions, latent=latent, k_rope=k_pe, ln_stats=append_stats(attn, latent, ctx.token_ids))
    ctx = dataclasses.replace(ctx, kv_ln_stats=cache.read("ln_stats", ctx.kv_len))
    out = attend(q_nope, q_pe, cache.read("latent", ctx.kv_len), cache.read("k_rope", ctx.kv_len),
                 ctx.kv_token_ids, ctx)
    return attn.wo(out.flatten(2))


def check_groups(groups: TokenGroups) -> None:
    if groups.stats_missing:
        raise ValueError("this cache holds positions appended without LayerNorm statistics (decode path was not "
                         "'grouped' when they were appended): refill it after model.set_decode_path('grouped'), "
                         "or use decode_path='naive' / 'gate-table'")


def attend_reference(attn, q_nope, q_pe, latent, k_pe, ctx: AttnContext) -> torch.Tensor:
    """attend_grouped in PyTorch, for any number of new tokens. Returns [batch, seq, heads, d_v]."""
    groups = ctx.kv_groups
    check_groups(groups)
    kv_len = latent.shape[1]
    registered = torch.arange(kv_len, device=latent.device)[None, :] < groups.lengths[:, None]
    mask = ctx.mask[:, 0] & registered[:, None, :]
    n_ids = max(int(groups.n_distinct.max()), 1)
    ids = groups.distinct_ids[:, :n_ids]
    vocab = attn.gate_embed.num_embeddings
    if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(f"token ids in the cache must lie in [0, vocab_size={vocab}); got {int(ids.min())}.."
                         f"{int(ids.max())}: check the tokenizer matches the model")
    gates = attn.gate(ids)  # g_v for the distinct ids only
    w_uk, w_uv = attn.up_weights()
    norm = attn.gate_norm
    out = grouped_attention(q_nope, q_pe, latent, k_pe, ctx.kv_ln_stats, groups.slots[:, :kv_len], gates, mask,
                            w_uk, w_uv, norm.weight, getattr(norm, "bias", None), attn.softmax_scale)
    return out.to(q_nope.dtype)


def attend(attn, q_nope, q_pe, latent, k_pe, ctx: AttnContext) -> torch.Tensor:
    """One new token per sequence: the Triton kernels on CUDA (`attn.grouped_backend = "kernel"` also
    sends CPU tensors through Triton's interpreter, for tests), else the PyTorch reference. Several new
    tokens (prefill): the rebuild (`attend_naive`), which is compute-bound there anyway and exact too;
    the reference's per-query absorption would need [batch, seq, heads, distinct ids, d_c] memory."""
    backend = getattr(attn, "grouped_backend", "auto")
    if backend not in ("auto", "kernel", "reference"):
        raise ValueError(f"grouped_backend={backend!r}: choose auto, kernel or reference")
    if q_nope.shape[1] > 1 and backend != "reference":
        check_groups(ctx.kv_groups)
        return attn.attend_naive(q_nope, q_pe, latent, k_pe, ctx.kv_token_ids, ctx)
    use_kernel = q_nope.shape[1] == 1 and (backend == "kernel" or (backend == "auto" and latent.is_cuda))
    if use_kernel:
        from egmla.kernels import kernel_unavailable_reason, warn_fallback_once

        reason = kernel_unavailable_reason(latent.device)
        if reason:
            warn_fallback_once("decode path 'grouped'", reason)
            use_kernel = False
    if not use_kernel:
        return attend_reference(attn, q_nope, q_pe, latent, k_pe, ctx)
    from egmla.kernels.grouped_decode import grouped_decode

    groups = ctx.kv_groups
    check_groups(groups)
    table = attn.gate_table
    if table is None or table.device != latent.device or table.dtype != latent.dtype:
        table = attn.build_gate_table().to(latent.dtype)  # G = E W_UE^T, once (rebuilt after set_decode_path)
        attn.gate_table = table
    norm = attn.gate_norm
    plan = groups.plan(32, vocab_size=table.shape[0])
    out = grouped_decode(q_nope[:, 0], q_pe[:, 0], latent, k_pe, ctx.kv_ln_stats, plan, table,
                         attn.wkv_b.weight, norm.weight, getattr(norm, "bias", None), attn.softmax_scale)
    return out.unsqueeze(1)
