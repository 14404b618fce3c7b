"""resize_token_embeddings on EgmlaForCausalLM: the token embeddings, an untied head, every layer's gate
embeddings E_l and the egmla config move together, the old ids keep their logits, and the new ids decode through
the cache (the gate tables built for the old vocabulary are rebuilt) as the full forward does."""
import pytest
import torch

from egmla.hf import EgmlaForCausalLM
from egmla.runs import load_model

VARIANTS_HERE = ["eg-mla", "eg-mla-bias-v", "mla-qlora-untied"]


def hf_model_of(make_run, variant, path=None):
    model, _ = load_model(make_run(variant))
    if path:
        model.set_decode_path(path)
    return EgmlaForCausalLM.from_egmla(model, eos_token_id=0)


def gate_embeddings(hf_model):
    return [block.attn.gate_embed for block in hf_model.model.layers if hasattr(block.attn, "gate_embed")]


@pytest.mark.parametrize("variant", VARIANTS_HERE)
@pytest.mark.parametrize("mean_resizing", [True, False])
def test_growing_keeps_old_logits_and_decodes_new_ids(variant, mean_resizing, make_run, tmp_path):
    path = "gate-table" if variant.startswith("eg-mla") else None  # a table built at the old vocabulary
    hf_model = hf_model_of(make_run, variant, path)
    old = hf_model.config.vocab_size
    tokens = torch.randint(0, old, (2, 10))
    with torch.no_grad():
        before = hf_model(tokens, use_cache=True).logits  # builds the old-vocabulary gate tables
    old_gates = [g.weight.detach().clone() for g in gate_embeddings(hf_model)]
    hf_model.resize_token_embeddings(old + 37, pad_to_multiple_of=8, mean_resizing=mean_resizing)
    vocab = -(-(old + 37) // 8) * 8  # padded up to a multiple of 8
    assert hf_model.config.vocab_size == vocab and hf_model.model.config.vocab_size == vocab
    assert hf_model.config.to_model_config() == hf_model.model.config
    assert hf_model.model.output.weight.shape[0] == vocab
    for gate, kept in zip(gate_embeddings(hf_model), old_gates):
        assert gate.weight.shape[0] == vocab and torch.equal(gate.weight[:old], kept)
        if mean_resizing:  # transformers' rule: new rows drawn tightly around the old rows' mean
            assert torch.allclose(gate.weight[old:], kept.mean(0).expand(vocab - old, -1), atol=1e-3)
    if not mean_resizing:  # egmla's own init: token rows at init_std, gate rows at 1
        assert abs(hf_model.model.tok_embeddings.weight[old:].std().item() - hf_model.config.initializer_range) < 0.03
        for gate in gate_embeddings(hf_model):
            assert abs(gate.weight[old:].std().item() - 1.0) < 0.2
    with torch.no_grad():
        assert torch.equal(hf_model(tokens).logits[..., :old], before)
        new = torch.randint(old, vocab, (2, 6))
        mixed = torch.cat([tokens, new], dim=1)
        full = hf_model(mixed).logits
        cache = hf_model.new_hf_cache(2)
        prefill = hf_model(mixed[:, :12], cache=cache).logits
        steps = [hf_model(mixed[:, i:i + 1], cache=cache).logits for i in range(12, 16)]
        cached = torch.cat([prefill, *steps], dim=1)
    assert ((cached - full).norm() / full.norm()) < 1e-5
    assert not torch.isnan(full).any()
    hf_model.save_pretrained(tmp_path)
    loaded = EgmlaForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.config.vocab_size == vocab
    with torch.no_grad():
        assert torch.equal(loaded(mixed).logits, full)


def test_shrinking_cuts_every_table_and_refuses_the_cut_ids(make_run):
    hf_model = hf_model_of(make_run, "eg-mla", "gate-table")
    old = hf_model.config.vocab_size
    tokens = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        before = hf_model(tokens, use_cache=True).logits
    hf_model.resize_token_embeddings(200)
    assert all(g.weight.shape[0] == 200 for g in gate_embeddings(hf_model))
    assert hf_model.model.config.vocab_size == 200 < old
    with torch.no_grad():
        assert torch.equal(hf_model(tokens).logits, before[..., :200])
        with pytest.raises(ValueError, match="vocab_size=200"):
            hf_model(torch.tensor([[250]]))


def test_no_size_changes_nothing(make_run):
    hf_model = hf_model_of(make_run, "eg-mla")
    gates = [g.weight for g in gate_embeddings(hf_model)]
    assert hf_model.resize_token_embeddings() is hf_model.model.tok_embeddings
    assert hf_model.resize_token_embeddings(hf_model.config.vocab_size) is hf_model.model.tok_embeddings
    assert all(g.weight is kept for g, kept in zip(gate_embeddings(hf_model), gates))
