"""EgmlaConfig: DeepSeek field names, exact mapping to and from ModelConfig, Auto registration."""
import dataclasses

import pytest
from transformers import AutoConfig

import egmla.hf  # noqa: F401  (registers model_type "egmla")
from egmla.config import ModelConfig
from egmla.hf import EgmlaConfig

DEEPSEEK_FIELDS = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_theta",
                   "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                   "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")


def test_round_trip_to_model_config(variant, tiny_config):
    config = tiny_config(variant)
    hf_config = EgmlaConfig.from_model_config(config, eos_token_id=0)
    assert hf_config.to_model_config() == config
    assert hf_config.attention_kind == config.attention
    assert hf_config.intermediate_size == config.ffn_dim  # stored resolved
    assert hf_config.num_key_value_heads == (config.kv_heads if not config.is_latent else config.n_heads)


@pytest.mark.parametrize("attention", ["mla", "eg-mla", "mha"])
def test_round_trip_below_the_default_latent_width(attention):
    """A d_model under ModelConfig's default kv_lora_rank (64): the default SwiGLU width is read without it."""
    config = ModelConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=64, attention=attention,
                         **({"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}
                            if attention != "mha" else {}), **({"gate_dim": 8} if attention == "eg-mla" else {}))
    assert EgmlaConfig.from_model_config(config).to_model_config() == config


def test_deepseek_field_names_and_json_round_trip(tmp_path, tiny_config):
    config = tiny_config("mla-qlora-untied")
    hf_config = EgmlaConfig.from_model_config(config, eos_token_id=0, pad_token_id=0)
    saved = hf_config.to_dict()
    for name in DEEPSEEK_FIELDS + ("gate_dim", "gate_op", "gate_norm", "gate_placement", "attention_kind"):
        assert name in saved, name
    assert saved["q_lora_rank"] == 24 and saved["tie_word_embeddings"] is False
    hf_config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)  # no trust_remote_code
    assert type(loaded) is EgmlaConfig
    assert loaded.to_model_config() == config and loaded.eos_token_id == 0


def test_every_model_config_field_is_declared_on_egmla_config():
    """EgmlaConfig lists its fields by hand; one missing passes a round trip (from_model_config hands it over as an
    extra attribute) but a default EgmlaConfig() fails with a bare AttributeError far from the cause."""
    from egmla.hf.configuration_egmla import HF_NAMES

    declared = {field.name for field in dataclasses.fields(EgmlaConfig)}
    missing = [name for name in ModelConfig.__dataclass_fields__ if HF_NAMES.get(name, name) not in declared]
    assert not missing, (f"EgmlaConfig lacks ModelConfig's {', '.join(missing)}: declare each as `NAME: type = "
                         f"_DEFAULT.NAME` in egmla/hf/configuration_egmla.py")


def test_full_rank_query_is_none_as_in_deepseek(tiny_config):
    assert EgmlaConfig.from_model_config(tiny_config("mla")).q_lora_rank is None


def test_invalid_config_names_the_hf_field():
    with pytest.raises(ValueError, match="num_hidden_layers=0"):
        EgmlaConfig(num_hidden_layers=0)
    with pytest.raises(ValueError, match="attention_kind='mqa'"):
        EgmlaConfig(attention_kind="mqa")


def test_auto_config_for_model_type():
    config = AutoConfig.for_model("egmla", hidden_size=96, num_attention_heads=4)
    assert isinstance(config, EgmlaConfig)
    assert config.to_model_config() == ModelConfig(d_model=96, n_heads=4)


@pytest.mark.parametrize("field", ["rope_scaling", "rope_parameters"])
def test_rope_scaling_is_refused_not_ignored(field, tiny_config):
    """egmla's RoPE has no scaling: a config asking for one (linear, yarn, ...) would load and be silently ignored."""
    values = EgmlaConfig.from_model_config(tiny_config("mla")).to_dict()
    with pytest.raises(ValueError, match="rope_(parameters|scaling)=.*egmla.s RoPE has no scaling"):  # 5.2x renames
        EgmlaConfig(**{**values, field: {"rope_type": "linear", "factor": 4.0}}).to_model_config()
    EgmlaConfig(**{**values, field: {"rope_type": "default", "rope_theta": 10000.0}}).to_model_config()
