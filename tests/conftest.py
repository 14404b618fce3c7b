import pytest
import torch

from egmla.config import preset

# Small shapes that exercise every code path in well under a second each.
VARIANTS = {
    "mha": dict(attention="mha"),
    "gqa2": dict(attention="gqa", n_kv_heads=2),
    "mqa": dict(attention="gqa", n_kv_heads=1),
    "mla": dict(attention="mla"),
    "mla-qlora": dict(attention="mla", q_lora_rank=24),
    "egmla": dict(attention="eg-mla"),
    "egmla-latent": dict(attention="eg-mla", gate_placement="latent"),
    "egmla-add": dict(attention="eg-mla", gate_op="add"),
    "egmla-nonorm": dict(attention="eg-mla", gate_norm="none"),
    "egmla-rmsnorm": dict(attention="eg-mla", gate_norm="rmsnorm"),
    "egmla-untied": dict(attention="eg-mla", tie_embeddings=False),
    "egmla-bias": dict(attention="eg-mla", gate_op="bias"),
    "egmla-bias-v": dict(attention="eg-mla", gate_op="bias-v"),
    "egmla-identity": dict(attention="eg-mla", gate_init="identity"),
}


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
