"""`egmla bench kernel-sweep`: tuning sweep of the Triton decode kernels (GPU). Every launch configuration
that returns the kernel's whole result is checked against the fp32 reference (bf16, rel. error < 1e-2) and timed
(CUDA-graph replays, median of CUDA events, L2 flushed read-only: egmla.bench.decode.median_us). Not checked, only
timed: `bias_pass` alone (its partial scores; the whole `bias_decode` at its fastest setting is checked), the
grouped decode's first one or two launches (`stages` 1, 2: partial results; the whole call is checked) and the
calibration rows.

    egmla bench kernel-sweep --out sweep.json

Prints, per kernel and shape, the configurations from fastest to slowest; the defaults in
egmla/kernels/*.py come from these runs (docs/kernels.md records them).
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os

from egmla.bench.options import read_result

HEADS, D_N, D_R, D_V, VOCAB = 12, 64, 64, 64, 32768


def timed(fn, check, device) -> dict:
    from egmla.bench.decode import graphed, median_us

    try:
        err = check(fn())
        run = graphed(fn)[0] if device.type == "cuda" else fn
        result = {"us": median_us(run, device, 10, 60), "rel_err": err}
    except Exception as exc:  # a configuration the compiler rejects (shared memory, registers): record it
        result = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    print("   ", result, flush=True)  # the partial log survives a timeout
    return result


def rel(out, ref):
    err = ((out.float() - ref).norm() / ref.norm()).item()
    if out.isnan().any() or not err < 1e-2:  # a fast wrong configuration must not win
        raise ValueError(f"wrong result: rel. error {err:.3g}, NaN {bool(out.isnan().any())}")
    return err


def sweep_mla(batch, length, d_c, device):
    import torch

    from egmla.kernels.mla_decode import mla_decode
    from egmla.kernels.mla_decode_ref import mla_decode_ref
    from egmla.kernels.split_combine import choose_num_splits

    q_latent = torch.randn(batch, HEADS, d_c, device=device, dtype=torch.bfloat16)
    q_pe = torch.randn(batch, HEADS, D_R, device=device, dtype=torch.bfloat16)
    latent = torch.randn(batch, length, d_c, device=device, dtype=torch.bfloat16)
    k_rope = torch.randn(batch, length, D_R, device=device, dtype=torch.bfloat16)
    lengths = torch.full((batch,), length, device=device)
    ref = mla_decode_ref(q_latent, q_pe, latent, k_rope, lengths, 0.088)
    rows = []
    for block_t, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3, 4)):
        auto = choose_num_splits(batch, 1, length, block_t, latent.device)
        for splits in sorted({max(1, auto // 2), auto, min(64, 2 * auto)}):
            cfg = dict(block_t=block_t, num_warps=warps, num_stages=stages, num_splits=splits)
            res = timed(lambda: mla_decode(q_latent, q_pe, latent, k_rope, lengths, 0.088, **cfg),
                        lambda o: rel(o, ref), device)
            rows.append({"kernel": f"mla_decode kv{d_c}", "batch": batch, "context": length, **cfg, **res})
    bytes_ = batch * length * (d_c + D_R) * 2
    for row in rows:
        if "us" in row:
            row["gbytes_per_s"] = bytes_ / row["us"] / 1e3
    return rows


def sweep_fp8(batch, length, device, configs=None, dtype=None):
    """MLA kv64's and MHA's decode kernels over a bf16 cache, an fp8 one and an fp8-keep-rope one (MLA's RoPE keys, MHA's
    K in bf16; the fp8 tiles widened where Triton places it and once in registers, egmla.kernels.fp8.widened), per
    launch setting; fp8 rows are checked against the reference on the same fp8 values. `gbytes_per_s`: the cache's own bytes. (In Triton's CPU interpreter nothing is
    compiled, and both fp8 forms run the same code.) configs: (block_t, num_warps, num_stages) triples; dtype: the
    query's and the 16-bit cache's (bf16; tests on the CPU pass fp16)."""
    import torch

    from egmla.attention.cache import FP8, quantize
    from egmla.kernels.gqa_decode import gqa_decode
    from egmla.kernels.gqa_decode_ref import gqa_decode_ref
    from egmla.kernels.mla_decode import mla_decode
    from egmla.kernels.mla_decode_ref import mla_decode_ref

    dtype = dtype or torch.bfloat16
    configs = configs or list(itertools.product((64, 128), (4, 8), (2, 3)))
    q = torch.randn(batch, HEADS, 64, device=device, dtype=dtype)
    q_pe = torch.randn(batch, HEADS, D_R, device=device, dtype=dtype)
    lengths = torch.full((batch,), length, device=device)
    rows = []
    wide = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
    def make_wide(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    def make_fp8(*shape):
        return quantize(torch.randn(*shape, device=device), FP8)

    for cache in (wide, "fp8", "fp8-keep-rope"):
        make = make_wide if cache == wide else make_fp8
        make_rope = make_wide if cache != "fp8" else make_fp8  # the RoPE keys: MLA's k_rope, MHA's K
        widen = (None,) if cache == wide else (False, True)
        for kernel in ("mla_decode kv64", "gqa_decode MHA"):
            if kernel.startswith("mla"):
                latent, k_rope = make(batch, length, 64), make_rope(batch, length, D_R)
                ref = mla_decode_ref(q, q_pe, latent, k_rope, lengths, 0.088)
                call = lambda **cfg: mla_decode(q, q_pe, latent, k_rope, lengths, 0.088, **cfg)  # noqa: E731
                bytes_ = latent.nbytes + k_rope.nbytes
            else:
                k, v = make_rope(batch, length, HEADS, D_N), make(batch, length, HEADS, D_V)
                ref = gqa_decode_ref(q, k, v, lengths, 0.088)
                call = lambda **cfg: gqa_decode(q, k, v, lengths, 0.088, **cfg)  # noqa: E731
                bytes_ = k.nbytes + v.nbytes
            for (block_t, warps, stages), once in itertools.product(configs, widen):
                cfg = dict(block_t=block_t, num_warps=warps, num_stages=stages)
                if once is not None:
                    cfg["widen_once"] = once
                res = timed(lambda: call(**cfg), lambda o: rel(o, ref), device)
                rows.append({"kernel": kernel, "cache": cache, "batch": batch, "context": length, **cfg, **res,
                             **({"gbytes_per_s": bytes_ / res["us"] / 1e3} if "us" in res else {})})
    return rows


def fp8_launch_defaults() -> dict:
    """The launch settings `mla_decode` and `gqa_decode` take when not given, per cache form of `sweep_fp8` (a
    sweep's JSON records them)."""
    import torch

    from egmla.kernels import gqa_decode as g
    from egmla.kernels import mla_decode as m

    wide, fp8 = torch.bfloat16, torch.float8_e4m3fn
    params = inspect.signature(m.mla_decode).parameters
    warps, stages = params["num_warps"].default, params["num_stages"].default
    mla = {form: {"block_t": tiles[0], "num_warps": warps, "num_stages": stages}
           for form, tiles in (("bf16", m.BLOCK_TS), ("fp8", m.BLOCK_TS), ("fp8-keep-rope", m.KEEP_ROPE_BLOCK_TS))}
    gqa = {}
    for form, (k, v) in (("bf16", (wide, wide)), ("fp8", (fp8, fp8)), ("fp8-keep-rope", (wide, fp8))):
        d = g.launch_defaults(k, v)
        gqa[form] = {"block_t": d["block_ts"][0], "num_warps": d["num_warps"], "num_stages": d["num_stages"]}
    return {"mla_decode kv64": mla, "gqa_decode MHA": gqa}


def fp8_markdown(json_path: str, md_path: str) -> None:
    """Per kernel and shape: the fastest setting of each cache form, and the fp8 forms' time against the 16-bit
    cache's."""
    data = read_result(json_path, "--markdown")
    rows = [r for r in data["rows"] if r.get("cache") and "us" in r]
    lines = [f"Decode kernels over an fp8 cache, {data.get('device', '?')}: the fastest launch setting of each form "
             f"(`egmla bench kernel-sweep --kernels fp8`; every setting in the JSON). µs per layer, CUDA-graph "
             f"replays; GB/s of the cache's own bytes.", "",
             "| kernel | B | T | cache | widened | best setting | µs | GB/s | × 16-bit cache's best | default setting's µs |",
             "|---|---:|---:|---|---|---|---:|---:|---:|---:|"]
    for key in dict.fromkeys((r["kernel"], r["batch"], r["context"]) for r in rows):
        mine = [r for r in rows if (r["kernel"], r["batch"], r["context"]) == key]
        forms, defaults = {}, {}
        default = data.get("defaults", {}).get(key[0]) or fp8_launch_defaults()[key[0]]  # as run, else today's
        for r in mine:
            form = (r["cache"], {None: "", False: "where Triton places it", True: "once"}[r.get("widen_once")])
            if form not in forms or r["us"] < forms[form]["us"]:
                forms[form] = r
            # files from before 2026-12-07's per-form defaults record one setting for every form
            mine_default = default if "block_t" in default else default.get(r["cache"], default.get("bf16", {}))
            if mine_default and all(r[k] == v for k, v in mine_default.items()):
                defaults[form] = r["us"]
        base = next((r for (cache, _), r in forms.items() if not cache.startswith("fp8")), None)  # the 16-bit cache's
        for (cache, widened), r in forms.items():
            setting = f"tiles {r['block_t']}, {r['num_warps']} warps, {r['num_stages']} stages"
            ratio = f"{r['us'] / base['us']:.2f}" if base else "-"
            at_default = f"{defaults[(cache, widened)]:.1f}" if (cache, widened) in defaults else "-"
            lines.append(f"| {key[0]} | {key[1]} | {key[2]:,} | {cache} | {widened or '-'} | {setting} | "
                         f"{r['us']:.1f} | {r.get('gbytes_per_s', 0):,.0f} | {ratio} | {at_default} |")
    open(md_path, "w").write("\n".join(lines) + "\n")


def sweep_egmla(batch, length, ids, device):
    import torch

    from egmla.kernels.egmla_decode import egmla_decode, layernorm_stats_triton
    from egmla.kernels.egmla_decode_ref import egmla_decode_ref
    from egmla.kernels.split_combine import choose_num_splits

    width = HEADS * (D_N + D_V)
    g = lambda *s, m=0.0, sd=1.0: (m + sd * torch.randn(*s, device=device)).to(torch.bfloat16)
    inputs = dict(q_nope=g(batch, HEADS, D_N), q_pe=g(batch, HEADS, D_R), latent=g(batch, length, 64),
                  k_rope=g(batch, length, D_R), token_ids=ids[:batch, :length].to(device),
                  lengths=torch.full((batch,), length, device=device), gate_table=g(VOCAB, width, m=1.0, sd=0.5),
                  wkv_b=g(width, 64, sd=0.125), norm_weight=g(width, m=1.0, sd=0.3), norm_bias=g(width, sd=0.3))
    stat_args = (inputs["latent"], inputs["token_ids"], inputs["gate_table"], inputs["wkv_b"], HEADS, D_N)
    stats = layernorm_stats_triton(*stat_args)
    ref = egmla_decode_ref(**inputs, scale=0.088)
    rows = []
    check = lambda out: rel(out, ref)  # noqa: E731
    for block_t, hp, warps in itertools.product((32, 64, 128), (1, 2, 4), (4, 8)):
        cfg = dict(block_t=block_t, heads_per_program=hp, num_warps=warps, num_stages=2)
        res = timed(lambda: egmla_decode(**inputs, ln_stats=stats, scale=0.088, **cfg), check, device)
        rows.append({"kernel": "egmla_decode kv64", "batch": batch, "context": length, **cfg, **res})
    best = min((r for r in rows if "us" in r), key=lambda r: r["us"], default=None)
    if best:  # pipelining depth and split count around the best tile shape
        cfg = {k: best[k] for k in ("block_t", "heads_per_program", "num_warps")}
        auto = choose_num_splits(batch, -(-HEADS // cfg["heads_per_program"]), length, cfg["block_t"], device)
        for stages, splits in [(3, None)] + [(2, s) for s in (max(1, auto // 2), 2 * auto, 4 * auto)]:
            more = dict(cfg, num_stages=stages, num_splits=splits)
            res = timed(lambda: egmla_decode(**inputs, ln_stats=stats, scale=0.088, **more), check, device)
            rows.append({"kernel": "egmla_decode kv64", "batch": batch, "context": length, **more, **res})
    for block_t in (32, 64, 128):
        res = timed(lambda: layernorm_stats_triton(*stat_args, block_t=block_t), lambda o: rel(o, stats), device)
        rows.append({"kernel": "layernorm_stats kv64", "batch": batch, "context": length, "block_t": block_t, **res})
    return rows


def bias_inputs(batch, length, ids, device, score_term: bool) -> dict:
    """`bias_decode`'s inputs at paper-base widths (kv64), bf16 on a GPU: random queries and cache, the slots of
    real token ids (each sequence's distinct ids numbered in order of first appearance, as the cache's groups do)."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    slots = torch.empty(batch, length, dtype=torch.int32)
    for b in range(batch):
        _, first = torch.unique(ids[b, :length], return_inverse=True)
        order = torch.full((int(first.max()) + 1,), length, dtype=torch.long).scatter_reduce_(
            0, first, torch.arange(length), "amin").argsort()  # unique ids by first position
        slots[b] = torch.empty_like(order).scatter_(0, order, torch.arange(len(order)))[first].int()
    n_ids = int(slots.max()) + 1
    r = lambda *shape, sd=1.0: (sd * torch.randn(*shape)).to(device, dtype)  # noqa: E731
    stats = torch.stack([0.1 * torch.randn(batch, length), 1 + 0.1 * torch.rand(batch, length)], -1).to(device)
    return dict(q_absorbed=r(batch, HEADS, 64), q_pe=r(batch, HEADS, D_R), q_terms=torch.randn(batch, HEADS, 2,
                device=device), latent=r(batch, length, 64), k_rope=r(batch, length, D_R), ln_stats=stats,
                slots=slots.to(device), per_id=torch.randn(batch, HEADS, n_ids, device=device) if score_term else None,
                lengths=torch.full((batch,), length, device=device), scale=0.088, n_ids=n_ids)


def sweep_bias(batch, length, source, ids, device, configs=None):
    """The table controls' decode (egmla/kernels/bias_decode.py) beside MLA's pass over the same latents: the pass
    alone (`bias_pass`) per tile, warps and pipeline stages, with the per-id score term (the K/V table,
    egmla-kv64-bias) and without it (the V table, -bias-v); then the whole `bias_decode` (pass, split combine, the
    mass's zeros, the atomic mass) at the default and at the fastest pass setting, so that combine + mass = whole -
    pass. MLA's `mla_decode` at its defaults is the anchor: its pass reads the same latents with 12 B less per
    position and writes no scores."""
    import torch

    from egmla.kernels.bias_decode import bias_decode, bias_pass
    from egmla.kernels.bias_decode_ref import bias_decode_ref
    from egmla.kernels.mla_decode import mla_decode
    from egmla.kernels.mla_decode_ref import mla_decode_ref

    configs = configs or list(itertools.product((32, 64, 128), (4, 8), (2, 3, 4)))
    rows = []
    base = {"kernel": "bias_decode kv64", "batch": batch, "context": length, "ids": source}
    for score_term in (True, False):
        args = bias_inputs(batch, length, ids, device, score_term)
        table = "K/V table" if score_term else "V table"
        if score_term:  # the anchor, on the same latents
            mla = {k: args[k] for k in ("q_pe", "latent", "k_rope", "lengths", "scale")}
            mla_ref = mla_decode_ref(args["q_absorbed"], **mla)
            res = timed(lambda: mla_decode(args["q_absorbed"], **mla), lambda o: rel(o, mla_ref), device)
            rows.append({**base, "ids": None, "kernel": "mla_decode kv64 (anchor)", **res})
        ref = torch.cat([x.flatten() for x in bias_decode_ref(**args)])
        pass_args = {k: v for k, v in args.items() if k != "n_ids"}
        check_whole = lambda out: rel(torch.cat([x.flatten() for x in out]), ref)  # noqa: E731
        passes = []
        for block_t, warps, stages in configs:
            cfg = dict(block_t=block_t, num_warps=warps, num_stages=stages)
            res = timed(lambda: bias_pass(**pass_args, **cfg), lambda out: 0.0, device)
            passes.append({**base, "table": table, "launch": "pass", **cfg, **res})
        rows += passes
        best = min((r for r in passes if "us" in r), key=lambda r: r["us"], default=None)
        for label, cfg in [("whole (defaults)", {})] + (
                [("whole (fastest pass)", {k: best[k] for k in ("block_t", "num_warps", "num_stages")})] if best else []):
            res = timed(lambda: bias_decode(**args, **cfg), check_whole, device)
            rows.append({**base, "table": table, "launch": label, **cfg, **res})
    return rows


def sweep_mass(batch, length, source, ids, device, d_e=512, configs=None):
    """The table controls' value term sum_u mass_u e_u (`mass_embeddings`, egmla/kernels/bias_decode.py) per launch
    setting, over each sequence's distinct ids of real text (in order of first appearance, as the cache keeps
    them) and a paper-base table (32,768 x 512, bf16 on a GPU), the mass in the [batch, id, head] layout
    `bias_decode` returns."""
    import torch

    from egmla.kernels.bias_decode import mass_embeddings, mass_splits
    from egmla.kernels.bias_decode_ref import mass_embeddings_ref

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    distinct = []
    for b in range(batch):  # each sequence's distinct ids in order of first appearance
        unique, inverse = torch.unique(ids[b, :length], return_inverse=True)
        first = torch.full((len(unique),), length).scatter_reduce_(0, inverse, torch.arange(length), "amin")
        distinct.append(unique[first.argsort()])
    n_cols = max(len(d) for d in distinct)
    id_rows = torch.zeros(batch, n_cols, dtype=torch.int32)
    for b, d in enumerate(distinct):
        id_rows[b, :len(d)] = d.int()
    n_ids = torch.tensor([len(d) for d in distinct], device=device)
    id_rows, table = id_rows.to(device), (0.02 * torch.randn(VOCAB, d_e)).to(device, dtype)
    mass = torch.rand(batch, n_cols, HEADS, device=device).transpose(1, 2)
    ref = mass_embeddings_ref(mass, table, id_rows, n_ids)
    base = {"kernel": "mass_embeddings d_e 512", "batch": batch, "context": length, "ids": source,
            "distinct_ids_mean": float(n_ids.float().mean())}
    rows = []
    # splits 0: the default's choice (ids split over programs at small batch), 1: one launch, no split
    configs = configs or list(itertools.product((16, 32, 64, 128), (16, 32, 64), (2, 4), (2, 3), (0, 1)))
    for block_e, block_u, warps, stages, splits in configs:
        cfg = dict(block_e=block_e, block_u=block_u, num_warps=warps, num_stages=stages, splits=splits)
        res = timed(lambda: mass_embeddings(mass, table, id_rows, n_ids, **cfg), lambda out: rel(out, ref), device)
        chosen = splits or mass_splits(batch * -(-d_e // block_e), n_cols, block_u)
        rows.append({**base, **cfg, "splits": chosen, "splits_auto": not splits, **res})
    return rows


GROUPED_ABSORB = [(32, 4), (64, 1), (64, 2), (128, 1)]  # (ids, heads) per program
GROUPED_LAUNCHES = ("absorb", "attend", "upproj")


def sweep_grouped(batch, length, source, ids, device, launches=GROUPED_LAUNCHES):
    """The three grouped launches one at a time (grouped_decode's `stages`): the absorb launch alone; the attend
    launch as (absorb + attend) - absorb, per chunk size and warps; the up-projection as the whole call - (absorb +
    attend), per form, rows per program, splits and warps. Every other launch keeps the defaults of its row.
    `launches`: which of the three to sweep."""
    import torch

    from egmla.bench.grouped import fp32_reference, grouped_inputs, kernel_inputs
    from egmla.kernels.grouped_decode import CHUNK, grouped_decode, make_plan
    from egmla.variants import variant_config

    config = variant_config("egmla-kv64", "paper-base", max_seq_len=length)  # the model's own EG-MLA kv64 layer
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn, args, groups = grouped_inputs(config, batch, length, ids[:batch, :length].to(device), device, dtype)
    case, ref = kernel_inputs(attn, args), fp32_reference(attn, args, groups)
    plans = {chunk: make_plan(groups, chunk) for chunk in (16, 32)}
    base = {"kernel": "grouped_decode kv64", "batch": batch, "context": length, "ids": source,
            "distinct_ids_per_sequence": groups.n_distinct.float().mean().item()}
    rows = []
    absorb_w, attend_w, upproj_w = inspect.signature(grouped_decode).parameters["num_warps"].default

    def run(launch, stages, chunk, **cfg):
        call = lambda: grouped_decode(plan=plans[chunk], stages=stages, **case, **cfg)  # noqa: E731
        return timed(call, (lambda o: rel(o, ref)) if stages == 3 else (lambda o: 0.0), device)

    for warps, (ids_, heads) in itertools.product((2, 4, 8), GROUPED_ABSORB if "absorb" in launches else ()):
        if warps == 8 and heads > 1:
            continue
        cfg = dict(num_warps=(warps, attend_w, upproj_w), block_ids=ids_, heads_per_program=heads)
        rows.append({**base, "launch": "absorb", "absorb_warps": warps, "block_ids": ids_, "heads_per_program": heads,
                     **run("absorb", 1, 16, **cfg)})
    for chunk, warps in itertools.product((16, 32), (1, 2) if "attend" in launches else ()):
        first, both = run("absorb", 1, chunk), run("attend", 2, chunk, num_warps=(absorb_w, warps, upproj_w))
        row = {**base, "launch": "attend", "chunk": chunk, "attend_warps": warps, **both}
        if "us" in both and "us" in first:
            row.update(us=both["us"] - first["us"], us_with_absorb=both["us"])
        rows.append(row)
    # (gate_dot, rows, splits, warps, warp_specialize); gate_dot: fewer registers per row
    upproj = [(False, r, s, w, False) for r, s, w in itertools.product((64, 128), (1, 2), (2, 4))]
    upproj += [(True, r, s, w, False) for r, s, w in itertools.product((64, 128, 256), (1, 2), (4, 8))]
    if device.type == "cuda":  # Triton's automatic warp specialization of the row loop: 8 warps on sm_90
        upproj += [(g, r, 1, 8, True) for g, r in itertools.product((True, False), (128, 256))]
    two = run("attend", 2, 16) if "upproj" in launches else None
    for gate_dot, rows_, splits, warps, specialize in upproj if "upproj" in launches else ():
        res = run("upproj", 3, 16, num_warps=(absorb_w, attend_w, warps), block_rows=rows_, num_splits=splits,
                  gate_dot=gate_dot, warp_specialize=specialize)
        row = {**base, "launch": "upproj", "block_rows": rows_, "splits": splits, "upproj_warps": warps,
               "gate_dot": gate_dot, "warp_specialize": specialize, **res}
        if "us" in res and "us" in two:
            row.update(us=res["us"] - two["us"], us_whole=res["us"])
        rows.append(row)
    defaults = {k: v.default for k, v in inspect.signature(grouped_decode).parameters.items()
                if k in ("block_ids", "heads_per_program", "block_rows", "num_warps", "gate_dot")}
    rows.append({**base, "launch": "all (defaults)", "settings": f"chunk {CHUNK}, " + ", ".join(
        f"{k} {v}" for k, v in defaults.items()), **run("all", 3, CHUNK)})
    return rows


SETTINGS = {"absorb": ("absorb_warps", "block_ids", "heads_per_program"), "attend": ("chunk", "attend_warps"),
            "upproj": ("block_rows", "splits", "upproj_warps", "gate_dot", "warp_specialize"), "all (defaults)": ()}


def grouped_markdown(json_path: str, md_path: str, top: int = 4) -> None:
    """Per launch and token-id source, the fastest settings of a grouped sweep as a Markdown table."""
    from pathlib import Path

    data = read_result(json_path, "--markdown")
    rows = [r for r in data["rows"] if r.get("kernel") == "grouped_decode kv64" and "us" in r]
    lines = [f"<!-- generated by `egmla bench kernel-sweep --markdown {json_path} {md_path}` -->",
             f"{data['device']}; grouped_decode, paper-base heads, bf16 (fp32 on a CPU), B = {rows[0]['batch']}, "
             f"T = {rows[0]['context']}; µs per launch (differences of nested launches, CUDA-graph replays, L2 "
             f"flushed read-only); the fastest {top} settings per launch and ids, then the row of today's defaults.", "",
             "| ids | distinct ids / sequence | launch | setting | µs |", "|---|---:|---|---|---:|"]
    for source in dict.fromkeys(r["ids"] for r in rows):
        for launch, keys in SETTINGS.items():
            group = sorted((r for r in rows if r["ids"] == source and r["launch"] == launch), key=lambda r: r["us"])
            for r in group[:top]:
                setting = ", ".join(f"{k} {r[k]}" for k in keys if k in r) or r.get("settings", "")
                lines.append(f"| {source} | {r['distinct_ids_per_sequence']:.0f} | {launch} | {setting} | {r['us']:.1f} |")
    Path(md_path).write_text("\n".join(lines) + "\n")


def mass_markdown(json_path: str, md_path: str, top: int = 5) -> None:
    """Per shape, a mass sweep's fastest settings of the embedding sum and the default's row, as a Markdown table."""
    from pathlib import Path

    data = read_result(json_path, "--markdown")
    rows = [r for r in data["rows"] if r.get("kernel", "").startswith("mass_embeddings") and "us" in r]
    default = data.get("defaults", {}).get("mass_embeddings", {})
    keys = ("block_e", "block_u", "num_warps", "num_stages")
    split = any("splits" in r for r in rows)  # files from before the split over ids: one launch, no column
    lines = [f"<!-- generated by `egmla bench kernel-sweep --markdown {json_path} {md_path}` -->",
             f"{data['device']}; the table controls' embedding sum (`mass_embeddings`, bias_decode.py), paper-base "
             f"heads and table (d_e 512), each sequence's distinct ids of English text; µs (CUDA-graph replays, L2 "
             f"flushed read-only); the fastest {top} settings per shape, then the default "
             f"({', '.join(f'{k} {default[k]}' for k in keys if k in default) or 'not recorded'}"
             f"{', the ids split over programs where the batch gives few (splits: how many ranges)' if split else ''}"
             f").", "",
             "| B | T | distinct ids / sequence | setting | µs | × default |", "|---:|---:|---:|---|---:|---:|"]
    for shape in dict.fromkeys((r["batch"], r["context"]) for r in rows):
        group = sorted((r for r in rows if (r["batch"], r["context"]) == shape), key=lambda r: r["us"])
        base = next((r for r in group if all(r[k] == default.get(k) for k in keys) and r.get("splits_auto", True)),
                    None)
        # the default's launch without the split over ids, where the default splits: what the split gains
        whole = next((r for r in group if base and split and all(r[k] == base[k] for k in keys)
                      and r["splits"] == 1 and base["splits"] > 1), None)
        shown = group[:top] + [r for r in (base, whole) if r and r not in group[:top]]
        for r in sorted(shown, key=lambda r: r["us"]):
            ratio = f"{base['us'] / r['us']:.2f}" if base else ""
            setting = ", ".join(f"{k} {r[k]}" for k in keys + (("splits",) if split else ())) + (
                " (default)" if r is base else "")
            lines.append(f"| {shape[0]} | {shape[1]} | {r['distinct_ids_mean']:.0f} | {setting} | {r['us']:.1f} "
                         f"| {ratio} |")
    Path(md_path).write_text("\n".join(lines) + "\n")


def bias_markdown(json_path: str, md_path: str) -> None:
    """Per shape and table, a bias sweep's pass at its default and fastest settings beside MLA's pass over the same
    latents, and the whole decode at both (combine + mass = whole - pass), as a Markdown table."""
    from pathlib import Path

    data = read_result(json_path, "--markdown")
    rows = [r for r in data["rows"] if "us" in r]
    # files written before the defaults were recorded ran with tiles of 64, 4 warps and 2 stages
    ran_with = data.get("defaults", {}).get("bias_pass", {"block_t": 64, "num_warps": 4, "num_stages": 2})
    tile, warps, stages = ran_with["block_t"], ran_with["num_warps"], ran_with["num_stages"]
    lines = [f"<!-- generated by `egmla bench kernel-sweep --markdown {json_path} {md_path}` -->",
             f"{data['device']}; the table controls' decode (bias_decode.py), paper-base heads, kv64, bf16 (fp32 on a "
             f"CPU), code ids; µs (CUDA-graph replays, L2 flushed read-only). Pass: `bias_pass` alone, at the default "
             f"(tiles of {tile}, {warps} warps, {stages} stages) and the fastest setting swept; whole: "
             f"`bias_decode` (pass, split combine, the mass's zeros, the atomic mass) at each.", "",
             "| B × T | table | MLA pass | pass, default | pass, fastest (setting) | fastest ÷ MLA | whole, default | "
             "whole, fastest pass | combine + mass |", "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for batch, length in dict.fromkeys((r["batch"], r["context"]) for r in rows):
        here = [r for r in rows if (r["batch"], r["context"]) == (batch, length)]
        mla = next((r["us"] for r in here if r["kernel"] == "mla_decode kv64 (anchor)"), None)
        for table in dict.fromkeys(r["table"] for r in here if "table" in r):
            mine = [r for r in here if r.get("table") == table]
            passes = sorted((r for r in mine if r["launch"] == "pass"), key=lambda r: r["us"])
            default = next((r["us"] for r in passes if (r["block_t"], r["num_warps"], r["num_stages"])
                            == (tile, warps, stages)), None)
            whole = {r["launch"]: r["us"] for r in mine if r["launch"].startswith("whole")}
            fast = passes[0] if passes else None
            whole_fast = whole.get("whole (fastest pass)")
            cells = [mla, default, None if fast is None else fast["us"],
                     None if fast is None or mla is None else fast["us"] / mla, whole.get("whole (defaults)"),
                     whole_fast, None if fast is None or whole_fast is None else whole_fast - fast["us"]]
            text = [("-" if x is None else f"{x:.2f}" if i == 3 else f"{x:.1f}") for i, x in enumerate(cells)]
            if fast:
                text[2] += f" (tiles of {fast['block_t']}, {fast['num_warps']} warps, {fast['num_stages']} stages)"
            lines.append(f"| {batch} × {length:,} | {table} | " + " | ".join(text) + " |")
    Path(md_path).write_text("\n".join(lines) + "\n")


def calibration(batch, length, device) -> list[dict]:
    """What this timing method gives for the bytes MLA kv64 must read, without any attention math:
    one tiny kernel (the fixed cost of a timed graph replay), a PyTorch sum and a copy of the cache."""
    import torch

    cache = torch.randn(batch, length, 64 + D_R, device=device, dtype=torch.bfloat16)
    copy, one = torch.empty_like(cache), torch.zeros(1, device=device)
    rows = []
    for name, fn, bytes_ in [("tiny kernel", lambda: one.add_(1), 0), ("sum of the kv64 cache", lambda: cache.sum(), cache.nbytes),
                             ("copy of the kv64 cache", lambda: copy.copy_(cache), 2 * cache.nbytes)]:
        print(name)
        res = timed(fn, lambda out: 0.0, device)
        rows.append({"kernel": "calibration", "batch": batch, "context": length, "what": name, **res,
                     "gbytes_per_s": bytes_ / res["us"] / 1e3 if "us" in res else None})
    return rows


def profile_once(batch, length, ids, device):
    """Launch each kernel twice with its default configuration (run under ncu)."""
    import torch

    from egmla.kernels.egmla_decode import egmla_decode, layernorm_stats_triton
    from egmla.kernels.mla_decode import mla_decode

    q = torch.randn(batch, HEADS, 64, device=device, dtype=torch.bfloat16)
    latent = torch.randn(batch, length, 64, device=device, dtype=torch.bfloat16)
    k_rope = torch.randn(batch, length, D_R, device=device, dtype=torch.bfloat16)
    lengths = torch.full((batch,), length, device=device)
    width = HEADS * (D_N + D_V)
    gate = (1 + 0.5 * torch.randn(VOCAB, width, device=device)).to(torch.bfloat16)
    wkv_b = (0.125 * torch.randn(width, 64, device=device)).to(torch.bfloat16)
    token_ids = ids[:batch, :length].to(device)
    for _ in range(2):
        mla_decode(q, q, latent, k_rope, lengths, 0.088)
        stats = layernorm_stats_triton(latent, token_ids, gate, wkv_b, HEADS, D_N)
        egmla_decode(q, q, latent, k_rope, token_ids, stats, lengths, gate, wkv_b, None, None, 0.088)
    torch.cuda.synchronize()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="32x4096", help="comma-separated BATCHxCONTEXT")
    parser.add_argument("--kernels", default="mla,egmla", help="comma-separated: mla, egmla (the fused rebuild), "
                        "grouped (the three launches of the grouped decode, one at a time, on code and English ids), "
                        "bias (the table controls' pass per launch setting and their whole decode, beside MLA's pass, "
                        "on code ids), mass (the table controls' per-id embedding sum per launch setting, on English "
                        "ids), fp8 (MLA kv64's and MHA's decode over a bf16, an fp8 and an fp8-keep-rope cache, the "
                        "fp8 tile widened where Triton places it and once in registers)")
    parser.add_argument("--grouped-launches", default=",".join(GROUPED_LAUNCHES),
                        help="with --kernels grouped: which launches to sweep (comma-separated: "
                             f"{', '.join(GROUPED_LAUNCHES)})")
    parser.add_argument("--markdown", nargs=2, metavar=("JSON", "MD"),
                        help="write a grouped, bias, mass or fp8 sweep's table and exit")
    parser.add_argument("--top", type=int, default=8, help="configurations printed per kernel and shape")
    parser.add_argument("--out", help="JSON of every configuration")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only with TRITON_INTERPRET=1 (checks the script)")
    parser.add_argument("--profile", action="store_true", help="only launch each kernel twice (run under ncu)")


def main(args) -> int:
    import torch

    from egmla.bench.token_ids import text_token_ids

    if args.markdown:
        kernels = {r.get("kernel") for r in json.loads(open(args.markdown[0]).read())["rows"]}
        rows = json.loads(open(args.markdown[0]).read())["rows"]
        writer = (fp8_markdown if any(r.get("cache") for r in rows) else
                  bias_markdown if "bias_decode kv64" in kernels else
                  mass_markdown if any(str(k).startswith("mass_embeddings") for k in kernels) else grouped_markdown)
        writer(*args.markdown)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; the sweep times kernels on a GPU (on a CPU, "
                         "TRITON_INTERPRET=1 with --device cpu and small --shapes, e.g. 2x64, only checks the script)")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--device cpu: Triton runs kernels on a CPU only in its interpreter: set TRITON_INTERPRET=1 "
                         "(slow: keep --shapes small, e.g. 2x64)")
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    ids, _ = text_token_ids(max(b for b, _ in shapes), max(t for _, t in shapes), VOCAB, "embedded")
    if args.profile:
        profile_once(*shapes[0], ids, device)
        return 0
    rows = []
    for batch, length in shapes:
        if device.type == "cuda":
            rows += calibration(batch, length, device)
        if "mla" in args.kernels.split(","):
            rows += sweep_mla(batch, length, 64, device) + sweep_mla(batch, length, 256, device)
        if "egmla" in args.kernels.split(","):
            rows += sweep_egmla(batch, length, ids, device)
        if "grouped" in args.kernels.split(","):
            for source in ("python-source", "embedded"):
                source_ids = ids if source == "embedded" else text_token_ids(batch, length, VOCAB, source)[0]
                rows += sweep_grouped(batch, length, source, source_ids, device, args.grouped_launches.split(","))
        if "bias" in args.kernels.split(","):
            rows += sweep_bias(batch, length, "python-source", text_token_ids(batch, length, VOCAB, "python-source")[0],
                               device)
        if "mass" in args.kernels.split(","):
            rows += sweep_mass(batch, length, "embedded", ids, device)
        if "fp8" in args.kernels.split(","):
            rows += sweep_fp8(batch, length, device)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {device_name}")
    for r in rows:
        if r["kernel"] == "calibration":
            print(f"calibration B={r['batch']} T={r['context']}: {r['what']}: {r.get('us', 0):.1f} us, "
                  f"{r.get('gbytes_per_s') or 0:.0f} GB/s")
    fields = ("kernel", "batch", "context", "ids", "table", "launch", "cache")
    for key in dict.fromkeys(tuple(r.get(f) for f in fields) for r in rows if r["kernel"] != "calibration"):
        group = [r for r in rows if tuple(r.get(f) for f in fields) == key]
        ok = sorted((r for r in group if "us" in r), key=lambda r: r["us"])
        where = f" ids {key[3]}" if key[3] else ""
        where += f", {key[4]}" if key[4] else ""
        where += f", launch {key[5]}" if key[5] else ""
        where += f", {key[6]} cache" if key[6] else ""
        print(f"== {key[0]} B={key[1]} T={key[2]}{where}: {len(ok)} ran, {len(group) - len(ok)} failed")
        for r in ok[: args.top]:
            print("  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                  if k not in ("kernel", "batch", "context")))
    if args.out:
        from egmla.kernels.bias_decode import BIAS_STAGES, BLOCK_TS, MASS_EMBED_LAUNCH

        # the defaults this code ran with, so that a table made later from the file names them, not today's
        defaults = {"bias_pass": {"block_t": BLOCK_TS[0], "num_warps": 4, "num_stages": BIAS_STAGES},
                    "mass_embeddings": MASS_EMBED_LAUNCH, **fp8_launch_defaults()}
        with open(args.out, "w") as f:
            json.dump({"device": device_name, "defaults": defaults, "rows": rows}, f, indent=1)
    return 0
