"""The fused CUDA grouped EG-MLA decode (egmla.kernels.studies.grouped_decode_cuda.cu) vs the PyTorch reference on a GPU
(bf16, paper-base head dims): mostly distinct ids, few ids, one id filling the context, ragged lengths with an empty
sequence and one of a single position, LayerNorm and RMSNorm, several heads counts and segment sizes, CUDA-graph
replay. Without a GPU: the source compiles for sm_90 wherever nvcc is found, and unsupported inputs are refused."""
import pytest
import torch

from egmla.kernels.cuda_build import find_nvcc
from tests.kernels.conftest import needs_cuda, poisoned, rel_err, requires_triton
from tests.kernels.test_grouped_decode import make_case

pytestmark = requires_triton


def run_cuda(case, groups, **kwargs):
    from egmla.kernels.grouped_decode import make_plan
    from egmla.kernels.studies.grouped_decode_cuda import grouped_decode_cuda
    from egmla.kernels.grouped_decode_ref import grouped_decode_ref

    ref = grouped_decode_ref(slots=groups.slots, distinct_ids=groups.distinct_ids, lengths=groups.lengths, **case)
    out = poisoned(ref.shape, torch.bfloat16, "cuda")
    grouped_decode_cuda(plan=make_plan(groups), out=out, **case, **kwargs)
    return out, ref


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("heads,segment,per_block", [(12, 512, 4), (12, 64, 3), (2, 128, 1), (16, 256, 4),
                                                     (12, 192, 5)])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_cuda_kernel_matches_reference(heads, segment, per_block, norm):
    lengths = [1, 700, 0, 2049, 4096]
    for high in (None, 20, 1, 300):  # mostly distinct, 20 ids, one id, a few hundred
        case, groups = make_case(len(lengths), heads, 64, 64, 64, 64, lengths, 32768, torch.bfloat16, "cuda",
                                 norm=norm, high=high)
        out, ref = run_cuda(case, groups, segment=segment, heads_per_block=per_block)
        assert torch.isfinite(out).all()
        assert rel_err(out[2].float(), torch.zeros_like(ref[2])) == 0 or out[2].abs().max() == 0  # empty sequence
        assert rel_err(out, ref) < 1e-2, (high, rel_err(out, ref))


@pytest.mark.gpu
@needs_cuda
def test_cuda_kernel_replays_in_a_cuda_graph():
    from egmla.kernels.grouped_decode import make_plan
    from egmla.kernels.studies.grouped_decode_cuda import grouped_decode_cuda

    case, groups = make_case(4, 12, 64, 64, 64, 64, [300, 1000, 64, 5], 32768, torch.bfloat16, "cuda", high=200)
    plan = make_plan(groups, bounds=(groups.slots.shape[1], groups.slots.shape[1]))
    out = torch.empty(4, 12, 64, dtype=torch.bfloat16, device="cuda")
    grouped_decode_cuda(plan=plan, out=out, **case)  # builds the kernel and derived weights before capture
    expected = out.clone()
    out.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grouped_decode_cuda(plan=plan, out=out, **case)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.skipif(find_nvcc() is None, reason="no nvcc here: the GPU tests build the kernel with NVRTC or nvcc")
def test_source_compiles_for_sm90_where_nvcc_is_found(tmp_path, monkeypatch):
    from egmla.kernels.cuda_build import compile_cubin

    monkeypatch.setenv("EGMLA_CUDA_CACHE", str(tmp_path))
    for heads, segment, per_block in ((12, 512, 4), (2, 64, 2)):
        defines = {"N_HEADS": heads, "SEG": segment, "HPB": per_block, "MIN_BLOCKS": 1}
        cubin = compile_cubin("studies/grouped_decode_cuda.cu", defines, "90")
        assert cubin[:4] == b"\x7fELF"
    assert len(list(tmp_path.iterdir())) == 2  # cached


def test_unsupported_inputs_are_refused_with_the_reason():
    from egmla.kernels.studies.grouped_decode_cuda import supports

    q, latent = torch.zeros(2, 12, 64, dtype=torch.bfloat16), torch.zeros(2, 8, 64, dtype=torch.bfloat16)
    assert "CUDA tensors" in supports(q, latent, latent, torch.zeros(12 * 128, 64, dtype=torch.bfloat16))
