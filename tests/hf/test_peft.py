"""peft LoRA adapters on EgmlaForCausalLM (peft comes with lm-eval[hf]). The fast paths read weights directly
(folded absorption, gate tables, merged products, wkv_b handed to kernels), which a LoRA layer's `.weight` does not
include: with adapters in place the model calls the modules instead (training, the naive decode) and refuses the
paths that cannot; after `merge_and_unload` (which writes through `.data`, unseen by version counters) everything
precomputed before is rebuilt. Prompt tuning (virtual tokens as inputs_embeds) trains on the kinds that read no
token ids and is refused, clearly, on EG-MLA."""
import warnings

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

from egmla.attention import decode_paths
from egmla.config import preset
from egmla.hf import EgmlaForCausalLM
from egmla.model import Transformer
from tests.conftest import perturbed

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]
VARIANTS = {"mha": dict(attention="mha"), "mla": dict(attention="mla"), "eg-mla": dict(attention="eg-mla"),
            "eg-mla-bias-v": dict(attention="eg-mla", gate_op="bias-v")}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on unknown model types
        yield


def hf_model(variant: str, device: str = "cpu") -> EgmlaForCausalLM:
    """fp32 on either device: on a GPU the merged products, the fused SwiGLU epilogue and the Triton kernels run."""
    config = preset("tiny", vocab_size=300, max_seq_len=64, n_layers=2, d_model=64, n_heads=4, **VARIANTS[variant])
    # perturbed: the norm affines and the identity gate's W_UE moved, so a path dropping one would differ here too
    return EgmlaForCausalLM.from_egmla(perturbed(Transformer(config)).to(device), eos_token_id=0)


def with_lora(model: EgmlaForCausalLM, embeddings: bool = False):
    """Adapters on every linear but the head (and on E_l): random B, so that they change the logits."""
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    targets = [n for n in names if n != "output"] + (["gate_embed"] if embeddings else [])
    return get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))


