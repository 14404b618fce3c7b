"""Bad configuration gets a ValueError that names the field and the fix."""
import pytest
import torch

from egmla.config import ModelConfig, preset
from egmla.model import Transformer
from tests.conftest import small_config

BAD = [
    (dict(attention="gqa", n_heads=6, n_kv_heads=4), "n_kv_heads"),
    (dict(attention="mha", n_kv_heads=2), "n_kv_heads"),
    (dict(attention="mla", qk_rope_head_dim=5), "qk_rope_head_dim"),
    (dict(attention="mla", kv_lora_rank=0), "kv_lora_rank"),
    (dict(attention="mla", kv_lora_rank=-8), "kv_lora_rank"),
    (dict(attention="mla", v_head_dim=0), "v_head_dim"),
    (dict(attention="eg-mla", gate_dim=0), "gate_dim"),
    (dict(attention="eg-mla", gate_op="xor"), "gate_op"),
    (dict(attention="eg-mla", gate_norm="batchnorm"), "gate_norm"),
    (dict(attention="eg-mla", gate_placement="out"), "gate_placement"),
    (dict(attention="mla", gate_op="add"), "gate_op"),
    (dict(attention="mha", gate_norm="none"), "gate_norm"),
    (dict(attention="gqa", n_kv_heads=2, gate_dim=64), "gate_dim"),
    (dict(attention="mha", d_model=50, n_heads=4), "d_model"),
    (dict(attention="mha", head_dim=7), "head_dim"),
    (dict(attention="flash"), "attention"),
    (dict(n_layers=0), "n_layers"),
    (dict(vocab_size=-1), "vocab_size"),
]


@pytest.mark.parametrize("values,field", BAD)
def test_bad_config_names_the_field(values, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        ModelConfig(**values)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'kv_lora_rank'"):
        preset("tiny", kv_lora_rnak=32)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("paper-huge")


@pytest.mark.parametrize("name", [5, ["tiny"], None])
def test_a_preset_that_is_not_a_string_is_one_line(name):
    with pytest.raises(ValueError, match=r"^preset=.*: give a preset name as a string, one of tiny"):
        preset(name)


def test_token_ids_beyond_vocab_are_rejected():
    model = Transformer(small_config(attention="eg-mla"))
    with pytest.raises(ValueError, match="vocab_size=61"):
        model(torch.tensor([[1, 2, 61]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[-1, 2]]))


def test_sequence_longer_than_cache_or_context_is_rejected():
    model = Transformer(small_config(attention="mla"))
    cache = model.new_cache(1, max_len=8)
    model(torch.zeros(1, 6, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max_len=8"):
        model(torch.zeros(1, 3, dtype=torch.long), cache)
    assert int(cache.lengths[0]) == 6  # the failed call changed nothing
    with pytest.raises(ValueError, match="max_seq_len=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.new_cache(1, max_len=49)


def test_unknown_decode_path_is_rejected():
    model = Transformer(small_config(attention="mha"))
    with pytest.raises(ValueError, match="decode_path='absorbed'.*choose one of naive"):
        model.set_decode_path("absorbed")


def test_config_round_trips_through_dict():
    config = preset("paper-base", attention="mla", kv_lora_rank=256)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.variant_name() == "MLA kv256"
