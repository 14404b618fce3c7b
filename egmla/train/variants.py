"""Named attention variants: the rows of the paper's Table 1 and its ablations, as ModelConfig overrides
on top of a preset. Used by `egmla compare NAME...`, `egmla bench train` and the files in configs/."""
from __future__ import annotations

import difflib

from egmla.config import ModelConfig, preset

VARIANTS: dict[str, dict] = {
    "mha": dict(attention="mha"),
    "gqa4": dict(attention="gqa", n_kv_heads=4),
    "mla-kv256": dict(attention="mla", kv_lora_rank=256),
    "mla-kv64": dict(attention="mla", kv_lora_rank=64),
    "mla-kv16": dict(attention="mla", kv_lora_rank=16),
    "egmla-kv256": dict(attention="eg-mla", kv_lora_rank=256),
    "egmla-kv64": dict(attention="eg-mla", kv_lora_rank=64),
    "egmla-kv16": dict(attention="eg-mla", kv_lora_rank=16),
    # ablations of EG-MLA kv64 (paper: no LayerNorm, addition instead of multiplication, d_e sweep)
    "egmla-kv64-no-norm": dict(attention="eg-mla", kv_lora_rank=64, gate_norm="none"),
    "egmla-kv64-add": dict(attention="eg-mla", kv_lora_rank=64, gate_op="add"),
    "egmla-kv64-latent": dict(attention="eg-mla", kv_lora_rank=64, gate_placement="latent"),
    **{f"egmla-kv64-de{d}": dict(attention="eg-mla", kv_lora_rank=64, gate_dim=d)
       for d in (64, 128, 256, 512, 1024, 2048)},
}


def variant_config(name: str, base_preset: str = "tiny", **overrides) -> ModelConfig:
    """e.g. variant_config('mla-kv64', 'paper-base'); GQA falls back to MQA if heads are not divisible by 4."""
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, VARIANTS, n=1)
        raise ValueError(f"variant {name!r}: unknown; choose one of {', '.join(VARIANTS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    values = {**VARIANTS[name], **overrides}
    if values.get("attention") != "eg-mla":
        values.pop("gate_dim", None)
    return preset(base_preset, **values)
