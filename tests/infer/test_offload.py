"""Gate tables in host memory give the very same logits and tokens as gate tables on the device."""
import pytest
import torch

from egmla.infer import GenerationEngine
from egmla.infer.offload import GateTableOffload, OffloadedRows
from tests.infer.helpers import tiny_model

PROMPTS = [[5, 17, 42, 99, 3], [120, 8], [33, 34, 35, 36, 37, 38, 39]]


def cached_logits(model, device="cpu"):
    """Prefill a ragged batch, then three decode steps; all logits concatenated."""
    tokens = torch.zeros(3, 7, dtype=torch.long)
    for row, prompt in enumerate(PROMPTS):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
    lengths = torch.tensor([len(p) for p in PROMPTS], device=device)
    with torch.no_grad():
        cache = model.new_cache(3, 16)
        out = [model(tokens.to(device), cache, n_new=lengths)]
        for step in range(3):
            out.append(model(torch.tensor([[200 + step], [7], [250 - step]], device=device), cache))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant,path", [("eg-mla", "naive"), ("eg-mla", "gate-table"),
                                          ("eg-mla-latent", "naive"), ("eg-mla-latent", "absorbed")])
def test_offloaded_logits_equal_on_device_logits(variant, path):
    model = tiny_model(variant)
    model.set_decode_path(path)
    expected = cached_logits(model)
    with torch.no_grad():
        full_expected = model(torch.tensor(PROMPTS[2:]))
    offload = GateTableOffload(model, initial_rows=4)  # small, so the row cache must grow
    assert all(isinstance(layer.attn.gate_embed, OffloadedRows) for layer in model.layers)
    assert torch.equal(cached_logits(model), expected)
    with torch.no_grad():
        assert torch.equal(model(torch.tensor(PROMPTS[2:])), full_expected)  # no-cache forward too
    assert offload.n_resident == len({0, 200, 201, 202, 7, 250, 249, 248}.union(*PROMPTS))
    assert offload.capacity >= offload.n_resident
    per_layer = 300 * 32 + (300 * 128 if path == "gate-table" else 0)  # E_l [V, d_e] (+ G_l [V, 2·4·16])
    assert offload.host_bytes() == 2 * per_layer * 4


def test_engine_with_offload_generates_the_same_and_reports_savings():
    model = tiny_model("eg-mla", seed=3)
    expected = [r.token_ids for r in GenerationEngine(model, decode_path="gate-table").generate(PROMPTS, 8)]
    engine = GenerationEngine(model, decode_path="gate-table", offload_gate_tables=True)
    assert [r.token_ids for r in engine.generate(PROMPTS, 8)] == expected
    saved = engine.offload.bytes_saved()
    assert saved == engine.offload.host_bytes() - engine.offload.device_bytes() and saved > 0


def test_offload_refuses_models_without_gates_and_whole_table_paths():
    with pytest.raises(ValueError, match="no gate tables"):
        GateTableOffload(tiny_model("mla"))
    with pytest.raises(ValueError, match="decode_path='kernel'"):
        GenerationEngine(tiny_model("eg-mla"), decode_path="kernel", offload_gate_tables=True)
    with pytest.raises(ValueError, match="prefill_graphs=True with offload_gate_tables"):
        GenerationEngine(tiny_model("eg-mla"), decode_path="gate-table", offload_gate_tables=True, prefill_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_on_cuda_equal_and_off_the_device():
    model = tiny_model("eg-mla").cuda()
    model.set_decode_path("gate-table")
    expected = cached_logits(model, "cuda")
    before = torch.cuda.memory_allocated()
    offload = GateTableOffload(model)
    assert all(t.device.type == "cpu" for t in offload.host_tables.values())
    assert torch.equal(cached_logits(model, "cuda"), expected)
    assert torch.cuda.memory_allocated() < before


def test_restore_puts_tables_back_and_paths_switch_again():
    model = tiny_model("eg-mla")
    model.set_decode_path("gate-table")
    expected = cached_logits(model)
    params_before = model.num_params()
    offload = GateTableOffload(model)
    with pytest.raises(ValueError, match="already offloaded"):
        GateTableOffload(model)
    offload.restore()
    assert model.num_params() == params_before
    assert torch.equal(cached_logits(model), expected)
    model.set_decode_path("naive")  # rebuilds nothing from an OffloadedRows: the embedding is real again
    torch.testing.assert_close(cached_logits(model), expected, rtol=1e-5, atol=1e-5)
    engine = GenerationEngine(model, decode_path="gate-table", offload_gate_tables=True)
    assert engine.generate(PROMPTS, 4)[0].token_ids == GenerationEngine(tiny_model("eg-mla")).generate(PROMPTS, 4)[0].token_ids
