"""`inputs_embeds` on EgmlaForCausalLM: the embeddings of the ids give the ids' logits and loss to the bit (with and
without padding) and generate() from them gives the ids' greedy tokens, for the kinds whose attention reads no ids
(MHA, GQA, MLA); EG-MLA, whose gate table is indexed by token id, takes them only with the ids and refuses them alone,
naming the kind, the reason and what works instead."""
import pytest
import torch

import egmla.hf  # noqa: F401
from egmla.hf import EgmlaForCausalLM
from egmla.runs import load_model
from tests.conftest import perturbed
from tests.hf.conftest import VARIANTS

GATED = [name for name, fields in VARIANTS.items() if fields["attention"] == "eg-mla"]  # the controls too
ID_FREE = [name for name in VARIANTS if name not in GATED]  # MHA, GQA, MLA
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [12, 250, 3], [99, 98, 97, 96, 95]]


def hf_model(make_run, variant) -> EgmlaForCausalLM:
    """Perturbed (tests.conftest): the identity gate's W_UE, zero at initialisation, would make every id gate alike."""
    model, _ = load_model(make_run(variant))
    return EgmlaForCausalLM.from_egmla(perturbed(model), pad_token_id=0)


def left_padded(prompts, pad_id=0):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def with_embedding_output(model: EgmlaForCausalLM, embeds: torch.Tensor):
    """A hook making the token embedding return `embeds`: the reference for 'embeds replace the lookup'."""
    return model.get_input_embeddings().register_forward_hook(lambda module, args, out: embeds)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("variant", ID_FREE)
def test_embeddings_alone_give_the_ids_logits_and_loss_exactly(variant, padded, make_run):
    model = hf_model(make_run, variant)
    ids, mask = left_padded(PROMPTS) if padded else (torch.randint(1, 300, (3, 9)), None)
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        from_ids = model(input_ids=ids, attention_mask=mask, labels=labels)
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    assert torch.equal(from_embeds.logits, from_ids.logits)
    assert torch.equal(from_embeds.loss, from_ids.loss)


@pytest.mark.parametrize("variant", ID_FREE)
def test_a_cached_prefill_from_embeddings_continues_like_one_from_ids(variant, make_run):
    """Prefill through an EgmlaCache from embeddings, then single-token steps from ids: the ids' logits, bit for bit."""
    model = hf_model(make_run, variant)
    ids = torch.randint(1, 300, (2, 14))
    logits = []
    with torch.no_grad():
        for first in ({"input_ids": ids[:, :10]}, {"inputs_embeds": model.get_input_embeddings()(ids[:, :10])}):
            cache = model.new_hf_cache(2)
            out = [model(**first, cache=cache, use_cache=True).logits]
            out += [model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(10, 14)]
            logits.append(torch.cat(out, dim=1))
    assert torch.equal(logits[1], logits[0])


@pytest.mark.parametrize("variant", ID_FREE)
def test_generate_from_embeddings_gives_the_greedy_tokens_of_the_ids(variant, make_run):
    """As transformers' Llama: the embeddings feed the first step, the generated ids the later ones; the output holds
    the new tokens only (with input_ids given too, the prompt and the new tokens, as from the ids alone)."""
    model = hf_model(make_run, variant)
    ids, mask = left_padded(PROMPTS)
    embeds = model.get_input_embeddings()(ids)
    settings = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        from_ids = model.generate(ids, **settings)
        from_embeds = model.generate(inputs_embeds=embeds, **settings)
        from_both = model.generate(ids, inputs_embeds=embeds, **settings)
    assert from_embeds.tolist() == from_ids[:, ids.shape[1]:].tolist()
    assert torch.equal(from_both, from_ids)


@pytest.mark.parametrize("variant", ID_FREE + GATED)
def test_ids_and_embeddings_together_feed_the_embeddings_to_the_layers(variant, make_run):
    """Both given: the embeddings replace the token-embedding lookup, the ids stay what the attention reads (EG-MLA's
    gate), so other ids change EG-MLA's logits and nothing else's."""
    model = hf_model(make_run, variant)
    ids, other_ids = torch.randint(1, 300, (2, 2, 9))
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, inputs_embeds=embeds).logits, model(input_ids=ids).logits)
        moved = embeds * 1.5
        hook = with_embedding_output(model, moved)
        expected = model(input_ids=ids).logits
        hook.remove()
        assert torch.equal(model(input_ids=ids, inputs_embeds=moved).logits, expected)
        other = model(input_ids=other_ids, inputs_embeds=moved).logits
    assert torch.equal(other, expected) == (variant in ID_FREE)


@pytest.mark.parametrize("variant", ["eg-mla", "eg-mla-bias-v"])
def test_eg_mla_generates_from_embeddings_given_with_their_ids(variant, make_run):
    model = hf_model(make_run, variant)
    ids, mask = left_padded(PROMPTS)
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        from_both = model.generate(ids, inputs_embeds=model.get_input_embeddings()(ids), **settings)
        assert torch.equal(from_both, model.generate(ids, **settings))


@pytest.mark.parametrize("variant", GATED)
def test_eg_mla_refuses_embeddings_alone_naming_the_kind_the_reason_and_the_fix(variant, make_run):
    model = hf_model(make_run, variant)
    embeds = model.get_input_embeddings()(torch.randint(1, 300, (2, 6)))
    gate_op = model.config.gate_op
    message = (rf"inputs_embeds without input_ids cannot run EG-MLA .*\(attention_kind='eg-mla'"
               rf"{'' if gate_op == 'mul' else f', gate_op={gate_op!r}'}\): .*indexed by token id.*"
               rf"prompt tuning.*Pass the tokens' input_ids.*LoRA.*MHA, GQA or MLA kind")
    with pytest.raises(ValueError, match=message):
        model(inputs_embeds=embeds)
    with pytest.raises(ValueError, match=message):
        model(inputs_embeds=embeds, labels=torch.zeros(2, 6, dtype=torch.long), attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match=message):
        model.generate(inputs_embeds=embeds, max_new_tokens=2, do_sample=False)


def test_embeddings_of_another_shape_are_refused(make_run):
    model = hf_model(make_run, "mla")
    ids = torch.randint(1, 300, (2, 6))
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match=r"input_ids \(2, 5\) and inputs_embeds \(2, 6, 64\) given together"):
        model(input_ids=ids[:, 1:], inputs_embeds=embeds)
    with pytest.raises(ValueError, match=r"inputs_embeds has shape \(2, 6, 32\).*hidden_size=64"):
        model(inputs_embeds=embeds[..., :32])
    with pytest.raises(ValueError, match="pass input_ids"):
        model()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["mha", "mla", "eg-mla"])
def test_generate_from_embeddings_on_cuda_gives_the_greedy_tokens_of_the_ids(variant, make_run):
    """On the device's fastest decode path (the Triton kernels): embeddings alone (MHA, MLA), or with their ids
    (EG-MLA), give the ids' tokens; their forward the ids' logits."""
    model = hf_model(make_run, variant).cuda()
    ids, mask = (t.cuda() for t in left_padded(PROMPTS))
    embeds = model.get_input_embeddings()(ids)
    settings = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        from_ids = model.generate(ids, **settings)
        assert torch.equal(model.generate(ids, inputs_embeds=embeds, **settings), from_ids)
        if variant not in GATED:
            assert model.generate(inputs_embeds=embeds, **settings).tolist() == from_ids[:, ids.shape[1]:].tolist()
            assert torch.equal(model(inputs_embeds=embeds, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits)
