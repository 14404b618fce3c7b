"""`EgmlaConfig`: a transformers `PreTrainedConfig` for every egmla attention variant.

Field names are transformers'/DeepSeek-V3's where they exist (hidden_size, num_hidden_layers, kv_lora_rank,
qk_rope_head_dim, ...); the rest (attention_kind, gate_*) are egmla's. `to_model_config()` and
`from_model_config()` map to and from `egmla.config.ModelConfig`, which stays the one place that validates
a model's shape: an invalid EgmlaConfig raises its ValueError, with the field renamed to the HF name.
"""
from __future__ import annotations

import re

from transformers import PretrainedConfig

from egmla.config import ModelConfig

# ModelConfig field -> EgmlaConfig field (only the renamed ones; the others keep their name).
HF_NAMES = {
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "ffn_hidden": "intermediate_size",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
    "attention": "attention_kind",
}
_DEFAULT = ModelConfig()  # EgmlaConfig's defaults are ModelConfig's: one source of truth


class EgmlaConfig(PretrainedConfig):
    """Configuration of `EgmlaForCausalLM`. Sizes that ModelConfig derives (intermediate_size,
    num_key_value_heads, head_dim) are stored resolved, so readers need not know egmla's rules."""

    model_type = "egmla"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = _DEFAULT.vocab_size
    hidden_size: int = _DEFAULT.d_model
    num_hidden_layers: int = _DEFAULT.n_layers
    num_attention_heads: int = _DEFAULT.n_heads
    intermediate_size: int | None = None  # None = egmla's default, 8/3·hidden_size rounded up to 64
    max_position_embeddings: int = _DEFAULT.max_seq_len
    rope_theta: float = _DEFAULT.rope_theta
    rms_norm_eps: float = _DEFAULT.norm_eps
    tie_word_embeddings: bool = _DEFAULT.tie_embeddings
    initializer_range: float = _DEFAULT.init_std
    attention_kind: str = _DEFAULT.attention  # mha | gqa | mla | eg-mla
    # MHA / GQA
    num_key_value_heads: int | None = None  # None = num_attention_heads
    head_dim: int | None = None  # None = hidden_size // num_attention_heads (MHA/GQA only)
    # MLA / EG-MLA (DeepSeek-V3 names and meaning; q_lora_rank None = full-rank query)
    kv_lora_rank: int = _DEFAULT.kv_lora_rank
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = _DEFAULT.qk_nope_head_dim
    qk_rope_head_dim: int = _DEFAULT.qk_rope_head_dim
    v_head_dim: int = _DEFAULT.v_head_dim
    # EG-MLA gate
    gate_dim: int = _DEFAULT.gate_dim
    gate_op: str = _DEFAULT.gate_op
    gate_norm: str = _DEFAULT.gate_norm
    gate_placement: str = _DEFAULT.gate_placement
    gate_init: str = _DEFAULT.gate_init
    # Special tokens and generation
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        model_config = self.to_model_config()  # validates
        # Store derived sizes resolved (HF code and readers expect concrete numbers).
        self.intermediate_size = model_config.ffn_dim
        if model_config.is_latent:
            self.num_key_value_heads, self.head_dim = self.num_attention_heads, None
        else:
            self.num_key_value_heads, self.head_dim = model_config.kv_heads, model_config.mha_head_dim

    def to_model_config(self) -> ModelConfig:
        """The equivalent `egmla.config.ModelConfig` (derived sizes back to egmla's 0 = default)."""
        for name in ("rope_parameters", "rope_scaling"):  # transformers keeps them; egmla's RoPE has no scaling
            rope = getattr(self, name, None)
            if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ValueError(f"{name}={rope!r}: egmla's RoPE has no scaling (it would be ignored); remove "
                                 f"rope_parameters (rope_scaling in older configs) or give rope_type 'default'; a "
                                 f"longer max_position_embeddings needs training at that length")
        values = {name: getattr(self, HF_NAMES.get(name, name)) for name in ModelConfig.__dataclass_fields__}
        values["q_lora_rank"] = values["q_lora_rank"] or 0
        latent = values["attention"] in ("mla", "eg-mla")
        heads = values["n_heads"]
        if latent or values["attention"] == "mha" or values["n_kv_heads"] in (None, heads):
            values["n_kv_heads"] = 0
        if latent or values["head_dim"] is None or values["head_dim"] * heads == values["d_model"]:
            values["head_dim"] = 0
        if values["ffn_hidden"] is None or values["ffn_hidden"] == _default_ffn(values["d_model"]):
            values["ffn_hidden"] = 0
        try:
            return ModelConfig(**values)
        except ValueError as err:
            raise ValueError(_rename_fields(str(err))) from None

    @classmethod
    def from_model_config(cls, model_config: ModelConfig, **kwargs) -> "EgmlaConfig":
        """EgmlaConfig of an egmla ModelConfig; kwargs add HF fields (eos_token_id=..., ...)."""
        values = {HF_NAMES.get(name, name): value for name, value in model_config.to_dict().items()}
        values["q_lora_rank"] = values["q_lora_rank"] or None
        for name in ("num_key_value_heads", "head_dim", "intermediate_size"):
            values[name] = values[name] or None  # 0 = default; __post_init__ stores the resolved size
        return cls(**values, **kwargs)


def _default_ffn(d_model: int) -> int:
    """ModelConfig's SwiGLU width for d_model when ffn_hidden is 0 (read from a config of that width alone: one
    with MHA and no latent, valid at any d_model)."""
    return ModelConfig(d_model=d_model, n_heads=1, attention="mha").ffn_dim


def _rename_fields(message: str) -> str:
    """Put the HF field names into a ModelConfig validation message."""
    for ours, theirs in HF_NAMES.items():
        message = re.sub(rf"\b{ours}\b", theirs, message)
    return message
