"""The named attention variants: the paper's Table 1 rows and ablations, in one table.

A variant is a name (what `egmla compare`, `egmla bench ... --variants` and configs/NAME.toml use) and the
ModelConfig fields it sets on top of a shape (a preset, or the shape of another config). Everything else
about a variant is derived, never copied: its display name is `ModelConfig.variant_name()`, its decode paths
come from its attention class (`egmla.attention.decode_paths`). Accounting, the benchmarks, `egmla compare`,
the experiments and the config files read this table, so one entry reaches all of them. The exactness tests read it
too: each kind of variant here (tests/variant_kinds.py) is in their three tables, at small shapes (tests/conftest.py,
tests/hf/conftest.py, tests/infer/helpers.py). docs/design.md §6 lists what a new variant touches.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from egmla.config import ModelConfig, ShapeRefused, preset

# The fields a variant may set; every other field is the shape it is applied to.
ATTENTION_FIELDS = ("attention", "n_kv_heads", "kv_lora_rank", "gate_dim", "gate_op", "gate_norm",
                    "gate_placement", "gate_init")


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict = field(hash=False)  # ModelConfig fields (ATTENTION_FIELDS only)
    # In the comparison set of accounting (`egmla kv-report`, `egmla plan`, `bench generate --all-variants`):
    # one row per cache layout. The ablations and MLA kv16 add no cache layout those rows do not show.
    compared: bool = True

    def __post_init__(self):
        unknown = sorted(set(self.overrides) - set(ATTENTION_FIELDS))
        if unknown:  # a shape field, or a new attention field not yet listed (docs/design.md §6, step 1)
            raise ValueError(f"variant {self.name!r}: {', '.join(unknown)} not in ATTENTION_FIELDS "
                             f"({', '.join(ATTENTION_FIELDS)}); a variant sets only those, on top of a shape. A "
                             f"field that describes the attention (a new one) belongs in ATTENTION_FIELDS in "
                             f"egmla/variants.py; a size of the model belongs in the preset or the config")

    def config(self, shape: str | ModelConfig = "tiny", **overrides) -> ModelConfig:
        """This variant at the shapes of a preset (by name) or of another config, plus `overrides`.
        From a config, d_e is kept if both are EG-MLA (it is part of the gate's shape)."""
        values = {**self.overrides, **overrides}
        if values.get("attention") != "eg-mla":
            values.pop("gate_dim", None)
        if isinstance(shape, str):
            return preset(shape, **values)
        kept = {f.name: getattr(shape, f.name) for f in dataclasses.fields(ModelConfig)
                if f.name not in ATTENTION_FIELDS or (f.name == "gate_dim" and shape.is_gated
                                                      and values.get("attention") == "eg-mla")}
        return ModelConfig(**{**kept, **values})

    def display_name(self, shape: str | ModelConfig = "tiny") -> str:
        """e.g. 'MLA kv64', 'GQA-4' (ModelConfig.variant_name: the name tables and plots show)."""
        return self.config(shape).variant_name()

    def decode_paths(self, shape: str | ModelConfig = "tiny") -> tuple[str, ...]:
        """The decode paths of this variant's attention class at that shape; the first is the default."""
        from egmla.attention import decode_paths  # the attention layer, imported only when asked

        return decode_paths(self.config(shape))


def _table(*variants: Variant) -> dict[str, Variant]:
    return {v.name: v for v in variants}


EG_KV64 = dict(attention="eg-mla", kv_lora_rank=64)
VARIANTS: dict[str, Variant] = _table(
    Variant("mha", dict(attention="mha")),
    Variant("gqa4", dict(attention="gqa", n_kv_heads=4)),
    Variant("mla-kv256", dict(attention="mla", kv_lora_rank=256)),
    Variant("mla-kv64", dict(attention="mla", kv_lora_rank=64)),
    Variant("mla-kv16", dict(attention="mla", kv_lora_rank=16), compared=False),
    Variant("egmla-kv256", dict(attention="eg-mla", kv_lora_rank=256)),
    Variant("egmla-kv64", EG_KV64),
    Variant("egmla-kv16", dict(attention="eg-mla", kv_lora_rank=16)),
    # ablations of EG-MLA kv64 (paper: no LayerNorm, addition instead of multiplication, d_e sweep)
    Variant("egmla-kv64-no-norm", dict(EG_KV64, gate_norm="none"), compared=False),
    Variant("egmla-kv64-add", dict(EG_KV64, gate_op="add"), compared=False),
    Variant("egmla-kv64-latent", dict(EG_KV64, gate_placement="latent")),
    *(Variant(f"egmla-kv64-de{d}", dict(EG_KV64, gate_dim=d), compared=False) for d in (64, 128, 256, 1024, 2048)),
    # controls of EG-MLA kv64 with all of its parameters (issue 18): the same table added to K/V after the
    # norm, gating nothing (egmla/attention/table_bias.py); and the gate started at exactly 1
    # (egmla/attention/egmla.py). The first
    # is in the comparison set (kv-report, plan): at 131 M tokens it beats EG-MLA kv64 (docs/RESULTS.md)
    Variant("egmla-kv64-bias", dict(EG_KV64, gate_op="bias")),
    Variant("egmla-kv64-identity", dict(EG_KV64, gate_init="identity"), compared=False),
    # the same table on V alone ("value embeddings"): do the keys need the table? (W_UE half as wide; the lowest
    # loss at 131 M tokens, docs/RESULTS.md: in the comparison set too)
    Variant("egmla-kv64-bias-v", dict(EG_KV64, gate_op="bias-v")),
)


def variant(name: str) -> Variant:
    """The registered variant `name`; an unknown name fails with the closest known one."""
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, VARIANTS, n=1)
        raise ValueError(f"variant {name!r}: unknown; choose one of {', '.join(VARIANTS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    return VARIANTS[name]


def variant_config(name: str, shape: str | ModelConfig = "tiny", **overrides) -> ModelConfig:
    """e.g. variant_config('mla-kv64', 'paper-base'), variant_config('gqa4', some_config)."""
    return variant(name).config(shape, **overrides)


def select(names: str, what: str = "--variants") -> list[Variant]:
    """Variants from a comma-separated list of names ('all' = every one), for command-line options."""
    if names.strip() == "all":
        return list(VARIANTS.values())
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    if not chosen:
        raise ValueError(f"{what} {names!r}: name at least one variant ({', '.join(VARIANTS)}) or 'all'")
    try:
        return [variant(n) for n in chosen]
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def labels(variants: list[Variant], shape: str | ModelConfig = "tiny") -> dict[str, str]:
    """{name: label} for a table of these variants: the display name, or the variant's name where two of
    them share a display name (the d_e sweep: every one is 'EG-MLA kv64')."""
    shown = {v.name: v.display_name(shape) for v in variants}
    repeated = {label for label in shown.values() if list(shown.values()).count(label) > 1}
    return {name: name if label in repeated else label for name, label in shown.items()}


def compared_configs(shape: ModelConfig) -> list[ModelConfig]:
    """The comparison set (Variant.compared) at the shape of `shape`; a variant that cannot take this
    shape for its size (ShapeRefused: GQA-4 with a head count not divisible by 4, kv256 wider than d_model) is left
    out. Any other error is raised: a row that fails for another reason is a bug (a field missing from
    ATTENTION_FIELDS, copied from `shape` into every row), not a row to drop."""
    configs = []
    for v in VARIANTS.values():
        if v.compared:
            try:
                configs.append(v.config(shape))
            except ShapeRefused:
                continue
    return configs


def check_configs(folder: str | Path, ignore=("tiny",)) -> list[str]:
    """What is wrong between the table and the config files in `folder` (configs/): a variant without a
    NAME.toml, a NAME.toml that is no variant, or a file whose [model] (its preset plus its fields) differs
    from the variant at that preset. Empty when they agree."""
    from egmla.configfile import load_toml

    files = {p.stem: p for p in sorted(Path(folder).glob("*.toml")) if p.stem not in ignore}
    problems = [f"variant {name!r} has no config file {Path(folder) / (name + '.toml')}"
                for name in VARIANTS if name not in files]
    for stem, path in files.items():
        if stem not in VARIANTS:
            problems.append(f"{path}: no variant named {stem!r} in egmla.variants.VARIANTS")
            continue
        model = dict(load_toml(path).get("model", {}))
        shape = model.pop("preset", "tiny")  # the [model] section's convention (egmla.train.config.RunConfig)
        written, expected = preset(shape, **model), variant_config(stem, shape)
        if written != expected:
            diff = {k: (v, getattr(expected, k)) for k, v in written.to_dict().items() if getattr(expected, k) != v}
            problems.append(f"{path}: [model] differs from variant {stem!r} at {shape} (file, table): {diff}")
    return problems
