"""Model configuration: one dataclass, the presets of docs/design.md §2, and validation with clear errors.

Every check names the field, the bad value and the fix, and runs once at construction. Each field's
annotation is its type and range (`PositiveInt`, `Literal[...]`): `check_field_types` validates them
strictly (no 2.5 for an int, no "yes" for a bool) with pydantic, for TOML, --set and Python alike.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Predicate

ATTENTION_KINDS = ("mha", "gqa", "mla", "eg-mla")
GATE_OPS = ("mul", "add", "bias", "bias-v")
GATE_INITS = ("random", "identity")
GATE_NORMS = ("layernorm", "rmsnorm", "none")
GATE_PLACEMENTS = ("up", "latent")

# Field types with their ranges; pydantic reads the annotated_types bounds.
PositiveInt = Annotated[int, Gt(0)]
NonNegativeInt = Annotated[int, Ge(0)]  # 0 has a meaning (a default, or "off")
PositiveFloat = Annotated[float, Gt(0), Predicate(math.isfinite)]  # (nan fails Gt; inf needs its own check)
NonNegativeFloat = Annotated[float, Ge(0), Predicate(math.isfinite)]


class ShapeRefused(ValueError):
    """A setting refused for the model's size alone (a KV-head count that does not divide n_heads, a head dim that is
    odd or not a divisor, a latent wider than d_model): the variant is fine, the shape cannot take it. A ValueError,
    so callers catching ValueError see no change; `egmla.variants.compared_configs` leaves such variants out of a
    comparison at small shapes (the kv256 rows at d_model 128) and lets every other error through."""


def _fail(field_name: str, value, fix: str, error: type[ValueError] = ValueError):
    raise error(f"{field_name}={value!r}: {fix}")


@functools.cache
def _field_validators(cls) -> dict:
    """{field name: (pydantic TypeAdapter, annotation)} of a config dataclass, built once per class."""
    from pydantic import TypeAdapter

    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: (TypeAdapter(hints[f.name]), hints[f.name]) for f in dataclasses.fields(cls)}


def check_field_types(config, prefix: str = "") -> None:
    """Validate every field of a config dataclass against its annotation, strictly, and store the
    validated value (an int given for a float field becomes a float). Raises a one-line ValueError
    naming the field (after `prefix`, e.g. "train."), the value and what is allowed."""
    from pydantic import ValidationError

    for name, (adapter, annotation) in _field_validators(type(config)).items():
        value = getattr(config, name)
        try:
            object.__setattr__(config, name, adapter.validate_python(value, strict=True))
        except ValidationError as err:
            error = err.errors()[0]
            if error["type"] == "literal_error":
                allowed = f"choose one of {', '.join(map(str, typing.get_args(annotation)))}"
            elif error["type"] == "bool_type":
                allowed = "must be true or false"
            elif error["type"] == "predicate_failed":  # the finite check
                allowed = "must be a finite number"
            else:
                allowed = error["msg"].replace("Input should be", "must be")
            _fail(f"{prefix}{name}", value, allowed)


@dataclass
class ModelConfig:
    """Shape of the decoder LM and its attention. Names follow DeepSeek-V2/V3 where they exist."""

    vocab_size: PositiveInt = 8192  # token ids 0..V-1; `egmla train` trains its BPE to this size
    n_layers: PositiveInt = 4  # decoder blocks
    d_model: PositiveInt = 256  # residual stream width
    n_heads: PositiveInt = 4  # query heads (n_h)
    ffn_hidden: NonNegativeInt = 0  # SwiGLU hidden width; 0 = 8/3·d_model rounded up to a multiple of 64
    max_seq_len: PositiveInt = 512  # longest sequence: RoPE table length and the largest cache
    rope_theta: PositiveFloat = 10000.0  # RoPE base frequency
    norm_eps: PositiveFloat = 1e-6  # epsilon of every RMSNorm / LayerNorm
    tie_embeddings: bool = True  # the output head shares the token embedding's weights
    init_std: PositiveFloat = 0.02  # std of the normal init of weight matrices (residual outputs get less)

    attention: Literal[ATTENTION_KINDS] = "eg-mla"  # mha | gqa | mla | eg-mla
    # MHA / GQA / MQA
    n_kv_heads: NonNegativeInt = 0  # 0 = n_heads (MHA); 1 = MQA
    head_dim: NonNegativeInt = 0  # 0 = d_model // n_heads
    # MLA / EG-MLA
    kv_lora_rank: NonNegativeInt = 64  # d_c: width of the cached latent
    q_lora_rank: NonNegativeInt = 0  # 0 = full-rank query projection
    qk_nope_head_dim: NonNegativeInt = 32  # d_n
    qk_rope_head_dim: NonNegativeInt = 32  # d_r: decoupled RoPE key, one per token shared by all heads
    v_head_dim: NonNegativeInt = 32  # d_v
    # EG-MLA gate
    gate_dim: NonNegativeInt = 512  # d_e: width of the per-layer token-embedding table
    gate_op: Literal[GATE_OPS] = "mul"  # mul (paper) | add (ablation) | bias, bias-v (controls: the table on K/V, V)
    gate_norm: Literal[GATE_NORMS] = "layernorm"  # layernorm (paper) | rmsnorm | none (ablation)
    gate_placement: Literal[GATE_PLACEMENTS] = "up"  # up (paper: gate the up-projected K/V) | latent (gate c_t)
    gate_init: Literal[GATE_INITS] = "random"  # random: g = W_UE e starts ~N(0,1) | identity: g = 1 + W_UE e, W_UE = 0

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def is_latent(self) -> bool:
        return self.attention in ("mla", "eg-mla")

    @property
    def is_gated(self) -> bool:
        return self.attention == "eg-mla"

    @property
    def kv_heads(self) -> int:
        if self.attention == "mha":
            return self.n_heads
        return self.n_kv_heads or self.n_heads

    @property
    def mha_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return -(-(8 * self.d_model // 3) // 64) * 64

    @property
    def kv_up_dim(self) -> int:
        """Width of W_UKV's output, n_h·(d_n + d_v): also the gate width for placement `up`."""
        return self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)

    @property
    def gate_out_dim(self) -> int:
        """Width of W_UE's output: the gate (n_h·(d_n + d_v) for placement `up`, d_c for `latent`), or for the
        V-only control (gate_op 'bias-v') the V half, n_h·d_v."""
        if self.gate_op == "bias-v":
            return self.n_heads * self.v_head_dim
        return self.kv_up_dim if self.gate_placement == "up" else self.kv_lora_rank

    @property
    def gate_norm_dim(self) -> int:
        """Width the gate's norm covers: the up-projected K/V (placement `up`) or the latent; also the width of the
        gate vector every path reads (the V-only control's has zeros in the K slots)."""
        return self.kv_up_dim if self.gate_placement == "up" else self.kv_lora_rank

    @property
    def adds_table(self) -> bool:
        """The same-table controls: the table is added after the norm and gates nothing."""
        return self.gate_op in ("bias", "bias-v")

    def kv_elements_per_token(self) -> int:
        """Cache elements per token over all layers (docs/design.md §3), excluding token ids."""
        if self.is_latent:
            return (self.kv_lora_rank + self.qk_rope_head_dim) * self.n_layers
        return 2 * self.kv_heads * self.mha_head_dim * self.n_layers

    def variant_name(self) -> str:
        if self.attention == "mha":
            return "MHA"
        if self.attention == "gqa":
            return "MQA" if self.kv_heads == 1 else f"GQA-{self.kv_heads}"
        name = "MLA" if self.attention == "mla" else "EG-MLA"
        tags = [f"kv{self.kv_lora_rank}"]
        if self.is_gated:
            if self.gate_placement != "up":
                tags.append(f"{self.gate_placement}-gate")
            if self.gate_op != "mul":
                tags.append(f"gate-{self.gate_op}")
            if self.gate_norm != "layernorm":
                tags.append(f"norm-{self.gate_norm}")
            if self.gate_init != "random":
                tags.append(f"{self.gate_init}-init")
        return f"{name} " + " ".join(tags)

    # ---- validation ----------------------------------------------------------------------
    def validate(self):
        check_field_types(self)
        if self.attention in ("mha", "gqa"):
            if self.attention == "mha" and self.n_kv_heads not in (0, self.n_heads):
                _fail("n_kv_heads", self.n_kv_heads,
                      "MHA uses one KV head per query head; set attention='gqa' or n_kv_heads=0")
            if self.n_heads % self.kv_heads:
                _fail("n_kv_heads", self.n_kv_heads,
                      f"n_heads={self.n_heads} must be divisible by it; pick a divisor of {self.n_heads}", ShapeRefused)
            if not self.head_dim and self.d_model % self.n_heads:
                _fail("d_model", self.d_model, f"must be divisible by n_heads={self.n_heads}, or set head_dim", ShapeRefused)
            if self.mha_head_dim % 2:
                _fail("head_dim", self.mha_head_dim, "RoPE rotates pairs: the head dim must be even", ShapeRefused)
        else:
            if self.n_kv_heads:
                _fail("n_kv_heads", self.n_kv_heads, f"has no meaning for attention={self.attention!r}; leave it 0")
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    _fail(name, getattr(self, name), "must be a positive integer")
            if self.qk_rope_head_dim % 2:
                _fail("qk_rope_head_dim", self.qk_rope_head_dim, "RoPE rotates pairs: use an even number")
            for name in ("kv_lora_rank", "q_lora_rank"):  # W_D projects d_model inputs: rank <= d_model
                if getattr(self, name) > self.d_model:
                    _fail(name, getattr(self, name), f"a latent wider than d_model={self.d_model} compresses "
                                                     f"nothing (its extra columns are linearly dependent); use <= {self.d_model}",
                          ShapeRefused)
        if self.is_gated:
            if self.gate_dim <= 0:
                _fail("gate_dim", self.gate_dim, "must be a positive integer (the paper uses 512)")
            if self.adds_table and self.gate_placement != "up":
                _fail("gate_op", self.gate_op, "the same-table controls add the table to the up-projected K/V; "
                                               "use gate_placement='up'")
            if self.gate_init == "identity" and self.gate_op != "mul":
                _fail("gate_init", self.gate_init, f"an identity start (g = 1) means something only for a "
                                                   f"multiplying gate, not gate_op={self.gate_op!r}; use 'random'")
        else:
            defaults = ModelConfig.__dataclass_fields__
            for name in ("gate_op", "gate_norm", "gate_placement", "gate_dim", "gate_init"):
                if getattr(self, name) != defaults[name].default:
                    _fail(name, getattr(self, name),
                          f"gate options apply only to attention='eg-mla', not {self.attention!r}; remove it")

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        return cls(**check_keys(cls, values, where="model"))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **check_keys(type(self), changes, where="model"))


