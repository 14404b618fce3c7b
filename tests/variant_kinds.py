"""The kinds of attention variant the exactness tests run, read from the registry (egmla.variants.VARIANTS).

A kind is what a variant chooses, not its sizes: the attention fields with a choice of values (`kind_fields()`:
attention, gate_op, gate_norm, gate_placement, gate_init; any new Literal or bool one). `KINDS` holds one entry per
kind in the registry, named after the first variant of that kind with its sizes dropped and its family spelt as
`attention`: 'egmla-kv64-no-norm' -> 'eg-mla-no-norm', 'mla-kv256' -> 'mla', 'gqa4' -> 'gqa'. The three tables of
the exactness tests (tests/conftest.VARIANTS, tests/hf/conftest.VARIANTS, tests/infer/helpers.VARIANTS) are `KINDS`
at their own small shapes plus entries of their own that are no registered kind (MQA, a low-rank query, untied
embeddings): a registry entry of a new kind reaches all three under one name, with no edit here (docs/design.md §6).
"""
from __future__ import annotations

import re
import typing

from egmla.config import ModelConfig
from egmla.variants import ATTENTION_FIELDS, VARIANTS

# A size a kind needs at the tables' shapes (4 query heads): GQA with 2 query heads per KV head, so that the grouping
# is exercised (the registry's GQA-4 has as many KV heads as these shapes have query heads).
SMALL_SIZES = {"gqa": dict(n_kv_heads=2)}


def kind_fields() -> tuple[str, ...]:
    """The attention fields that make a kind of variant: each one a choice of values (a Literal: attention, gate_op,
    ...; or a bool), not a size (kv_lora_rank, gate_dim, n_kv_heads). Read from ModelConfig's annotations, so a new
    attention field is a kind here as soon as it is in ATTENTION_FIELDS (until 2026-12-06 the list was written out,
    and a reader's new field passed the guard while no exactness table held its variant)."""
    hints = typing.get_type_hints(ModelConfig)
    return tuple(f for f in ATTENTION_FIELDS if typing.get_origin(hints[f]) is typing.Literal or hints[f] is bool)


def kind_of(config: ModelConfig) -> tuple:
    """The values of `kind_fields()` in `config`."""
    return tuple(getattr(config, f) for f in kind_fields())


def kind_name(variant_name: str, attention: str) -> str:
    """'egmla-kv64-no-norm' -> 'eg-mla-no-norm': the registry's name less its sizes (kv64, de512, the 4 of gqa4),
    its first word replaced by the attention kind."""
    words = [w for w in variant_name.split("-") if not re.fullmatch(r"(kv|de)\d+", w)]
    return "-".join([attention, *words[1:]])


def registered_kinds() -> dict[str, dict]:
    """{name: ModelConfig fields} of each kind in the registry, in its order: the kind fields it sets away from
    ModelConfig's defaults (attention always), plus `SMALL_SIZES`. No other sizes: each table adds its shape."""
    defaults = ModelConfig.__dataclass_fields__
    kinds, named_after, seen = {}, {}, set()
    for v in VARIANTS.values():
        config = v.config("tiny")
        if kind_of(config) in seen:
            continue
        seen.add(kind_of(config))
        name = kind_name(v.name, config.attention)
        if name in kinds:
            raise ValueError(f"variants {named_after[name]!r} and {v.name!r} are different kinds both named {name!r} "
                             f"in the exactness tests (tests/variant_kinds.kind_name); rename one in egmla/variants.py "
                             f"so that the names differ once their kv and de sizes are dropped")
        named_after[name] = v.name
        kinds[name] = {**{f: getattr(config, f) for f in kind_fields()
                          if f == "attention" or getattr(config, f) != defaults[f].default},
                       **SMALL_SIZES.get(config.attention, {})}
    return kinds


# The latent sizes of the HF and engine tables (tests/hf/conftest.py, tests/infer/helpers.py).
LATENT = dict(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def with_latent_sizes(kinds: dict[str, dict], gate_dim: int = 32) -> dict[str, dict]:
    """`kinds` with `LATENT` on each latent one (MLA, EG-MLA) and d_e = gate_dim on each gated one."""
    def sizes(fields: dict) -> dict:
        config = ModelConfig(**fields)
        return {**(LATENT if config.is_latent else {}), **({"gate_dim": gate_dim} if config.is_gated else {})}

    return {name: {**fields, **sizes(fields)} for name, fields in kinds.items()}


KINDS = registered_kinds()
