"""The persistent Gluon grouped decode kernel (egmla/kernels/studies/grouped_gluon.py) vs the PyTorch reference
(grouped_decode_ref.py). Gluon kernels do not run in Triton's CPU interpreter: on the CPU the kernel is compiled
for sm_90 (every compile error shows there) and its input checks are tested; the comparisons run on a GPU."""
import importlib.util

import pytest
import torch

from tests.kernels.conftest import needs_cuda, poisoned, rel_err, requires_triton
from tests.kernels.test_grouped_decode import make_case
from tests.kernels.test_kernel_resources import _cuobjdump_available


def _gluon_importable() -> bool:
    """The kernel module imports (Triton with Gluon's mma_v2 and cp.async, as 3.6 and later have)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import egmla.kernels.studies.grouped_gluon  # noqa: F401
    except (ImportError, AttributeError):
        return False
    return True


pytestmark = [requires_triton, pytest.mark.skipif(not _gluon_importable(),
                                                  reason="this Triton lacks the Gluon APIs the kernel uses")]


def run_gluon(case, groups, bounds=None, **kernel_args):
    from egmla.kernels.grouped_decode import make_plan
    from egmla.kernels.grouped_decode_ref import grouped_decode_ref
    from egmla.kernels.studies.grouped_gluon import grouped_decode_gluon

    ref = grouped_decode_ref(slots=groups.slots, distinct_ids=groups.distinct_ids, lengths=groups.lengths, **case)
    plan = make_plan(groups, bounds=bounds)
    out = poisoned(ref.shape, case["latent"].dtype, case["latent"].device)
    grouped_decode_gluon(plan=plan, out=out, **case, **kernel_args)
    return out, ref


@pytest.mark.skipif(not _cuobjdump_available(), reason="needs Triton's NVIDIA backend (ptxas, cuobjdump) installed")
def test_compiles_for_hopper_without_a_gpu(tmp_path):
    """The kernel compiles for sm_90 with the installed Triton (no GPU needed; in a process of its own, as the
    interpreter these tests run under cannot compile) and fits two programs per SM."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.json"
    done = subprocess.run([sys.executable, "-m", "egmla", "bench", "kernel-resources", "--kernels", "gluon", "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(row["kernel"] == "grouped gluon" and row["arch"] == 90 for row in rows)
    default = next(row for row in rows if "warps 2 x 2" in row["setting"])  # grouped_decode_gluon's default
    assert default["shared_bytes"] <= 227 * 1024 // 2  # two programs per SM
    assert 0 < default["registers"] <= 255


def test_unsupported_inputs_say_why():
    from egmla.kernels.studies.grouped_gluon import grouped_decode_gluon, supported

    case, groups = make_case(1, 2, 16, 16, 16, 16, [5], 30, torch.float32, "cpu")
    reason = supported(case["q_nope"], case["latent"], case["k_rope"], case["wkv_b"])
    assert reason is not None and "GPU" in reason
    from egmla.kernels.grouped_decode import make_plan
    with pytest.raises(ValueError, match="grouped_decode"):
        grouped_decode_gluon(plan=make_plan(groups), **case)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_matches_reference_paper_base(dtype, norm):
    """Paper-base shapes, ragged lengths (1 to 4,096), ids mostly distinct, 20 ids, and one id filling the
    context (one item of 64 tiles); every output written, finite, within 1e-2 of the fp32 reference."""
    torch.manual_seed(0)
    lengths = [1, 700, 2049, 4096]
    for high in (None, 20, 1):
        case, groups = make_case(4, 12, 64, 64, 64, 64, lengths, 32768, dtype, "cuda", norm=norm, high=high)
        out, ref = run_gluon(case, groups)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-2, (high, rel_err(out, ref))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("programs_per_sm", [1, 2])
def test_bounds_past_the_ids_and_odd_head_count(programs_per_sm):
    """A plan sized by host bounds beyond the distinct ids (graph capture: empty items are skipped), 10 heads
    (a partial head group), an empty sequence (output 0), and sequences sharing ids."""
    torch.manual_seed(1)
    case, groups = make_case(3, 10, 64, 64, 64, 64, [300, 0, 1000], 200, torch.bfloat16, "cuda", high=150)
    out, ref = run_gluon(case, groups, bounds=(2048, 1100), programs_per_sm=programs_per_sm)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_equals_three_launch_path():
    """Same inputs through grouped_decode (three launches) and the Gluon kernel: bf16 outputs agree."""
    from egmla.kernels.grouped_decode import grouped_decode, make_plan

    torch.manual_seed(2)
    case, groups = make_case(8, 12, 64, 64, 64, 64, [4096] * 8, 32768, torch.bfloat16, "cuda", high=600)
    out, _ = run_gluon(case, groups)
    three = grouped_decode(plan=make_plan(groups), **case)
    assert rel_err(out, three) < 1e-2
