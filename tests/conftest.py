import os

import pytest
import torch

# Triton's CPU interpreter (docs/kernels.md) must be chosen before any kernel is decorated, i.e. before the first test
# module imports egmla.kernels: here, the conftest loaded first, for `pytest tests/...` of any file or folder. Set
# later (it was in tests/kernels/conftest.py), the kernels imported while collecting tests/attention ran compiled and
# the rest interpreted, and `pytest tests` without TRITON_INTERPRET=1 failed with Triton's "Cannot call @triton.jit'd
# outside of the scope of a kernel".
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from egmla.config import preset  # noqa: E402  (after the interpreter is chosen)
from tests.variant_kinds import KINDS  # noqa: E402

# Small shapes that exercise every code path in well under a second each (small_config): every kind of registered
# variant (tests/variant_kinds.py, read from egmla.variants), and what no registered variant is.
VARIANTS = {
    **KINDS,
    "mqa": dict(attention="gqa", n_kv_heads=1),
    "mla-qlora": dict(attention="mla", q_lora_rank=24),
    "eg-mla-rmsnorm": dict(attention="eg-mla", gate_norm="rmsnorm"),
    "eg-mla-untied": dict(attention="eg-mla", tie_embeddings=False),
}


def perturbed(model, scale: float = 0.1, seed: int = 0):
    """`model` with every parameter that starts constant (norm weights at 1, biases at 0, the identity gate's W_UE at
    0) moved to random values: at initialisation a decode path that ignored one (LayerNorm's beta, the gate's W_UE)
    would still equal the full forward. Call it before set_decode_path, which precomputes from the weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn(param.shape, generator=generator).to(param) * scale)
    return model


def small_config(**overrides):
    values = dict(vocab_size=61, n_layers=2, d_model=48, n_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=6, kv_lora_rank=10, gate_dim=12, max_seq_len=48)
    values.update(overrides)
    if values.get("attention", "eg-mla") != "eg-mla":
        values.pop("gate_dim")
    return preset("tiny", **values)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)



def _needs_gpu(item) -> bool:
    return any("GPU" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    # Every test skipped for want of a GPU carries the `gpu` marker, so `pytest -m gpu` on a GPU machine runs
    # exactly the tests CI skips (a bare skipif would leave them out of that selection).
    for item in items:
        if _needs_gpu(item) and "gpu" not in item.keywords:
            item.add_marker(pytest.mark.gpu)
