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
    for implementation in ("sdpa", "eager"):  # the usual request, "sdpa", raised; neither changes the attention
        chosen = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation)
        with torch.no_grad():
            assert torch.equal(chosen(tokens).logits, model(tokens))


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


def test_num_items_in_batch_normalises_the_loss_as_transformers_does(make_run, tmp_path):
    """The Trainer passes num_items_in_batch (the label tokens of every micro-batch of an accumulation step) and then
    leaves the loss unscaled: the loss is the summed cross-entropy over that count, so 2 accumulated batches of 2 train
    as one batch of 4 (the mean of each micro-batch made the gradients 2x too large)."""
    import copy

    from transformers import Trainer, TrainingArguments

    model, _ = load_model(make_run("eg-mla"))
    hf_model = EgmlaForCausalLM.from_egmla(model)
    tokens = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[0, :4] = -100
    summed = torch.nn.functional.cross_entropy(model(tokens)[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1),
                                               reduction="sum")
    torch.testing.assert_close(hf_model(tokens, labels=labels, num_items_in_batch=torch.tensor(40)).loss, summed / 40)

    rows = [{"input_ids": row, "labels": [t if i >= n else -100 for i, t in enumerate(row)]}
            for n, row in enumerate(torch.randint(0, 300, (4, 10), generator=torch.Generator().manual_seed(1)).tolist())]
    trained = []
    for batch, accumulation in ((4, 1), (2, 2)):
        copy_ = copy.deepcopy(hf_model).train()
        args = TrainingArguments(tmp_path / f"{batch}", per_device_train_batch_size=batch, max_steps=1, optim="sgd",
                                 gradient_accumulation_steps=accumulation, learning_rate=0.1, max_grad_norm=1e9,
                                 report_to=[], save_strategy="no", use_cpu=True)
        trainer = Trainer(model=copy_, args=args, train_dataset=rows,
                          data_collator=lambda b: {k: torch.tensor([r[k] for r in b]) for k in ("input_ids", "labels")})
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)  # the same 4 rows
        trainer.train()
        trained.append(copy_.model.tok_embeddings.weight.detach())
    torch.testing.assert_close(trained[1], trained[0], rtol=1e-5, atol=1e-6)


def test_outputs_it_cannot_give_are_refused_not_left_none(make_run):
    """hidden states and attention maps (egmla's Transformer returns logits only) and a 4-D attention_mask (a custom
    pattern the padding-dropping forward cannot follow) raise, where they used to come back None or be ignored."""
    import pytest

    model, _ = load_model(make_run("mla"))
    hf_model = EgmlaForCausalLM.from_egmla(model)
    tokens = torch.randint(0, 300, (1, 6))
    for name in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=f"{name} is not supported"):
            hf_model(tokens, **{name: True})
        with pytest.raises(ValueError, match=f"{name} is not supported"):
            hf_model.generate(tokens, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, **{name: True})
    with pytest.raises(ValueError, match="attention_mask has 4 dimensions"):
        hf_model(tokens, attention_mask=torch.zeros(1, 1, 6, 6))
    with torch.no_grad():
        assert torch.equal(hf_model(tokens, output_hidden_states=False).logits, model(tokens))
