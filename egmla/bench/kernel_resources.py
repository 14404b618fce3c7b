"""`egmla bench kernel-resources`: registers, spills and shared memory of the Triton decode kernels (and of the CUDA
study, through nvcc), compiled for a GPU architecture on any machine (no GPU needed: the installed Triton compiles for
the target and its bundled cuobjdump reads the cubin).

    egmla bench kernel-resources --kernels grouped,mla,gluon --arch 90

Why: the grouped decode's launches are latency-bound at low occupancy (docs/grouped-decode.md), and occupancy is
set by registers per thread. Nsight Compute reads them on a GPU; this reads them where there is none, for the
paper-base shapes and each launch setting listed below. Compiled like a real launch: pointers and strides
specialised as multiples of 16. With the GPU's Triton version the numbers agree with Nsight Compute within 5
registers (Triton 3.6 for sm_90 against ncu on an H200: absorb 134 / 130, attend 70 / 70, up-projection 181 / 182);
another Triton version allocates differently (3.9 gives the same absorb launch 255 registers and spills), so
run it with the version your GPU runs (e.g. `pip install --target DIR triton==3.6.0`, then `PYTHONPATH=DIR`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import tempfile

REGISTERS_PER_QUADRANT, QUADRANTS, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 16384, 4, 64, 32


def occupancy(regs: int, warps: int) -> tuple[int, float]:
    """(programs per SM, fraction of the SM's 64 warp slots) as registers allow. Each of an SM's four quadrants
    holds 16,384 registers and allocates them per warp in units of 256 (registers per thread rounded up to 8);
    this reproduces Nsight Compute's "Block Limit Registers" on an H200 (6 programs at 130 registers and 2 warps,
    14 at 70, 4 at 182). Shared memory and the block limit can bind too; registers bind first for these kernels."""
    per_warp = -(-max(regs, 1) // 8) * 8 * 32
    warp_slots = min(QUADRANTS * (REGISTERS_PER_QUADRANT // per_warp), MAX_WARPS_PER_SM)
    programs = min(warp_slots // warps, MAX_BLOCKS_PER_SM)
    return programs, programs * warps / MAX_WARPS_PER_SM


def signature(fn, constexprs: dict, pointer_types: dict, default_pointer: str = "*bf16") -> tuple[dict, dict]:
    """(signature, attrs) for triton.compile: constexprs as given, arguments typed by `pointer_types` where it names
    them, else `*_ptr` arguments default_pointer, `qk_scale` fp32, other arguments i32; pointers and strides marked
    divisible by 16, as a launch with aligned tensors and such strides specialises them."""
    sig, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = pointer_types.get(name) or (default_pointer if name.endswith("_ptr") else (
            "fp32" if name == "qk_scale" else "i32"))
        if name.endswith("_ptr") or name.startswith("stride"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, attrs


def resources(fn, constexprs: dict, pointer_types: dict, num_warps: int, arch: int, num_stages: int | None = None,
              gluon: bool = False) -> dict:
    """Compile `fn` (a @triton.jit kernel, or a @gluon.jit one with gluon=True) for sm_<arch> and read its resource
    usage from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    sig, attrs = signature(fn, constexprs, pointer_types)
    const = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options=options)
    regs, stack, shared, local = cubin_resources(kernel.asm["cubin"])
    programs, occ = occupancy(regs, num_warps)
    return {"registers": regs, "spill_stack_bytes": stack, "shared_bytes": max(shared, kernel.metadata.shared),
            "local_bytes": local, "programs_per_sm_by_registers": programs, "occupancy_by_registers": occ,
            **instruction_forms(kernel.asm["ptx"])}


