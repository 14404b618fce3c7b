"""EgmlaForCausalLM: egmla's logits exactly, safetensors round trip through the Auto classes (no pickle),
padding, loss, and the tokenizer as a PreTrainedTokenizerFast."""
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import egmla.hf  # noqa: F401
from egmla.hf import EgmlaForCausalLM
from egmla.hf.export import export_hf
from egmla.hf.modeling_egmla import CACHE_ARG
from egmla.runs import load_model, load_tokenizer


def test_logits_are_egmlas(variant, make_run):
    model, _ = load_model(make_run(variant))
    hf_model = EgmlaForCausalLM.from_egmla(model, eos_token_id=0)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(hf_model(tokens).logits, model(tokens))
        assert getattr(hf_model(tokens), CACHE_ARG) is None  # plain calls run the causal forward
    assert hf_model.to_egmla() is hf_model.model


def test_save_load_round_trip_in_safetensors(variant, make_run, tmp_path, no_unpickling):
    model, _ = load_model(make_run(variant))
    EgmlaForCausalLM.from_egmla(model, eos_token_id=0).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert ("model.output.weight" in keys) == (not model.config.tie_embeddings)  # tied head stored once
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code
    assert type(loaded) is EgmlaForCausalLM
    assert loaded.config.to_model_config() == model.config
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens))  # RoPE tables rebuilt, weights intact


def test_left_padding_gives_each_row_its_own_logits(make_run):
    model, _ = load_model(make_run("eg-mla"))
    hf_model = EgmlaForCausalLM.from_egmla(model, eos_token_id=0, pad_token_id=0)
    short, long = torch.randint(1, 300, (1, 5)), torch.randint(1, 300, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = (torch.arange(9) >= torch.tensor([[4], [0]])).long()
    with torch.no_grad():
        logits = hf_model(batch, attention_mask=mask).logits
        torch.testing.assert_close(logits[0, 4:], model(short)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[1], model(long)[0], rtol=1e-5, atol=1e-5)


def test_labels_give_the_shifted_cross_entropy(make_run):
    model, _ = load_model(make_run("mla"))
    hf_model = EgmlaForCausalLM.from_egmla(model)
    tokens = torch.randint(0, 300, (2, 10))
    out = hf_model(tokens, labels=tokens)
    expected = torch.nn.functional.cross_entropy(model(tokens)[:, :-1].reshape(-1, 300), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()  # trainable through transformers' interface
    assert hf_model.model.tok_embeddings.weight.grad is not None


def test_logits_to_keep_follows_transformers(make_run):
    """logits_to_keep: n > 0 keeps the last n positions, a tensor the positions it lists; with labels it is refused
    (it used to vanish into **kwargs and return every position)."""
    import pytest

    model, _ = load_model(make_run("mla"))
    hf_model = EgmlaForCausalLM.from_egmla(model)
    tokens = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        full = hf_model(tokens).logits
        assert torch.equal(hf_model(tokens, logits_to_keep=1).logits, full[:, -1:])
        assert torch.equal(hf_model(tokens, logits_to_keep=torch.tensor([0, 7])).logits, full[:, [0, 7]])
    with pytest.raises(ValueError, match="logits_to_keep=1 with labels"):
        hf_model(tokens, labels=tokens, logits_to_keep=1)


def test_exported_tokenizer_is_a_fast_tokenizer_with_special_tokens(make_run, tmp_path):
    run = make_run("eg-mla")
    export_hf(run, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    assert tokenizer.pad_token_id == 0
    text = "The harbour town woke slowly."
    assert tokenizer(text)["input_ids"] == load_tokenizer(run).encode(text).ids
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.eos_token_id == 0 and model.generation_config.eos_token_id == 0


def test_bf16_load_matches_egmlas_bf16_load(make_run, tmp_path):
    run = make_run("eg-mla")
    export_hf(run, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    model, _ = load_model(run, dtype=torch.bfloat16)
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens))
