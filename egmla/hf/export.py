"""Export a run directory to Hugging Face formats.

    export_hf(run, out)        EgmlaForCausalLM checkpoint (any variant): config.json, model.safetensors,
                               tokenizer; loads with AutoModelForCausalLM after `import egmla.hf`, or with
                               trust_remote_code=True without it (two one-line modules + auto_map)
    export_deepseek(run, out)  MLA runs only: a DeepseekV3ForCausalLM checkpoint (dense MLP, no MoE, no
                               MTP, interleaved RoPE as DeepSeek's own weights, no RoPE scaling) that
                               transformers, and engines that serve DeepSeek-V3, load with no egmla code

Our MLA weights already follow DeepSeek-V3's inference code (wq_a/q_norm/wq_b, wkv_a, kv_norm, wkv_b
rows per head [k_nope; v], wo; SwiGLU w1/w3/w2), so the DeepSeek export is a renaming, except for RoPE: we
rotate half-split pairs (i, i + d_r/2), DeepSeek's weights interleaved pairs (2i, 2i+1), which is all vLLM and
SGLang implement (transformers follows `rope_interleave`). The rows that make q^R and k^R are reordered so that
interleaved pair i holds our pair i: the same rotations, the same scores. The output folder is written next to
its destination and renamed into place when complete.
"""
from __future__ import annotations

import json

import os
import shutil
import tempfile
from pathlib import Path

import torch

from egmla.config import ModelConfig
from egmla.runs import fsync_path, umask_mode

# egmla layer weight -> DeepseekV3 layer weight (under model.layers.{i}.)
DEEPSEEK_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}
DEEPSEEK_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                      "output.weight": "lm_head.weight"}
DEEPSEEK_NORM_EPS = 1e-6  # transformers' DeepseekV3 builds q_a_layernorm / kv_a_layernorm with this eps


def deepseek_config(config: ModelConfig, dtype: torch.dtype | None = None, **token_ids):
    """A DeepseekV3Config computing exactly what our MLA model computes.

    first_k_dense_replace = num_hidden_layers makes every layer a dense SwiGLU MLP (no MoE, so the
    expert fields are unused); rope_interleave=True with the rows `deepseek_state_dict` reorders; default
    RoPE (no YaRN, so no mscale) keeps the softmax scale 1/sqrt(d_n + d_r); num_mtp_layers=0: no MTP head;
    lm_head always written (vLLM's DeepSeek class never ties it to the embedding)."""
    from transformers import DeepseekV3Config

    if config.attention != "mla":
        raise ValueError(f"attention={config.attention!r}: only MLA runs have a DeepSeek-V3 equivalent "
                         f"(EG-MLA's gate and MHA/GQA do not exist there); use --to hf")
    return DeepseekV3Config(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads, kv_lora_rank=config.kv_lora_rank,
        q_lora_rank=config.q_lora_rank or None, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
        first_k_dense_replace=config.n_layers, num_mtp_layers=0, hidden_act="silu",
        max_position_embeddings=config.max_seq_len, initializer_range=config.init_std,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, rope_interleave=True,
        attention_bias=False, architectures=["DeepseekV3ForCausalLM"], dtype=dtype, **token_ids)