# PTX instructions that say which of a GPU's ways to multiply and to copy a kernel compiled to. On sm_90 (Hopper)
# `wgmma` is the warpgroup's asynchronous tensor-core product (Triton emits it for a dot of >= 4 warps whose operands
# it can stage in shared memory), `mma.sync` the warp's synchronous one of sm_80; `cp.async` copies 4-16 bytes per
# thread from global to shared memory without registers, `cp.async.bulk` is the TMA's copy of a whole tile;
# `ld.shared.b8` counts single-byte shared-memory reads (an fp8 tile read transposed for a dot, egmla.kernels.fp8).
PTX_FORMS = {"wgmma": r"\bwgmma\.mma_async\b", "mma.sync": r"\bmma\.sync\b",
             "cp.async": r"\bcp\.async\.(?:ca|cg)\b", "tma": r"\bcp\.async\.bulk\b",
             "ld.shared.b8": r"\bld\.shared\.[bsu]8\b"}


def _form_key(name: str) -> str:
    return "ptx_" + name.replace(".", "_")  # 'mma.sync' -> 'ptx_mma_sync', a row's JSON key


def instruction_forms(ptx: str) -> dict:
    """How often each of PTX_FORMS appears in a kernel's PTX (static counts, loops unrolled as compiled)."""
    return {_form_key(name): len(re.findall(pattern, ptx)) for name, pattern in PTX_FORMS.items()}


def forms_text(row: dict) -> str:
    """'wgmma 4, cp.async 12': the non-zero PTX_FORMS counts of a row."""
    found = [f"{name} {row[_form_key(name)]}" for name in PTX_FORMS if row.get(_form_key(name))]
    return ", ".join(found) or "no tensor-core product or async copy"


