"""`egmla bench kernel-resources`: the occupancy rule and an offline compile (no GPU)."""
import importlib.util
import os

import pytest

from egmla.bench.kernel_resources import forms_text, instruction_forms, occupancy
from egmla.kernels.cuda_build import find_nvcc


def test_occupancy_reproduces_nsight_compute_on_an_h200():
    # (registers, warps) -> theoretical occupancy that ncu read for the grouped launches (docs/grouped-decode.md)
    assert occupancy(130, 2) == (6, 0.1875)
    assert occupancy(70, 2) == (14, 0.4375)
    assert occupancy(182, 2) == (4, 0.125)
    assert occupancy(32, 1) == (32, 0.5)  # the 32-program limit binds before registers
    assert occupancy(255, 8)[0] == 1


def test_instruction_forms_count_the_ptx_products_and_copies():
    ptx = """
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
    wgmma.fence.sync.aligned;
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};
    cp.async.cg.shared.global [%r1], [%rd2], 16;
    cp.async.ca.shared.global [%r1], [%rd2], 4;
    cp.async.commit_group;
    cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r3], [%rd4, {%r5, %r6}], [%r7];
    ld.shared.u8 %rs1, [%r8];
    ld.shared.b8 %rs2, [%r9];
    ld.shared.v4.b32 {%r1, %r2, %r3, %r4}, [%r10];
    """
    forms = instruction_forms(ptx)
    assert forms == {"ptx_wgmma": 1, "ptx_mma_sync": 1, "ptx_cp_async": 2, "ptx_tma": 1,  # fences, commits not counted
                     "ptx_ld_shared_b8": 2}  # single-byte shared reads only
    assert forms_text(forms) == "wgmma 1, mma.sync 1, cp.async 2, tma 1, ld.shared.b8 2"
    assert forms_text(instruction_forms("ld.global.b32 %r1, [%rd1];")) == "no tensor-core product or async copy"


def _cuobjdump_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))


def compile_offline(tmp_path, kernels: str) -> tuple[list[dict], str]:
    """`egmla bench kernel-resources --kernels KERNELS` as its own process (the kernel tests import the kernels under
    TRITON_INTERPRET=1, which the tool refuses): its rows and its output."""
    import json
    import subprocess
    import sys

    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "egmla", "bench", "kernel-resources", "--kernels", kernels, "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())["rows"], done.stdout


@pytest.mark.skipif(not _cuobjdump_available(), reason="needs Triton's NVIDIA backend (ptxas, cuobjdump) installed")
def test_mla_kernel_compiles_offline_and_reports_its_registers(tmp_path):
    rows, stdout = compile_offline(tmp_path, "mla")
    assert [r["kernel"] for r in rows] == ["mla_decode kv64"] * 3
    for row in rows:
        assert 16 <= row["registers"] <= 255 and row["spill_stack_bytes"] >= 0 and row["shared_bytes"] > 0
        assert row["programs_per_sm_by_registers"] in range(1, 33)
        assert row["ptx_mma_sync"] + row["ptx_wgmma"] > 0 and row["ptx_cp_async"] > 0  # tensor cores, pipelined loads
    more_stages = {r["setting"]: r["shared_bytes"] for r in rows}
    assert more_stages["tiles of 64, 4 warps (stages 3: shared memory)"] > more_stages["tiles of 64, 4 warps (stages 2: shared memory)"]
    assert "compiled for sm_90" in stdout


@pytest.mark.skipif(not _cuobjdump_available(), reason="needs Triton's NVIDIA backend (ptxas, cuobjdump) installed")
def test_grouped_launches_compile_offline_with_every_setting_given(tmp_path):
    """The grouped decode's three launches compile for sm_90 in every listed setting (the up-projection's
    warp-specialisation flag included: left out, it compiled as a runtime argument and the pass asserted), with A and
    S in fp8 too (intermediates="fp8", each launch once)."""
    rows, _ = compile_offline(tmp_path, "grouped")
    assert {r["kernel"] for r in rows} == {"grouped absorb", "grouped attend", "grouped upproj"}
    assert sum(r["kernel"] == "grouped upproj" for r in rows) == 9
    assert sum(r["setting"].startswith("fp8 A and S") for r in rows) == 3
    for row in rows:
        assert 16 <= row["registers"] <= 255 and row["ptx_mma_sync"] + row["ptx_wgmma"] > 0