def interleaved_rope_rows(d_r: int) -> torch.Tensor:
    """Row order [0, d_r/2, 1, d_r/2 + 1, ...]: interleaved pair (2i, 2i+1) of the reordered rows is half-split
    pair (i, i + d_r/2) of ours, rotated by the same angle."""
    half = torch.arange(d_r // 2)
    return torch.stack([half, half + d_r // 2], dim=1).flatten()


def deepseek_state_dict(model) -> dict[str, torch.Tensor]:
    """Our MLA Transformer's weights under DeepseekV3ForCausalLM's names, the RoPE rows in DeepSeek's interleaved
    order (`interleaved_rope_rows`), lm_head written even where tied."""
    config = model.config
    d_c, d_n, d_r = config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim
    order = interleaved_rope_rows(d_r)
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("attn.wq.weight", "attn.wq_b.weight")):  # per head [q^C ; q^R] rows
            per_head = tensor.view(config.n_heads, d_n + d_r, -1)
            tensor = torch.cat([per_head[:, :d_n], per_head[:, d_n:][:, order]], dim=1).flatten(0, 1)
        elif name.endswith("attn.wkv_a.weight"):  # [c ; k^R] rows
            tensor = torch.cat([tensor[:d_c], tensor[d_c:][order]])
        if name in DEEPSEEK_TOP_NAMES:
            out[DEEPSEEK_TOP_NAMES[name]] = tensor
            continue
        prefix, index, rest = name.split(".", 2) if name.startswith("layers.") else (name, "", "")
        if rest not in DEEPSEEK_LAYER_NAMES:
            raise ValueError(f"weight {name!r} has no DeepSeek-V3 counterpart: export this run with --to hf")
        out[f"model.layers.{index}.{DEEPSEEK_LAYER_NAMES[rest]}"] = tensor
    if "lm_head.weight" not in out:  # tied: the embedding again
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return {name: tensor.detach().contiguous().clone() for name, tensor in out.items()}


def export_hf(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """Write the run as an EgmlaForCausalLM folder (safetensors + config + tokenizer)."""
    from egmla.hf import require_transformers

    require_transformers()
    from egmla.hf import EgmlaForCausalLM
    from egmla.hf.tokenizer import hf_tokenizer, special_token_ids
    from egmla.runs import load_model, load_tokenizer

    model, _ = load_model(run_dir, dtype=dtype, checkpoint=checkpoint)
    hf_model = EgmlaForCausalLM.from_egmla(model, **special_token_ids(load_tokenizer(run_dir)))
    tokenizer = hf_tokenizer(run_dir, model.config.max_seq_len)
    with _staging(out_dir) as staging:
        hf_model.save_pretrained(staging)  # with the trust_remote_code modules (EgmlaForCausalLM.save_pretrained)
        tokenizer.save_pretrained(staging)
    return Path(out_dir)


# Two one-line modules beside the weights and config.json's "auto_map" pointing at them, so that any program that
# loads with trust_remote_code=True finds the classes without `import egmla.hf` first: stock `lm_eval --model hf`,
# transformers' pipelines and scripts. They import the installed egmla (not a copy of its code), so the folder
# always runs the installed version's model, as `import egmla.hf` does.
REMOTE_CODE = {
    "configuration_egmla.py": "EgmlaConfig",
    "modeling_egmla.py": "EgmlaForCausalLM",
}
AUTO_MAP = {"AutoConfig": "configuration_egmla.EgmlaConfig", "AutoModelForCausalLM": "modeling_egmla.EgmlaForCausalLM"}


def write_remote_code(folder: Path) -> None:
    """Add the trust_remote_code modules and config.json's auto_map to an EgmlaForCausalLM folder."""
    for name, cls in REMOTE_CODE.items():
        (folder / name).write_text(
            f'"""Loads this folder with trust_remote_code=True where egmla is installed (pip install \'egmla[hf]\')."""\n'
            f"from egmla.hf.{name[:-3]} import {cls}  # noqa: F401\n")
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = AUTO_MAP
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def is_hf_export(folder: str | Path) -> bool:
    """Whether `folder` holds an EgmlaForCausalLM export (`egmla export --to hf`, or the same from the Hub)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return False
    return isinstance(config, dict) and config.get("model_type") == "egmla"  # a run's config.json may be damaged


def load_hf_export(folder: str | Path, device="cpu", dtype: torch.dtype | None = None):
    """The egmla `Transformer` inside an EgmlaForCausalLM folder, and a run's config.json record for it ({"model":
    ..., "data": {"eos_token": ...}}), so that `egmla generate` and `egmla serve` take an export as they take a run.
    Weights come from its safetensors (no unpickling); the folder's tokenizer.json is a run's."""
    from egmla.hf import require_transformers

    require_transformers()
    from egmla.hf import EgmlaForCausalLM

    if not any(Path(folder).glob("*.safetensors")):  # else transformers' OSError, as a traceback
        raise ValueError(f"run={str(folder)!r}: an EgmlaForCausalLM folder without its weights (no *.safetensors); "
                         f"copy them again or export the run again with `egmla export --to hf`")
    hf_model = EgmlaForCausalLM.from_pretrained(str(folder), use_safetensors=True, **({"dtype": dtype} if dtype else {}))
    model = hf_model.model.to(device).eval()
    eos_id = hf_model.config.eos_token_id
    if isinstance(eos_id, (list, tuple)):  # transformers allows several; the first is the one generation names
        eos_id = eos_id[0] if eos_id else None
    meta = {"model": model.config.to_dict(), "source": f"Hugging Face export {folder}"}
    if not (Path(folder) / "tokenizer.json").is_file():
        raise ValueError(f"run={str(folder)!r}: an EgmlaForCausalLM folder without tokenizer.json; export it with "
                         f"`egmla export --to hf`, which writes one")
    if eos_id is not None:
        from tokenizers import Tokenizer

        meta["data"] = {"eos_token": Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).id_to_token(eos_id)}
    return model, meta


def export_deepseek(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None,
                    dtype: torch.dtype | None = None, warn=print) -> Path:
    """Write an MLA run as a DeepseekV3ForCausalLM folder (safetensors + config + tokenizer)."""
    from safetensors.torch import save_file

    from egmla.hf import require_transformers
    from egmla.hf.tokenizer import hf_tokenizer, special_token_ids
    from egmla.runs import load_model, load_tokenizer

    require_transformers()
    model, _ = load_model(run_dir, dtype=dtype, checkpoint=checkpoint)
    config = deepseek_config(model.config, dtype=model.tok_embeddings.weight.dtype,
                             **special_token_ids(load_tokenizer(run_dir)))
    if model.config.norm_eps != DEEPSEEK_NORM_EPS:
        warn(f"warning: norm_eps={model.config.norm_eps} but transformers' DeepseekV3 uses eps "
             f"{DEEPSEEK_NORM_EPS} in q_a_layernorm/kv_a_layernorm: logits will differ slightly")
    weights = deepseek_state_dict(model)
    with _staging(out_dir) as staging:
        config.save_pretrained(staging)
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        hf_tokenizer(run_dir, model.config.max_seq_len).save_pretrained(staging)
    return Path(out_dir)


class _staging:
    """Write into a temporary sibling folder; rename it to `out_dir` only when everything is written."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and (not self.out_dir.is_dir() or any(self.out_dir.iterdir())):
            raise ValueError(f"OUT={str(self.out_dir)!r} exists and is not empty: choose a new folder or remove it")

    def __enter__(self) -> Path:
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.out_dir.parent, prefix=f".{self.out_dir.name}.", suffix=".tmp"))
        os.chmod(self.tmp, umask_mode(0o777))  # mkdtemp makes it private; the export is an ordinary folder
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        for path in [*self.tmp.iterdir(), self.tmp]:  # on disk before the rename makes the export visible
            fsync_path(path)
        if self.out_dir.is_dir():
            self.out_dir.rmdir()  # empty (checked above)
        os.replace(self.tmp, self.out_dir)
        return False
