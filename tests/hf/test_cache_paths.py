"""transformers' generate() over EgmlaCache on every variant and decode path: growth from a tiny
reservation, beam search's row selection and left padding give what the full forward gives; and the
'grouped' bug (token groups left behind when the cache grew past 256 positions) stays fixed."""
import pytest
import torch

import egmla.hf  # noqa: F401
from egmla.attention import decode_paths
from egmla.config import ModelConfig
from egmla.hf import EgmlaForCausalLM
from egmla.model import Transformer
from tests.conftest import perturbed
from tests.hf.conftest import SHAPE, VARIANTS

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [12, 250, 3]]
# the Triton 'kernel' path runs in the slow CPU interpreter: once per kernel is enough here
CASES = [(variant, path) for variant, kw in VARIANTS.items() for path in decode_paths(ModelConfig(**SHAPE, **kw))
         if path != "kernel" or variant in ("mla", "eg-mla")]


def hf_model(variant: str, path: str, **shape) -> EgmlaForCausalLM:
    torch.manual_seed(0)
    # perturbed before set_decode_path (which builds the gate tables): see tests.conftest.perturbed
    model = perturbed(Transformer(ModelConfig(**{**SHAPE, **shape}, **VARIANTS[variant]))).eval()
    model.set_decode_path(path)
    return EgmlaForCausalLM.from_egmla(model, pad_token_id=0)


@pytest.mark.parametrize("variant,path", CASES)
def test_growth_beams_and_left_padding_equal_the_full_forward(variant, path):
    model = hf_model(variant, path)
    model.cache_initial_length = 4  # grows 4 -> 8 -> 16 during the call
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, num_beams=2, do_sample=False, num_return_sequences=2)
    cached = model.generate(ids, **kwargs)
    recomputed = model.generate(ids, use_cache=False, **kwargs)  # the whole sequence every step, no cache
    assert torch.equal(cached, recomputed)


def test_grouped_generate_past_the_first_reservation_matches_naive():
    """The reported bug: a 250-token prompt and 20 new tokens on 'grouped' gave logits off by up to 1.02."""
    logits = {}
    prompt = torch.randint(1, SHAPE["vocab_size"], (1, 250), generator=torch.Generator().manual_seed(3))
    for path in ("naive", "grouped"):
        model = hf_model("eg-mla", path, max_seq_len=300)
        out = model.generate(prompt, max_new_tokens=20, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        logits[path] = torch.stack(out.logits)
    assert torch.isfinite(logits["grouped"]).all()
    assert ((logits["grouped"] - logits["naive"]).norm() / logits["naive"].norm()).item() < 1e-4