@pytest.mark.skipif(not _cuobjdump_available(), reason="needs Triton's NVIDIA backend (ptxas, cuobjdump) installed")
def test_bias_pass_compiles_offline_for_both_tables(tmp_path):
    """The table controls' pass, with and without the per-id score term, compiles for sm_90 and reports its
    resources; the gather of per-id scores needs shared memory of its own (its [heads, positions] tile)."""
    rows, stdout = compile_offline(tmp_path, "bias")
    rows = {r["setting"]: r for r in rows}
    assert len(rows) == 6 and all(16 <= r["registers"] <= 255 for r in rows.values())
    with_term, without = rows["K/V table, tiles of 64, 4 warps, stages 2"], rows["V table, tiles of 64, 4 warps, stages 2"]
    assert with_term["shared_bytes"] > without["shared_bytes"]


@pytest.mark.skipif(not _cuobjdump_available(), reason="needs Triton's NVIDIA backend (ptxas, cuobjdump) installed")
def test_decode_step_kernels_compile_for_the_gpu_without_spills(tmp_path):
    """The decode step's small kernels (RoPE, add + RMSNorm, SwiGLU's activation, MLA's one-launch append and
    EG-MLA's with its statistics, MHA's, the step's context, the token-groups append, the statistics merge writing at cache positions) compile
    for sm_90 here, without a GPU: a GPU-only code path whose kernel would not compile fails on the CPU first."""
    rows, stdout = compile_offline(tmp_path, "step")
    rows = {r["kernel"]: r for r in rows}
    assert sorted(rows) == ["add_rms_norm", "decode_context", "kv_append", "latent_append", "latent_append_stats",
                            "ln_stats_merge", "rope", "silu_mul", "token_groups"]
    assert all(16 <= r["registers"] <= 128 and r["spill_stack_bytes"] == 0 for r in rows.values())


@pytest.mark.skipif(not _cuobjdump_available(), reason="needs Triton's NVIDIA backend (ptxas, cuobjdump) installed")
@pytest.mark.skipif(find_nvcc() is None, reason="no nvcc here")
def test_cuda_study_reports_registers_through_nvcc(tmp_path, monkeypatch):
    """The CUDA study's kernel compiles for sm_90 with nvcc here and reports its registers (no spills at the
    settings timed on the GPU)."""
    monkeypatch.setenv("EGMLA_CUDA_CACHE", str(tmp_path / "cache"))
    rows, stdout = compile_offline(tmp_path, "cuda")
    assert [r["setting"] for r in rows] == ["4 heads per block, segments of 512", "2 heads per block, segments of 512",
                                            "4 heads per block, segments of 256"]
    assert all(64 <= r["registers"] <= 255 and r["spill_stack_bytes"] == 0 for r in rows)
    assert rows[0]["programs_per_sm_by_registers"] == 1 and rows[0]["num_warps"] == 8


def test_interpreter_mode_is_a_clear_error(monkeypatch):
    from egmla.bench.cli import run

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="without it"):
        run("kernel-resources", ["--kernels", "mla"])


@pytest.mark.skipif(not _cuobjdump_available(), reason="needs Triton's NVIDIA backend (ptxas, cuobjdump) installed")
def test_an_fp8_tile_is_widened_once_not_read_byte_by_byte(tmp_path):
    """MLA's and MHA's decode, the bias controls' pass and EG-MLA's grouped attend launch over an fp8 cache: where
    Triton places the widening, the value product reads its transposed fp8 operand one byte at a time from shared
    memory; widened once in registers (the launch's default on a GPU, egmla.kernels.fp8.widened), no single-byte read
    is left and the dots stay on the tensor cores. fp8-keep-rope (MLA's bf16 RoPE keys beside its fp8 latent, MHA's bf16
    K beside its fp8 V) too."""
    rows, _ = compile_offline(tmp_path, "fp8")
    assert len(rows) == 14 and sum("grouped attend" in row["kernel"] for row in rows) == 3
    assert sum("fp8-keep-rope cache" in row["setting"] for row in rows) == 2
    for row in rows:
        fp8, once = "fp8 cache" in row["setting"], "once in registers" in row["setting"]
        assert row["ptx_mma_sync"] + row["ptx_wgmma"] > 0 and row["ptx_cp_async"] > 0
        assert (row["ptx_ld_shared_b8"] > 0) == (fp8 and not once), row
