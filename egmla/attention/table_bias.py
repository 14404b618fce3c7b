"""The same-table controls of EG-MLA (issue 18): `gate_op="bias"` and `"bias-v"`, docs/design.md §1.

The same table E_l and up-projection W_UE as EG-MLA (egmla/attention/egmla.py), g_t = W_UE e_t, but added after
the norm instead of multiplying before it, so it shifts K and V per token and gates nothing:

    gate_op="bias"     f_t = Norm(kv_t) + g_t,   kv_t = W_UKV c_t: every parameter of EG-MLA, the same table
                       up-projected the same way. Added to the layer input it would need a d_model-wide W_UE, and
                       the parameters would no longer match EG-MLA's.
    gate_op="bias-v"   (not parameter-matched: W_UE is half as wide, 4.7 M parameters fewer at paper-base) the
                       same table added to V alone, as modded-nanogpt's "value embeddings": it asks whether the
                       keys need the table. Its gate vector is W_UE e_t in the V slots of the [k; v] layout and 0
                       in the K slots (`up_project`), so every PyTorch path of "bias" serves it unchanged (the
                       Triton absorbed decode skips its zero score term: `absorbed_weights`).

Placement up only (the config refuses another). Decode paths (`TableBiasMLA.PATHS`): EG-MLA's 'naive' and
'gate-table', and
    absorbed   MLA's absorbed decode: the norm covers the ungated kv_t, so it factors out per position (its
               (mu, rho) cached) and the table's rows enter per distinct id, one score term and one value term
               (`bias_absorbed_attention` in egmla/attention/egmla_equations.py; on CUDA the pass over the cache
               in Triton, egmla/kernels/bias_decode.py); the cache holds (mu, rho) and the token groups. A later
               chunk of several new tokens takes the gate-table rebuild; a device Triton cannot run on, the
               PyTorch equations.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from egmla.attention.context import AttnContext, decode_kernel_can_run
from egmla.attention.egmla import EmbeddingGatedMLA
from egmla.attention.egmla_equations import bias_absorbed_attention, split_heads
from egmla.attention.gate_table import DeviceRows, GateRows
from egmla.attention.paths import DecodePath, path_table
from egmla.attention.precomputed import sources_key
from egmla.config import ModelConfig


@dataclasses.dataclass
class AbsorbedWeights:
    """The controls' folded decode weights (TableBiasMLA.absorbed_weights, read by the Triton absorbed decode
    `bias_absorbed_kernel`) and the key of the weights they were built from."""
    key: tuple
    query: torch.Tensor  # [n_h, d_n, d_c (+ d_e) + 2]
    output: torch.Tensor  # [n_h, d_c + 2 + d_e, d_v]
    score_term: bool  # False for the table on V only


class TableBiasMLA(EmbeddingGatedMLA):
    # EG-MLA's 'naive' and 'gate-table', and the absorbed decode in place of 'kernel' / 'grouped' (the Triton
    # kernels gate inside; here the norm factors out): (mu, rho) and the token groups (positions by id) cached.
    PATHS = path_table(
        EmbeddingGatedMLA.UP_PATHS["naive"],
        EmbeddingGatedMLA.UP_PATHS["gate-table"],
        DecodePath("absorbed", "attend_absorbed", reads_weights=True, reads_gate_table=True, keeps_stats=True,
                   keeps_token_groups=True, reads_own_positions=True, gate_rows_by_id=True))

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.absorbed_backend = "auto"  # 'absorbed' one-token steps: auto (Triton on CUDA), kernel or pytorch
        # the kernel's per-id softmax mass: "atomic" (atomics in time order) or "grouped" (segment sums in the
        # grouped plan's order, no atomics; exact, 4-9% slower on an H200: docs/benchmarks.md §2)
        self.bias_mass = os.environ.get("EGMLA_BIAS_MASS", "atomic")

    @staticmethod
    def decode_path_table(config: ModelConfig) -> dict[str, DecodePath]:
        return dict(TableBiasMLA.PATHS)

    # ---- the table, added after the norm ---------------------------------------------------
    def up_project(self, embedding: torch.Tensor) -> torch.Tensor:
        """g = W_UE e; for the V-only control W_UE e in the V slots of the per-head [k; v] layout, zeros in the K
        slots."""
        gate = self.wue(embedding)
        if self.gate_op == "bias-v":
            per_head = gate.unflatten(-1, (self.n_heads, self.v_head_dim))
            zeros = per_head.new_zeros(*per_head.shape[:-1], self.qk_nope_head_dim)
            return torch.cat([zeros, per_head], dim=-1).flatten(-2)
        return gate

    def gated_norm(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Norm(x) + g."""
        return self.gate_norm(x) + gate

    def norm_input(self, kv: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The norm sees kv_t alone; the table is added after it."""
        return kv

    # ---- the absorbed decode -----------------------------------------------------------------
    def reads_fp8_as_stored(self, x: torch.Tensor, latent: torch.Tensor, ctx: AttnContext) -> bool:
        """'absorbed' where its Triton pass runs reads an fp8 cache as stored (egmla/kernels/bias_decode.py widens each
        tile); every other path reads it widened."""
        return (self.decode_path == "absorbed" and self.wants_triton("absorbed_backend", latent)
                and decode_kernel_can_run(x, latent, ctx, "EG-MLA bias absorbed"))

    def attend_absorbed(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        """The absorbed decode (`bias_absorbed_attention`) for one new token per sequence, reading the cached
        (mu, rho) and the token groups; several new tokens (prefill) take the gate-table rebuild.
        [batch, seq, heads, d_v]."""
        groups = self._checked_groups(ctx, "absorbed")
        if q_nope.shape[1] > 1:
            return self.attend_gate_table(q_nope, q_pe, latent, k_pe, kv_ids, ctx)
        wanted = self.wants_triton("absorbed_backend", latent)
        if wanted and decode_kernel_can_run(q_nope, latent, ctx, "EG-MLA bias absorbed"):
            return self.bias_absorbed_kernel(q_nope, q_pe, latent, k_pe, ctx, self._distinct_ids(ctx))
        mask, ids = self._registered_mask_and_ids(ctx, latent)
        if self.gate_table is None:
            self.build_gate_table()
        w_uk, w_uv = self.up_weights()
        norm = self.gate_norm
        out = bias_absorbed_attention(q_nope, q_pe, latent, k_pe, ctx.kv_ln_stats, groups.slots[:, :latent.shape[1]],
                                      self.gate(ids, use_table=True), mask, w_uk, w_uv, getattr(norm, "weight", None),
                                      getattr(norm, "bias", None), self.softmax_scale)
        return out.to(q_nope.dtype)

    def bias_absorbed_kernel(self, q_nope, q_pe, latent, k_pe, ctx: AttnContext, ids: torch.Tensor) -> torch.Tensor:
        """One decode step through egmla/kernels/bias_decode.py: `bias_absorbed_attention`'s
        equations in a few launches (a step is bound by launches, not by the cache: docs/benchmarks.md §2).
        [batch, 1, heads, d_v].

        The gate is linear in the embedding, g_v = W_UE e_v (the config refuses the identity start here), so the
        per-id terms go through e_v (d_e wide) rather than the gate rows (n_h (d_n + d_v) wide):
        q^C_h . g^K_{h,v} = (W^K_{UE,h}^T q^C_h) . e_v and sum_v P_{h,v} g^V_{h,v} = W^V_{UE,h} (sum_v P_{h,v} e_v),
        each a small Triton kernel that reads the distinct ids' rows of E straight from the table. Every per-query
        term is one batched matmul of q^C_h with `absorbed_weights().query`, and the output one batched matmul of
        [out_latent | mean | 1 | sum_v P_{h,v} e_v] with `.output`."""
        from egmla.kernels.bias_decode import bias_decode, mass_embeddings, per_id_scores

        weights = self.absorbed_weights()
        batch, d_c = q_nope.shape[0], self.kv_lora_rank
        proj = torch.einsum("bhn,hnk->bhk", q_nope[:, 0].to(weights.query.dtype),
                            weights.query)  # [batch, heads, d_c (+ d_e) + 2], read by the kernels as it is
        groups, vocab_size = ctx.kv_groups, self.gate_embed.num_embeddings
        # E, whose distinct ids' rows the kernels read where needed; under an offload (egmla.infer.offload) the rows
        # resident on the device, and the ids their slots in them
        table, ids = self.embedding_rows().kernel_rows(ids)
        # q^C_h . g^K_{h,v} for each distinct id [batch, heads, U]; the table on V alone has no score term
        per_id = per_id_scores(proj[..., d_c:-2], table, ids, groups.n_distinct) if weights.score_term else None
        lengths = ctx.registered_lengths()  # registered and visible
        # the output matmul's input, written by the kernels in its dtype (no cast launch before the matmul)
        inputs = torch.empty(batch, self.n_heads, weights.output.shape[1], dtype=weights.output.dtype,
                             device=latent.device)
        if self.bias_mass not in ("atomic", "grouped"):
            raise ValueError(f"bias_mass={self.bias_mass!r} (or EGMLA_BIAS_MASS): choose 'atomic' or 'grouped'")
        plan = None
        if self.bias_mass == "grouped":  # the grouped decode's per-step plan, shared by every layer of the step
            from egmla.kernels.grouped_decode import CHUNK

            host = groups.host
            bounds = (ctx.kv_len, max(host.distinct_bound, host.plan_distinct)) if ctx.capturable else None
            plan = groups.plan(CHUNK, vocab_size=vocab_size, bounds=bounds)
        # inputs[..., :d_c + 2] = [out_latent | mean | 1]
        _, _, mass = bias_decode(proj[..., :d_c], q_pe[:, 0], proj[..., -2:], latent, k_pe, ctx.kv_ln_stats,
                                 groups.slots[:, :latent.shape[1]], per_id, lengths, self.softmax_scale,
                                 combined=inputs, plan=plan, n_ids=ids.shape[1])
        mass_embeddings(mass, table, ids, groups.n_distinct, out=inputs[..., d_c + 2:])  # sum_v P_{h,v} e_v
        out = torch.einsum("bhk,hkd->bhd", inputs, weights.output)
        return out.unsqueeze(1).to(q_nope.dtype)

    def absorbed_weights(self) -> "AbsorbedWeights":
        """The decode weights, folded once in fp32 and kept in the model's dtype (bf16 ones put the
        step's two batched matmuls on the tensor cores: in fp32 they took 0.36 ms of a 3.6 ms step at batch 32 on the
        H200), rebuilt when a weight changes (in place or replaced: keyed by each source tensor's storage and version):
            query  [n_h, d_n, d_c + d_e + 2] = [gamma^K ⊙ W_UK | W^K_UE | gamma^K | beta^K]   (no W^K_UE for bias-v)
            output [n_h, d_c + 2 + d_e, d_v] = [(gamma^V ⊙ W_UV)^T ; -gamma^V ; beta^V ; W^V_UE^T]
        so that q^C_h [query] gives W_UK^T (gamma^K ⊙ q), the embedding-space query, gamma^K . q and beta^K . q, and
        [out_latent | mean | 1 | sum_v P_v e_v] [output] gives o_h = gamma^V ⊙ (W_UV s - mean) + beta^V + W^V_UE m."""
        norm = self.gate_norm
        sources = [self.wkv_b.weight, self.wue.weight] + [t for t in (getattr(norm, "weight", None),
                                                                     getattr(norm, "bias", None)) if t is not None]
        key = sources_key(self, *sources)
        cached = getattr(self, "_absorbed_weights", None)
        if cached is not None and cached.key == key:
            return cached
        with torch.no_grad():
            w_uk, w_uv = (w.float() for w in self.up_weights())  # [h, d_n, d_c], [h, d_v, d_c]
            widths = (self.qk_nope_head_dim, self.v_head_dim)

            def per_head(part, width: int) -> torch.Tensor:  # split_heads gives a scalar where the norm has no affine
                return part if torch.is_tensor(part) else torch.full((self.n_heads, width), part, device=w_uk.device)

            gamma_k, gamma_v = map(per_head, split_heads(getattr(norm, "weight", None), self.n_heads, widths[0], 1.0),
                                   widths)
            beta_k, beta_v = map(per_head, split_heads(getattr(norm, "bias", None), self.n_heads, widths[0], 0.0),
                                 widths)
            w_ue = self.wue.weight.float().unflatten(0, (self.n_heads, -1))  # [h, d_n + d_v (or d_v), d_e]
            score_term = self.gate_op != "bias-v"
            w_ue_k, w_ue_v = (w_ue.split([self.qk_nope_head_dim, self.v_head_dim], dim=1) if score_term
                              else (None, w_ue))
            query = [gamma_k[..., None] * w_uk] + ([w_ue_k] if score_term else []) + [gamma_k[..., None],
                                                                                     beta_k[..., None]]
            output = [(gamma_v[..., None] * w_uv).transpose(1, 2), -gamma_v[:, None], beta_v[:, None],
                      w_ue_v.transpose(1, 2)]
            dtype = self.wkv_b.weight.dtype
            self._absorbed_weights = AbsorbedWeights(key, torch.cat(query, dim=2).to(dtype).contiguous(),
                                                     torch.cat(output, dim=1).to(dtype).contiguous(), score_term)
        return self._absorbed_weights

    def embedding_rows(self) -> GateRows:
        """E_l's rows as the kernels read them: the embedding's weight, or the offload's stand-in."""
        return self.gate_embed if self.gates_offloaded else DeviceRows(self.gate_embed.weight)
