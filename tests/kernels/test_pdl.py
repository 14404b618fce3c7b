"""Programmatic dependent launch (egmla/kernels/pdl.py): when it is on, and on the GPU that a kernel which starts
early still reads its inputs only after the kernel that writes them: decode kernels and their split combine captured
in a CUDA graph right behind kernels that produce their inputs, replayed with new queries, equal the reference every
time."""
import pytest
import torch

from tests.kernels.conftest import needs_cuda, rel_err, requires_triton

pytestmark = requires_triton


def test_pdl_is_off_off_cuda_and_follows_the_setting(monkeypatch):
    import egmla.kernels as kernels
    from egmla.kernels.pdl import launch_flags

    assert not kernels.pdl_enabled("cpu")
    assert launch_flags("cpu") == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # pretend a real GPU of each generation
    for major, expected in ((8, False), (9, True), (10, True)):
        monkeypatch.setattr(kernels, "_capability_major", lambda index, major=major: major)
        assert kernels.pdl_enabled(torch.device("cuda", 0)) is expected
        with kernels.pdl_setting(False):
            assert not kernels.pdl_enabled(torch.device("cuda", 0))
        assert kernels.pdl_enabled(torch.device("cuda", 0)) is expected  # restored
    monkeypatch.setattr(kernels, "_capability_major", lambda index: 9)
    monkeypatch.setattr(torch.version, "hip", "6.2")  # a ROCm build: no PDL whatever the capability
    assert not kernels.pdl_enabled(torch.device("cuda", 0))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setenv("EGMLA_PDL", "0")
    assert not kernels.pdl_enabled(torch.device("cuda", 0))
    with kernels.pdl_setting(True):  # the setting wins over the environment
        assert kernels.pdl_enabled(torch.device("cuda", 0))


def _replayed(make_query, decode, sources, steps=12):
    """Capture [query = make_query(source); decode(query)] in a CUDA graph, replay it for `steps` fresh sources;
    returns [(source copy, output copy)]."""
    source = sources()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode(make_query(source))  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode(make_query(source))
    results = []
    for _ in range(steps):
        fresh = sources()
        source.copy_(fresh)
        graph.replay()
        results.append((fresh.clone(), out.clone()))
    torch.cuda.synchronize()
    return results


@pytest.mark.gpu
@needs_cuda
def test_egmla_decode_in_a_graph_behind_its_statistics_and_query_kernels():
    """The statistics kernel writes what the decode kernel reads (which loads its weights before it waits)."""
    from egmla.kernels import pdl_enabled
    from egmla.kernels.egmla_decode import egmla_decode, layernorm_stats_triton
    from egmla.kernels.egmla_decode_ref import egmla_decode_ref
    from tests.kernels.test_egmla_decode import make_inputs

    assert pdl_enabled("cuda") == (torch.cuda.get_device_capability()[0] >= 9)
    inputs = make_inputs(8, 12, 64, 64, 64, 64, 4096, 32768, [1, 4096, 2049, 17, 4000, 640, 3, 1000],
                         torch.bfloat16, "cuda")
    rest = {k: v for k, v in inputs.items() if k != "q_nope"}

    def decode(q):
        stats = layernorm_stats_triton(inputs["latent"], inputs["token_ids"], inputs["gate_table"], inputs["wkv_b"],
                                       n_heads=12, d_n=64)
        return egmla_decode(q, **rest, ln_stats=stats, scale=128 ** -0.5)

    results = _replayed(lambda src: src * 1.0, decode, lambda: torch.randn_like(inputs["q_nope"]))
    for q, out in results:
        assert torch.isfinite(out).all() and rel_err(out, egmla_decode_ref(q, **rest, scale=128 ** -0.5)) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_mla_decode_and_combine_in_a_graph_behind_their_query_kernel():
    from egmla.kernels.mla_decode import mla_decode
    from egmla.kernels.mla_decode_ref import mla_decode_ref
    from tests.kernels.test_mla_decode import make_inputs

    q_latent, q_pe, latent, k_rope, lengths = make_inputs(8, 12, 64, 64, 4096, [4096, 1, 3000, 4096, 17, 2048, 900,
                                                                                 4000], torch.bfloat16, "cuda")
    results = _replayed(lambda src: src * 1.0, lambda q: mla_decode(q, q_pe, latent, k_rope, lengths, 0.125),
                        lambda: torch.randn_like(q_latent))
    for q, out in results:
        assert rel_err(out, mla_decode_ref(q, q_pe, latent, k_rope, lengths, 0.125)) < 1e-2