def check_keys(cls, values: dict, where: str) -> dict:
    """Reject unknown keys, suggesting the closest known one."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            raise ValueError(f"{where}.{key}: unknown config key{known_keys_hint(key, known)}")
    return values


def known_keys_hint(key: str, known: list[str]) -> str:
    """'; did you mean 'x'?' with the known key closest to `key`, or '; known keys: ...' where none is close."""
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"


# docs/design.md §2. The EG-MLA defaults (kv64, d_e = 512) are the paper's headline configuration.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=8192, n_layers=4, d_model=256, n_heads=4, qk_nope_head_dim=32,
                 qk_rope_head_dim=32, v_head_dim=32, kv_lora_rank=64, gate_dim=256, max_seq_len=512),
    "paper-base": dict(vocab_size=32768, n_layers=12, d_model=768, n_heads=12, qk_nope_head_dim=64,
                       qk_rope_head_dim=64, v_head_dim=64, kv_lora_rank=64, gate_dim=512,
                       ffn_hidden=2048, max_seq_len=1024),
    "paper-1b": dict(vocab_size=32768, n_layers=24, d_model=2048, n_heads=16, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=128, gate_dim=512,
                     ffn_hidden=5632, max_seq_len=2048),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset's config with overrides, e.g. `preset("paper-base", attention="mla", kv_lora_rank=256)`.

    Switching to a non-gated variant drops the gate fields; switching to MHA/GQA keeps the shape."""
    if not isinstance(name, str):  # `preset = 5` in a TOML file: difflib below would raise a TypeError
        _fail("preset", name, f"give a preset name as a string, one of {', '.join(PRESETS)}")
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        raise ValueError(f"preset={name!r}: unknown preset; choose one of {', '.join(PRESETS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    values = dict(PRESETS[name])
    if overrides.get("attention", "eg-mla") != "eg-mla":
        values.pop("gate_dim", None)
    values.update(overrides)
    return ModelConfig(**check_keys(ModelConfig, values, where="model"))