def cached_logits(model: EgmlaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """A 12-token prefill and 8 single-token steps through an EgmlaCache."""
    cache = model.new_hf_cache(tokens.shape[0])
    with torch.no_grad():
        out = [model(input_ids=tokens[:, :12], cache=cache, use_cache=True).logits]
        out += [model(input_ids=tokens[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(12, 20)]
    return torch.cat(out, dim=1)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapters_in_place_decode_through_the_modules_or_refuse(variant, device):
    model = hf_model(variant, device)
    tokens = torch.randint(0, 300, (2, 20), device=device)
    with torch.no_grad():
        base = model(input_ids=tokens).logits
    peft_model = with_lora(model, embeddings=variant.startswith("eg-mla"))
    inner = peft_model.base_model.model
    with torch.no_grad():
        full = peft_model(input_ids=tokens).logits
    assert rel_err(base, full) > 1e-3  # the adapters change the model
    assert inner.model.wrapped_weights()  # e.g. layers.0.attn.wkv_b
    for path in decode_paths(inner.config.to_model_config()):
        inner.model.set_decode_path(path)
        if inner.model.layers[0].attn.paths[path].reads_weights:
            with pytest.raises(ValueError, match=r"peft\.tuners\.lora.*merge_and_unload\(\)"):
                cached_logits(inner, tokens)
        else:
            assert rel_err(cached_logits(inner, tokens), full) < 1e-4, path
    inner.model.decode_path_chosen = False  # as from_pretrained leaves it: generation picks a path that calls modules
    assert rel_err(cached_logits(inner, tokens), full) < 1e-4
    # a path that calls the modules: the variant's first on the CPU; MHA's `kernel` on CUDA (it reads no weights)
    assert not inner.model.layers[0].attn.paths[inner.model.decode_path].reads_weights


@pytest.mark.parametrize("variant", ["mla", "eg-mla"])
def test_training_gives_every_adapter_a_gradient(variant):
    """MLA's causal forward builds K/V from wkv_b's weight in one product: with an adapter on wkv_b it calls the
    module, so the adapter trains."""
    peft_model = with_lora(hf_model(variant))
    tokens = torch.randint(0, 300, (2, 20))
    peft_model(input_ids=tokens, labels=tokens).loss.backward()
    trained = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("wkv_b" in n for n, _ in trained)
    assert [n for n, p in trained if p.grad is None or not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merged_adapters_reach_what_the_path_precomputed_before(variant, device):
    """A path used before the adapters were added (its gate tables, folded weights built then), the adapters merged
    and unloaded: the same path, not set again, gives the merged model's full-forward logits."""
    for path in decode_paths(hf_model(variant).config.to_model_config()):
        model = hf_model(variant, device)
        tokens = torch.randint(0, 300, (2, 20), device=device)
        model.model.set_decode_path(path)
        before = cached_logits(model, tokens)
        merged = with_lora(model).merge_and_unload()
        assert merged.model.wrapped_weights() == [] and merged.model.decode_path == path
        with torch.no_grad():
            full = merged(input_ids=tokens).logits
        assert rel_err(cached_logits(merged, tokens), full) < 1e-4, path
        assert rel_err(before, full) > 1e-3  # the adapters did change the model


def with_prompt_tuning(model: EgmlaForCausalLM, virtual_tokens: int = 4):
    """peft's prompt tuning: trained virtual-token embeddings prepended to the input's, passed as inputs_embeds alone
    (PeftModelForCausalLM.forward gives the base model no input_ids). Random prompts (std 1), so that they matter."""
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                          num_virtual_tokens=virtual_tokens))
    with torch.no_grad():
        peft_model.prompt_encoder.default.embedding.weight.normal_()
    return peft_model


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_prompt_tuning_trains_only_the_virtual_tokens(variant):
    """A training step through peft's prompt tuning (a left-padded batch): the gradient reaches the prompt embeddings
    and no weight of the model; the step changes the prompt alone and lowers the loss; a padded row's logits are
    those it gets alone."""
    torch.manual_seed(0)
    model = hf_model(variant)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = with_prompt_tuning(model)
    tokens = torch.randint(1, 300, (2, 10))
    mask = (torch.arange(10) >= torch.tensor([[3], [0]])).long()
    labels = tokens.masked_fill(mask == 0, -100)
    out = peft_model(input_ids=tokens, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 4 + 10, 300)
    out.loss.backward()
    with_grad = [n for n, p in peft_model.named_parameters() if p.grad is not None]
    assert with_grad == ["prompt_encoder.default.embedding.weight"]
    prompt = peft_model.prompt_encoder.default.embedding.weight
    assert prompt.grad.abs().sum() > 0
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0).step()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert peft_model(input_ids=tokens, attention_mask=mask, labels=labels).loss < out.loss
        alone = peft_model(input_ids=tokens[:1, 3:]).logits
        padded = peft_model(input_ids=tokens, attention_mask=mask).logits
    torch.testing.assert_close(padded[0, 4 + 3:], alone[0, 4:], rtol=1e-5, atol=1e-5)


def test_prompt_tuning_generates_the_greedy_tokens_of_its_forward():
    """generate() through peft prepends the virtual tokens at the first step only (it reads the cache under its
    pre-5.24 name, `past_key_values`, which prepare_inputs_for_generation gives too): the tokens of a greedy loop
    over the full forward."""
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=300, max_seq_len=64, n_layers=2, d_model=64, n_heads=4, attention="mla",
                    init_std=0.1)  # clear argmax margins
    peft_model = with_prompt_tuning(EgmlaForCausalLM.from_egmla(Transformer(config)))
    tokens = torch.randint(1, 300, (2, 5))
    sequence = tokens
    with torch.no_grad():
        for _ in range(8):
            sequence = torch.cat([sequence, peft_model(input_ids=sequence).logits[:, -1:].argmax(-1)], dim=1)
        generated = peft_model.generate(input_ids=tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=8,
                                        do_sample=False)
    assert generated.tolist() == sequence.tolist()


@pytest.mark.parametrize("variant", ["eg-mla", "eg-mla-bias-v"])
def test_prompt_tuning_on_eg_mla_is_refused_clearly(variant):
    """EG-MLA's gate is indexed by token id, and prompt tuning's virtual tokens have none: the error names the kind,
    the reason and what works instead (LoRA: test_training_gives_every_adapter_a_gradient)."""
    peft_model = with_prompt_tuning(hf_model(variant))
    tokens = torch.randint(1, 300, (2, 10))
    message = r"cannot run EG-MLA .*'eg-mla'.*indexed by token id.*prompt tuning.*LoRA.*MHA, GQA or MLA kind"
    with pytest.raises(ValueError, match=message):
        peft_model(input_ids=tokens, labels=tokens)
    with pytest.raises(ValueError, match=message):
        peft_model.generate(input_ids=tokens, max_new_tokens=2, do_sample=False)