def cubin_resources(cubin: bytes, function: str | None = None) -> tuple[int, int, int, int]:
    """(registers per thread, spill stack bytes, static shared bytes, local bytes) of `function` in `cubin` (None: its
    first function), read by the cuobjdump that Triton's NVIDIA backend bundles (a minimal CUDA toolkit may lack one)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True,
                              check=True).stdout
    prefix = rf"Function {re.escape(function)}:\s*" if function else ""
    found = re.search(prefix + r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not found:
        raise RuntimeError(f"no resource usage{' for ' + function if function else ''} in cuobjdump's output: "
                           f"{text[-300:]}")
    return tuple(map(int, found.groups()))


def _grouped_cases():
    from egmla.kernels import grouped_decode as g
    from egmla.kernels.grouped_decode import CHUNK

    heads, d = 12, 64
    common = dict(N_HEADS=heads, D_C=d, DOT_PRECISION="tf32")
    ints = {name: "*i32" for name in ("ids_ptr", "n_distinct_ptr", "order_ptr", "order_slots_ptr", "slots_ptr",
                                      "lengths_ptr",
                                      "row_chunk_ptr", "row_ids_ptr")}
    fp32 = {name: "*fp32" for name in ("q_sum_ptr", "q_bias_ptr", "acc_ptr", "chunk_ptr", "stats_ptr", "out_ptr")}
    types = {**ints, **fp32, "id_to_row_ptr": "*i64"}  # (unread: ROW_MAP off, the gate table on the device)
    for ids, per, warps in ((64, 1, 4), (32, 4, 2), (128, 1, 4)):
        yield ("grouped absorb", f"{ids} ids x {per} heads, {warps} warps", g._absorb_kernel,
               dict(common, D_N=d, D_V=d, BLOCK_N=d, BLOCK_C=d, BLOCK_U=ids, BLOCK_V=d, HEADS=per, HAS_WEIGHT=True,
                    HAS_BIAS=True, ZERO_ACC=True, ROW_MAP=False, SCALED=False), types, warps)
    for chunk, warps in ((CHUNK, 1), (32, 2)):
        yield ("grouped attend", f"chunks of {chunk}, {warps} warps", g._attend_kernel,
               dict(common, D_R=d, BLOCK_H=16, BLOCK_C=d, BLOCK_R=d, BLOCK_T=chunk, KEY_GATHER=False, WIDEN_ONCE=False,
                    SCALED=False), types, warps)
    for (rows, warps), gate_dot in itertools.product(((128, 2), (128, 4), (64, 2), (256, 8)), (False, True)):
        yield ("grouped upproj", f"{rows} rows, {warps} warps{', gate_dot' if gate_dot else ''}", g._upproj_kernel,
               dict(common, D_N=d, D_V=d, BLOCK_H=16, BLOCK_V=d, BLOCK_C=d, BLOCK_ROWS=rows, BLOCK_K=256,
                    BLOCK_T=CHUNK, HAS_WEIGHT=True, HAS_BIAS=True, ATOMIC=False, GATE_DOT=gate_dot, ROW_MAP=False,
                    SCALED=False, WARP_SPECIALIZE=False),  # every constexpr given: an absent one is a runtime argument
               {**types, "out_ptr": "*bf16"}, warps)
    # A and S in fp8 with a scale per (row, head) (grouped_decode(intermediates="fp8"), measured slower), at the default
    # settings
    scaled = {**types, "a_ptr": "*fp8e4nv", "s_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "s_scale_ptr": "*fp32"}
    yield ("grouped absorb", "fp8 A and S: 64 ids x 1 heads, 4 warps", g._absorb_kernel,
           dict(common, D_N=d, D_V=d, BLOCK_N=d, BLOCK_C=d, BLOCK_U=64, BLOCK_V=d, HEADS=1, HAS_WEIGHT=True,
                HAS_BIAS=True, ZERO_ACC=True, ROW_MAP=False, SCALED=True), scaled, 4)
    yield ("grouped attend", f"fp8 A and S: chunks of {CHUNK}, 1 warp", g._attend_kernel,
           dict(common, D_R=d, BLOCK_H=16, BLOCK_C=d, BLOCK_R=d, BLOCK_T=CHUNK, KEY_GATHER=False, WIDEN_ONCE=False,
                SCALED=True), scaled, 1)
    yield ("grouped upproj", "fp8 A and S: 128 rows, 4 warps, gate_dot", g._upproj_kernel,
           dict(common, D_N=d, D_V=d, BLOCK_H=16, BLOCK_V=d, BLOCK_C=d, BLOCK_ROWS=128, BLOCK_K=256, BLOCK_T=CHUNK,
                HAS_WEIGHT=True, HAS_BIAS=True, ATOMIC=False, GATE_DOT=True, ROW_MAP=False, SCALED=True,
                WARP_SPECIALIZE=False), {**scaled, "out_ptr": "*bf16"}, 4)


def _mla_cases():
    from egmla.kernels import mla_decode as m

    for tile, stages, warps in ((64, 3, 4), (64, 2, 4), (128, 3, 4)):
        yield ("mla_decode kv64", f"tiles of {tile}, {warps} warps (stages {stages}: shared memory)",
               m._mla_decode_kernel,
               dict(N_HEADS=12, D_C=64, D_R=64, BLOCK_H=16, BLOCK_C=64, BLOCK_R=64, BLOCK_T=tile, DOT_PRECISION="tf32",
                    ONE_SPLIT=False, PDL=True, FP16_DOTS=False, WIDEN_ONCE=False, ROPE_FP16=False),
               {"lengths_ptr": "*i64", "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32"}, warps,
               stages)


def _fp8_cases():
    """MLA's and MHA's decode kernels, the bias controls' pass and EG-MLA's grouped attend launch over an fp8 cache
    under a bf16 query, the tile read transposed by the value product widened where Triton places it and once in
    registers (egmla.kernels.fp8.widened), beside bf16's; then MLA's and MHA's over fp8-keep-rope (the RoPE keys, MHA's
    K, in bf16 beside the fp8 latent / V), widened once."""
    from egmla.kernels import bias_decode as b
    from egmla.kernels import gqa_decode as g
    from egmla.kernels import grouped_decode as gd
    from egmla.kernels import mla_decode as m
    from egmla.kernels.grouped_decode import CHUNK

    partials = {"lengths_ptr": "*i64", "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32"}
    bias = {"q_terms_ptr": "*fp32", "stats_ptr": "*fp32", "slots_ptr": "*i32", "per_id_ptr": "*fp32",
            "lengths_ptr": "*i64", "part_acc_ptr": "*fp32", "part_stats_ptr": "*fp32", "scores_ptr": "*fp32"}
    for cache, once in (("bf16", False), ("fp8", False), ("fp8", True)):
        fp8 = cache == "fp8"
        how = f"{cache} cache" + (f", widened {'once in registers' if once else 'where Triton places it'}" if fp8 else "")
        yield ("mla_decode kv64", f"{how}, tiles of 64, 4 warps, stages 3", m._mla_decode_kernel,
               dict(N_HEADS=12, D_C=64, D_R=64, BLOCK_H=16, BLOCK_C=64, BLOCK_R=64, BLOCK_T=64, DOT_PRECISION="tf32",
                    ONE_SPLIT=False, PDL=True, FP16_DOTS=fp8, WIDEN_ONCE=once, ROPE_FP16=fp8),
               {**partials, **({"latent_ptr": "*fp8e4nv", "k_rope_ptr": "*fp8e4nv"} if fp8 else {})}, 4, 3)
        yield ("gqa_decode MHA", f"{how}, tiles of 64, 4 warps, stages 2", g._gqa_decode_kernel,
               dict(N_HEADS=12, N_KV_HEADS=12, GROUP=1, HEAD_DIM=64, BLOCK_G=16, BLOCK_D=64, BLOCK_T=64,
                    DOT_PRECISION="tf32", ONE_SPLIT=False, PDL=True, FP16_DOTS=fp8, WIDEN_ONCE=once),
               {**partials, **({"k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv"} if fp8 else {})}, 4, 2)
        yield ("bias pass kv64", f"{how}, K/V table, tiles of 64, 4 warps, stages 2", b._bias_decode_kernel,
               dict(N_HEADS=12, D_C=64, D_R=64, BLOCK_H=16, BLOCK_C=64, BLOCK_R=64, BLOCK_T=64, DOT_PRECISION="tf32",
                    HAS_ID_SCORE=True, WIDEN_ONCE=once),
               {**bias, **({"latent_ptr": "*fp8e4nv", "k_rope_ptr": "*fp8e4nv"} if fp8 else {})}, 4, 2)
        grouped = {**{name: "*i32" for name in ("order_ptr", "order_slots_ptr", "lengths_ptr")},
                   **{name: "*fp32" for name in ("stats_ptr", "q_sum_ptr", "q_bias_ptr", "chunk_ptr")}}
        yield ("grouped attend kv64", f"{how}, chunks of {CHUNK}, 1 warp", gd._attend_kernel,
               dict(N_HEADS=12, D_C=64, D_R=64, BLOCK_H=16, BLOCK_C=64, BLOCK_R=64, BLOCK_T=CHUNK, KEY_GATHER=False,
                    DOT_PRECISION="tf32", WIDEN_ONCE=once, SCALED=False),
               {**grouped, **({"latent_ptr": "*fp8e4nv", "k_rope_ptr": "*fp8e4nv"} if fp8 else {})}, 1)
    how = "fp8-keep-rope cache, widened once in registers"  # at the format's own default launch (its best, swept)
    yield ("mla_decode kv64", f"{how}, tiles of 128, 4 warps, stages 3", m._mla_decode_kernel,
           dict(N_HEADS=12, D_C=64, D_R=64, BLOCK_H=16, BLOCK_C=64, BLOCK_R=64, BLOCK_T=128, DOT_PRECISION="tf32",
                ONE_SPLIT=False, PDL=True, FP16_DOTS=True, WIDEN_ONCE=True, ROPE_FP16=False),
           {**partials, "latent_ptr": "*fp8e4nv"}, 4, 3)
    yield ("gqa_decode MHA", f"{how}, tiles of 128, 8 warps, stages 3", g._gqa_decode_kernel,
           dict(N_HEADS=12, N_KV_HEADS=12, GROUP=1, HEAD_DIM=64, BLOCK_G=16, BLOCK_D=64, BLOCK_T=128,
                DOT_PRECISION="tf32", ONE_SPLIT=False, PDL=True, FP16_DOTS=False, WIDEN_ONCE=True),
           {**partials, "v_ptr": "*fp8e4nv"}, 8, 3)


def _bias_cases():
    from egmla.kernels import bias_decode as b

    pointers = {"q_terms_ptr": "*fp32", "stats_ptr": "*fp32", "slots_ptr": "*i32", "per_id_ptr": "*fp32",
                "lengths_ptr": "*i64", "part_acc_ptr": "*fp32", "part_stats_ptr": "*fp32", "scores_ptr": "*fp32"}
    for score_term, (tile, stages, warps) in itertools.product((True, False), ((64, 2, 4), (64, 3, 4), (32, 2, 4))):
        yield ("bias pass kv64", f"{'K/V' if score_term else 'V'} table, tiles of {tile}, {warps} warps, stages {stages}",
               b._bias_decode_kernel,
               dict(N_HEADS=12, D_C=64, D_R=64, BLOCK_H=16, BLOCK_C=64, BLOCK_R=64, BLOCK_T=tile, DOT_PRECISION="tf32",
                    HAS_ID_SCORE=score_term, WIDEN_ONCE=False), pointers, warps, stages)


def _step_cases():
    """The decode step's small kernels at paper-base widths (d_model 768, SwiGLU 2,048, kv64 + d_r 64)."""
    from egmla.kernels import decode_context as dc
    from egmla.kernels import decode_elementwise as e
    from egmla.kernels import egmla_decode as ed
    from egmla.kernels import kv_append as ka
    from egmla.kernels import latent_append as la
    from egmla.kernels import rope as r
    from egmla.kernels import token_groups as tg

    yield ("rope", "16 rows of 32 pairs, 4 warps", r._rope_kernel, dict(HALF=32, BLOCK_R=16, BLOCK_D=32),
           {"cos_ptr": "*fp32", "sin_ptr": "*fp32"}, 4)
    yield ("add_rms_norm", "4 rows of 768, 4 warps", e._add_rms_norm_kernel,
           dict(DIM=768, BLOCK_D=1024, BLOCK_R=4, HAS_WEIGHT=True), {"eps": "fp32"}, 4)
    yield ("silu_mul", "blocks of 1,024, 4 warps", e._silu_mul_kernel, dict(DIM=2048, BLOCK_D=1024), {}, 4)
    yield ("latent_append", "kv64 + d_r 64 and 12 query heads' RoPE, 4 warps", la._latent_append_kernel,
           dict(D_C=64, HALF=32, BLOCK_C=64, BLOCK_H=32, HAS_WEIGHT=True, HAS_OUT=False, Q_HEADS=12, BLOCK_Q=16),
           {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64", "eps": "fp32"}, 4)
    yield ("latent_append_stats", "kv64 + d_r 64, a head's statistics (12 of 128) and query RoPE, 4 warps",
           la._latent_append_stats_kernel,
           dict(D_C=64, HALF=32, BLOCK_C=64, BLOCK_H=32, HAS_WEIGHT=True, N_HEADS=12, WIDTH=128, BLOCK_W=128,
                BLOCK_HEADS=16, GATE=0, RMS=False, HAS_Q=True),
           {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64", "eps": "fp32", "ids_ptr": "*i64",
            "part_ptr": "*fp32", "arrivals_ptr": "*i32", "stats_ptr": "*fp32", "stats_eps": "fp32"}, 4)
    yield ("kv_append", "MHA: 12 query and 12 K/V heads of 64, 4 warps", ka._kv_append_kernel,
           dict(N_HEADS=12, N_KV=12, D=64, HALF=32, BLOCK_Q=16, BLOCK_KV=16, BLOCK_HALF=32, BLOCK_D=64),
           {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64"}, 4)
    yield ("token_groups", f"append one, blocks of {tg.BLOCK_IDS} ids, 4 warps", tg._append_one_kernel,
           dict(BLOCK=tg.BLOCK_IDS), {**{name: "*i64" for name in ("ids_ptr", "positions_ptr", "n_new_ptr",
                                                                   "n_distinct_ptr", "lengths_ptr")},
                                      **{name: "*i32" for name in ("distinct_ptr", "slots_ptr", "counts_ptr",
                                                                   "ranks_ptr")}}, 4)
    yield ("decode_context", "32 RoPE pairs, 1 warp", dc._decode_context_kernel, dict(HALF=32, BLOCK=32, HAS_IDS=True),
           {**{name: "*i64" for name in ("lengths_ptr", "tokens_ptr", "positions_ptr", "rows_ptr",
                                         "decode_lengths_ptr")},
            "token_ids_ptr": "*i32", "cos_table_ptr": "*fp32", "sin_table_ptr": "*fp32", "cos_ptr": "*fp32",
            "sin_ptr": "*fp32"}, 1)
    yield ("ln_stats_merge", "12 heads, 64 rows, at cache positions, 2 warps", ed._ln_stats_merge_kernel,
           dict(N_HEADS=12, WIDTH=128, BLOCK_H=16, BLOCK_R=64, RMS=False, AT_POSITIONS=True, PDL=False),
           {"part_ptr": "*fp32", "stats_ptr": "*fp32", "positions_ptr": "*i64", "eps": "fp32"}, 2)


GLUON_POINTERS = {**{name: "*i32" for name in ("order_ptr", "oslots_ptr", "offsets_ptr", "ids_ptr", "n_distinct_ptr",
                                                 "lengths_ptr")},
                  **{name: "*fp32" for name in ("stats_ptr", "part_acc_ptr", "part_ml_ptr")}}


def _gluon_cases():
    from egmla.kernels.studies import grouped_gluon as g

    for warps in ((2, 2), (4, 1), (2, 4)):
        n_warps = warps[0] * warps[1]
        yield ("grouped gluon", f"16 ids x 4 heads, tiles of 64, warps {warps[0]} x {warps[1]}",
               g._grouped_gluon_kernel,
               dict(N_HEADS=12, N_GROUPS=3, HAS_WEIGHT=True, HAS_BIAS=True, WARPS_M=warps[0], WARPS_N=warps[1],
                    ITEMS_ONLY=False, num_warps=n_warps), GLUON_POINTERS, n_warps)


def _scratch_cases():
    from egmla.kernels.studies import grouped_scratch as g

    ints = {name: "*i32" for name in ("order_ptr", "order_slots_ptr", "lengths_ptr", "ids_ptr", "row_chunk_ptr",
                                      "row_ids_ptr")}
    fp32 = {name: "*fp32" for name in ("stats_ptr", "q_sum_ptr", "q_bias_ptr", "chunk_ptr", "part_o_ptr",
                                       "part_stats_ptr")}
    for range_len, rows, warps in ((256, 64, 4), (256, 32, 4), (512, 64, 8)):
        yield ("grouped scratch", f"ranges of {range_len}, {rows} rows, {warps} warps", g._scratch_kernel,
               dict(N_HEADS=12, D_N=64, D_V=64, D_C=64, D_R=64, BLOCK_H=16, BLOCK_N=64, BLOCK_V=64, BLOCK_C=64,
                    BLOCK_R=64, BLOCK_T=16, RANGE=range_len, BLOCK_U=16, BLOCK_ROWS=rows, HAS_WEIGHT=True,
                    HAS_BIAS=True, DOT_PRECISION="tf32"), {**ints, **fp32}, warps)


# the CUDA study's settings (heads per block, segment): compiled by nvcc, not Triton (cuda_resources)
CUDA_SETTINGS = ((4, 512), (2, 512), (4, 256))


def cuda_resources(heads_per_block: int, segment: int, arch: int) -> dict:
    """Registers and spills of studies/grouped_decode_cuda.cu's fused kernel at paper-base (12 heads), compiled by
    nvcc for sm_<arch> (its shared memory is dynamic, sizeof(Smem): read on a GPU). Two warps per head."""
    from egmla.kernels.cuda_build import compile_cubin, find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        raise SystemExit("--kernels cuda needs nvcc (the CUDA toolkit): none on PATH or under CUDA_HOME")
    defines = {"N_HEADS": 12, "HPB": heads_per_block, "SEG": segment, "MIN_BLOCKS": 1}
    cubin = compile_cubin("studies/grouped_decode_cuda.cu", defines, str(arch), nvcc)
    regs, stack, _, local = cubin_resources(cubin, "grouped_fused")
    warps = 2 * heads_per_block
    programs, occ = occupancy(regs, warps)
    return {"registers": regs, "spill_stack_bytes": stack, "shared_bytes": None, "local_bytes": local,
            "programs_per_sm_by_registers": programs, "occupancy_by_registers": occ, "num_warps": warps}


KERNELS = {"grouped": _grouped_cases, "mla": _mla_cases, "fp8": _fp8_cases, "bias": _bias_cases, "step": _step_cases,
           "gluon": _gluon_cases, "scratch": _scratch_cases, "cuda": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernels", default="grouped,mla",
                        help=f"comma-separated: {', '.join(KERNELS)} (fp8: MLA's and MHA's decode, the bias pass and "
                        f"the grouped attend launch over an fp8 cache, its tile widened where Triton places it and "
                        f"once in registers, beside bf16's, then MLA's and MHA's over fp8-keep-rope; "
                        f"bias: the table controls' pass, bias_decode.py; "
                        f"step: the decode step's RoPE, add + RMSNorm, SwiGLU activation, MLA and MHA appends, context, token-groups append "
                        f"and statistics merge kernels; "
                        f"gluon: studies/grouped_gluon.py, Triton >= 3.6; scratch: studies/grouped_scratch.py; "
                        f"cuda: studies/grouped_decode_cuda.cu through nvcc, registers and spills only)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer: 90 = sm_90 (H100, "
                        "H200), 80 = sm_80 (A100)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")


def main(args) -> int:
    from egmla.kernels import interpreting

    if interpreting():
        raise SystemExit("TRITON_INTERPRET=1 turns the kernels into Python functions that cannot be compiled: "
                         "run `egmla bench kernel-resources` without it")
    import triton

    unknown = [k for k in args.kernels.split(",") if k not in KERNELS]
    if unknown:
        raise SystemExit(f"--kernels: unknown {', '.join(unknown)}; choose from {', '.join(KERNELS)}")
    rows = []
    print(f"Triton {triton.__version__}, compiled for sm_{args.arch} (no GPU needed); registers per thread, spill "
          f"stack bytes, shared memory, programs per SM that the registers allow, and the PTX's tensor-core products "
          f"(wgmma: Hopper's; mma.sync: Ampere's) and asynchronous copies (cp.async; tma: cp.async.bulk)")
    for name in args.kernels.split(","):
        if name == "cuda":
            for per_block, segment in CUDA_SETTINGS:
                row = {"kernel": "grouped cuda", "setting": f"{per_block} heads per block, segments of {segment}",
                       "arch": args.arch, "compiler": "nvcc", **cuda_resources(per_block, segment, args.arch)}
                rows.append(row)
                print(f"  {row['kernel']:<20} {row['setting']:<44} regs {row['registers']:>3}  spills "
                      f"{row['spill_stack_bytes']:>5} B  shared (dynamic)  {row['programs_per_sm_by_registers']:>2} "
                      f"blocks/SM ({100 * row['occupancy_by_registers']:.0f}% of warp slots)", flush=True)
            continue
        for kernel, setting, fn, constexprs, types, warps, *stages in KERNELS[name]():
            row = {"kernel": kernel, "setting": setting, "num_warps": warps, "arch": args.arch,
                   "triton": triton.__version__}
            row.update(resources(fn, constexprs, types, warps, args.arch, stages[0] if stages else None,
                                 gluon=name == "gluon"))
            rows.append(row)
            print(f"  {kernel:<20} {setting:<44} regs {row['registers']:>3}  spills {row['spill_stack_bytes']:>5} B  "
                  f"shared {row['shared_bytes']:>6} B  {row['programs_per_sm_by_registers']:>2} programs/SM "
                  f"({100 * row['occupancy_by_registers']:.0f}% of warp slots)  {forms_text(row)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 0
