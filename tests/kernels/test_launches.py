"""The launches of a CUDA-graph decode step, counted on the CPU (`egmla bench launches`): every variant's `kernel`
step launches the same per layer, and no change adds a launch per layer unnoticed. A change that moves a count on
purpose updates the table here (and docs/bench/launch_counts/counts.txt); one that does so by accident fails."""
import pytest

from tests.kernels.conftest import requires_triton

pytestmark = requires_triton

# (variant, decode path): (launches per layer, launches per step outside the layers), RMSNorm counted as its 6
# decomposed ops (one kernel on a GPU)
EXPECTED = {("mha", "kernel"): (14, 10), ("mla-kv64", "kernel"): (14, 10), ("egmla-kv64", "kernel"): (14, 10),
            ("egmla-kv64", "grouped"): (16, 14), ("egmla-kv64-bias-v", "absorbed"): (19, 12),
            ("egmla-kv64-bias", "absorbed"): (20, 12)}


@pytest.mark.parametrize("variant,path", list(EXPECTED))
def test_decode_step_launches(variant, path):
    from egmla.bench.launches import per_layer

    layer, once, detail = per_layer(variant, path)
    assert (layer, once) == EXPECTED[(variant, path)], sorted(detail.items(), key=lambda item: -item[1])
