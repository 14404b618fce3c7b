"""`EgmlaForCausalLM`: egmla's `Transformer` inside a transformers `PreTrainedModel`.

The model is egmla.model.Transformer itself (weights under `model.`, egmla's names), so logits are
egmla's to the bit. What this file adds is the transformers surface:

    forward(input_ids, attention_mask, cache, labels, use_cache) -> CausalLMOutputWithPast
    generate(...)   through GenerationMixin, with an `EgmlaCache` (compressed latents only)
    save_pretrained / from_pretrained  in safetensors

Padding: a 0 in `attention_mask` drops that token before it reaches the model (each row keeps only its
real tokens, at positions 0, 1, ...), so left-padded batches give each sequence the logits it gets alone.
`inputs_embeds` [batch, seq, hidden_size] replace the token embeddings. Alone they run the kinds whose attention
never reads token ids (MHA, GQA, MLA), which makes PEFT's prompt tuning and soft prompts work there; EG-MLA (its
bias and V-table controls too) looks its per-layer gate table up by token id, so it takes inputs_embeds only with
the input_ids of the same tokens and refuses them alone, naming the fix. Not supported: output_hidden_states and
output_attentions (refused: only logits come back) or a 4-D attention_mask.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from egmla.attention import cache_format, checked_cache_dtype, fastest_decode_path
from egmla.hf.cache import EgmlaCache
from egmla.hf.configuration_egmla import EgmlaConfig, _rename_fields
from egmla.model import Transformer
from egmla.runs import WEIGHTS_CONFIG_KEY, config_mismatch, record_weights_config, weights_metadata

# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`; we accept
# both names and answer in the one the installed version uses (5.17, the GPU image's, says past_key_values).
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _pop_cache(kwargs: dict):
    """The cache passed under either name (None if neither)."""
    cache, legacy = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


class EgmlaPreTrainedModel(PreTrainedModel):
    config_class = EgmlaConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    # the model attends with torch's SDPA whatever transformers selects, so `attn_implementation="sdpa"`, the usual
    # request, loads (it raised); "eager" still loads and changes nothing either
    _supports_sdpa = True
    _skip_keys_device_placement = ["cache", "past_key_values"]
    supports_gradient_checkpointing = True

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1):
        """transformers' activation checkpointing (`gradient_checkpointing_enable()`, the Trainer's
        `gradient_checkpointing=True`): every_n_layers-th block recomputes its forward in the backward through
        transformers' checkpoint function, as `egmla train` does with train.activation_checkpointing
        (egmla.train.recompute); enable=False restores the plain forward."""
        from egmla.train.recompute import recompute_blocks

        recompute_blocks(self.model, every_n_layers if enable else 0, gradient_checkpointing_func)
        self.gradient_checkpointing = enable  # what transformers' is_gradient_checkpointing reads

    @torch.no_grad()
    def _init_weights(self, module):
        """egmla's own initialisation (Transformer.reset_parameters), and the derived RoPE tables.

        transformers calls this after loading too: then every parameter is loaded and only the RoPE
        tables (not saved: derived from the config) are rebuilt."""
        if not isinstance(module, Transformer):
            return
        loaded = [getattr(p, "_is_hf_initialized", False) for p in module.parameters()]
        if not any(loaded):
            module.reset_parameters()
        elif not all(loaded):
            missing = [n for (n, p), ok in zip(module.named_parameters(), loaded) if not ok]
            raise ValueError(f"checkpoint lacks weights {missing[:5]}...: it does not match this EgmlaConfig")
        module._rebuild_buffers()
        # as `Transformer.to(dtype)` leaves them after egmla.runs.load_model(dtype=...): same logits
        dtype = module.tok_embeddings.weight.dtype
        module.rope_cos, module.rope_sin = module.rope_cos.to(dtype), module.rope_sin.to(dtype)

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        """transformers' save, then what makes the folder egmla's (`_complete_folder`), only on the process that
        wrote it: another rank rewriting the weights would race rank 0's write (or stamp a stale file)."""
        super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        saves_here = getattr(self, "should_save_on_this_rank", None)  # where transformers has it: rank 0 only, too
        if saves_here(is_main_process) if saves_here else is_main_process:
            self._complete_folder(Path(save_directory))

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        """transformers' upload, of the completed folder: save_pretrained(push_to_hub=True) uploads from inside
        transformers' own save, before the override above could add anything to it."""
        self._complete_folder(Path(working_dir))
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    def _complete_folder(self, folder: Path) -> None:
        """Add to a folder transformers saved the two modules and the auto_map that let it load with
        trust_remote_code=True where egmla is installed but not imported (egmla.hf.export.write_remote_code), and
        this model's config to each weights file's metadata (egmla.runs.weights_metadata), which from_pretrained
        checks config.json against. Idempotent: a file already recording the config is not rewritten."""
        from safetensors import safe_open

        from egmla.hf.export import write_remote_code

        if not (folder / "config.json").is_file():  # an adapter-only save (transformers' PEFT integration writes
            return  # adapter_config.json and adapter_model.safetensors): no model of ours to describe there
        write_remote_code(folder)
        record = weights_metadata(self.config.to_model_config())[WEIGHTS_CONFIG_KEY]
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                recorded = (f.metadata() or {}).get(WEIGHTS_CONFIG_KEY)
            if recorded != record:
                record_weights_config(path, self.config.to_model_config())


class EgmlaForCausalLM(EgmlaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.output.weight": "model.tok_embeddings.weight"}

    def __init__(self, config: EgmlaConfig):
        super().__init__(config)
        self.model = Transformer(config.to_model_config())
        self.post_init()

    # ---- conversions -------------------------------------------------------------------------
    @classmethod
    def from_egmla(cls, transformer: Transformer, **config_kwargs) -> "EgmlaForCausalLM":
        """Wrap a trained egmla Transformer (weights copied); config_kwargs set eos_token_id etc."""
        config = EgmlaConfig.from_model_config(transformer.config, **config_kwargs)
        param = transformer.tok_embeddings.weight
        model = cls(config).to(device=param.device, dtype=param.dtype)
        model.model.load_state_dict(transformer.state_dict())
        model.model.set_decode_path(transformer.decode_path)
        model.model.decode_path_chosen = transformer.decode_path_chosen
        return model.eval()

    # ---- loading: config.json checked against the weights (recorded by save_pretrained) -------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained, refusing a config that does not describe the weights: a field the
        weights' metadata records otherwise (gate_op, rope_theta, num_hidden_layers, ...; checked before
        loading), or a weight missing, unexpected or of another shape. One ValueError naming them."""
        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")  # where the weights are
        if folder.is_dir():
            config = kwargs.get("config")  # transformers takes an EgmlaConfig or the path of one
            if not isinstance(config, EgmlaConfig):
                config = EgmlaConfig.from_pretrained(config if isinstance(config, (str, Path)) else folder)
            for path in sorted(folder.glob("*.safetensors")):
                try:
                    problem = config_mismatch(path, config.to_model_config().to_dict())
                except ValueError as err:  # a recorded field this egmla lacks: another version saved it
                    raise ValueError(f"{path}: the config its weights record does not fit this egmla "
                                     f"({_rename_fields(str(err)).split(';')[0]}): saved by another egmla version; "
                                     f"load it with the version that saved it") from None
                except SafetensorError as err:  # not a ValueError: a truncated or corrupt file
                    raise ValueError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]}): corrupt "
                                     f"or truncated; copy it again or export the run again") from None
                if problem:
                    raise ValueError(f"{path}: {_rename_fields(problem)}; use the config.json saved with "
                                     f"these weights")
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              **kwargs)
        wrong = [f"{key.split('_')[0]}: {', '.join(sorted(map(str, info[key]))[:3])}"
                 for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)]
        if wrong:
            raise ValueError(f"{pretrained_model_name_or_path}: the weights do not match its config.json ("
                             + "; ".join(wrong) + ")")
        return (model, info) if want_info else model

    def to_egmla(self) -> Transformer:
        """The egmla Transformer inside (shared, not a copy)."""
        return self.model

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.model.output

    def set_output_embeddings(self, value):
        self.model.output = value

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """transformers' resize of the token embeddings (and an untied LM head), then of every layer's gate
        embeddings E_l, which are indexed by the same token ids, and of the egmla config inside. Added rows follow
        transformers' `mean_resizing` (the old rows' mean and covariance); with mean_resizing=False, egmla's own
        initialisation (token embeddings and head N(0, init_std), E_l N(0, 1)). Gate tables and the other tensors
        the decode paths derive are rebuilt on the next cached call (their sources' storage changed)."""
        old = self.model.config.vocab_size
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        vocab = embeddings.weight.shape[0]
        if vocab == old:
            return embeddings
        gate_embeddings = [block.attn.gate_embed for block in self.model.layers
                           if isinstance(getattr(block.attn, "gate_embed", None), nn.Embedding)]
        for gate_embed in gate_embeddings:
            self._get_resized_embeddings(gate_embed, vocab, mean_resizing=mean_resizing)
        if vocab > old and not mean_resizing:  # transformers' _init_weights hook leaves plain modules to us
            std = self.model.config.init_std
            with torch.no_grad():
                embeddings.weight[old:].normal_(std=std)
                if not self.model.config.tie_embeddings:
                    self.model.output.weight[old:].normal_(std=std)
                for gate_embed in gate_embeddings:
                    gate_embed.weight[old:].normal_(std=1.0)
        self.model.config = dataclasses.replace(self.model.config, vocab_size=vocab)
        return embeddings

    # ---- caches ------------------------------------------------------------------------------
    cache_initial_length = 256  # positions a new EgmlaCache allocates up front; it doubles as needed
    cache_dtype: torch.dtype | str | None = None  # None: the model's dtype; set_cache_dtype("fp8"): an fp8 cache

    def set_cache_dtype(self, cache_dtype) -> "EgmlaForCausalLM":
        """The dtype of the caches that generate() makes from now on: None (the model's), or "fp8" /
        torch.float8_e4m3fn for an fp8 cache (one byte per element, EG-MLA's norm statistics fp32, rounded once when
        written, as `egmla generate --cache-dtype fp8`; docs/inference.md), or "fp8-keep-rope" (the same but the RoPE
        keys in the model's dtype). Returns the model."""
        self.cache_dtype = checked_cache_dtype(cache_dtype)
        return self

    def new_hf_cache(self, batch_size: int, max_length: int | None = None) -> EgmlaCache:
        """An empty EgmlaCache for `batch_size` sequences on the model's device, in `cache_dtype` (default: the model's
        dtype), using the model's decode path: the one set with `model.model.set_decode_path(...)`, else the fastest on
        the model's device (`fastest_decode_path`: the Triton kernel on CUDA, as `egmla generate` takes; the first path
        elsewhere)."""
        param = self.model.tok_embeddings.weight
        if not self.model.decode_path_chosen:
            path = self.model.usable_decode_path(fastest_decode_path(self.model.config, param.device))
            if path != self.model.decode_path:
                self.model.set_decode_path(path)
                self.model.decode_path_chosen = False  # still the default: another device may choose again
        return EgmlaCache(self.model.config, batch_size, max_length, dtype=cache_format(self.cache_dtype, param.dtype),
                          device=param.device, decode_path=self.model.decode_path,
                          initial_length=self.cache_initial_length)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache; prepare_inputs_for_generation makes ours

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode, batch_size: int,
                                      *args, **kwargs):
        """transformers' own, then for assisted decoding (a draft model, prompt lookup) an EgmlaCache made here: that
        loop needs its cache before the first step, where every other mode lets `prepare_inputs_for_generation` make it
        (beam search and num_return_sequences expand the batch after this point; assisted decoding runs batch 1)."""
        limit = self.config.max_position_embeddings
        if generation_config.max_length is not None and generation_config.max_length > limit:
            # stop at the limit, as `egmla generate` does: past it the step raises and every token made is lost.
            # (transformers sets max_length from max_new_tokens before this hook and reads it for stopping after it)
            warnings.warn(f"max_length={generation_config.max_length} (prompt + max_new_tokens) passes "
                          f"max_position_embeddings={limit}, where egmla's RoPE tables end: generation stops at "
                          f"{limit} positions", stacklevel=3)
            generation_config.max_length = limit
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                                       *args, **kwargs)
        if (generation_mode == GenerationMode.ASSISTED_GENERATION and generation_config.use_cache is not False
                and model_kwargs.get("cache") is None and model_kwargs.get("past_key_values") is None):
            model_kwargs[CACHE_ARG] = self.new_hf_cache(batch_size)
        return result

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds: torch.Tensor | None = None, **kwargs):
        """transformers' own (as Llama's: `inputs_embeds`, where given, feed the first step, the generated ids every
        later one), with an EgmlaCache. Where generate() was given the ids of the embedded tokens too, they go with
        the first step's embeddings (transformers passes the embeddings alone): EG-MLA's gate reads them."""
        cache = _pop_cache(kwargs)
        if cache is None and kwargs.get("use_cache", True):
            cache = self.new_hf_cache(input_ids.shape[0])
        inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **{CACHE_ARG: cache},
                                                       **kwargs)
        embeds = inputs.get("inputs_embeds")
        if (embeds is not None and inputs.get("input_ids") is None and inputs_embeds is not None
                and input_ids.shape[1] == inputs_embeds.shape[1]):
            inputs["input_ids"] = input_ids[:, input_ids.shape[1] - embeds.shape[1]:].clone()
        if CACHE_ARG != "past_key_values" and inputs.get(CACHE_ARG) is not None:
            # the same cache under its pre-5.24 name too (forward takes either, once): peft's prompt learning reads
            # `past_key_values` to tell the first step, where it prepends the virtual tokens, from the later ones;
            # without it, it would prepend them again at every step (tests/hf/test_peft.py)
            inputs["past_key_values"] = inputs[CACHE_ARG]
        return inputs

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: EgmlaCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                past_key_values: EgmlaCache | None = None, logits_to_keep: int | torch.Tensor = 0, **kwargs):
        """input_ids [batch, seq] -> logits [batch, seq, vocab].

        inputs_embeds [batch, seq, hidden_size] enter the layers in place of the token embeddings (`_ids_for_embeds`):
        alone for MHA, GQA and MLA; EG-MLA needs the tokens' input_ids with them (its gate is indexed by id).

        `cache` (older transformers: `past_key_values`, accepted too) is an EgmlaCache or None.
        Positions come from the cache (or 0.. without one), so position_ids is accepted and ignored.
        A cache is made when use_cache=True is passed and none is given; use_cache=None (plain calls,
        training) runs the causal forward without one. logits_to_keep (transformers' convention): an int n > 0
        returns the last n positions' logits only, a tensor the positions it lists (computed, then sliced)."""
        if inputs_embeds is not None:
            input_ids = self._ids_for_embeds(input_ids, inputs_embeds)
        elif input_ids is None:
            raise ValueError("pass input_ids (or inputs_embeds, for the MHA, GQA and MLA kinds)")
        # refused rather than ignored: the model returns logits only, so these would come back None
        unsupported = [name for name in ("output_hidden_states", "output_attentions")
                       if kwargs.get(name, getattr(self.config, name, False))]
        if unsupported:
            raise ValueError(f"{' and '.join(unsupported)} is not supported: EgmlaForCausalLM returns logits only")
        if attention_mask is not None and attention_mask.dim() != 2:  # a 4-D pattern would be silently ignored
            raise ValueError(f"attention_mask has {attention_mask.dim()} dimensions: EgmlaForCausalLM takes the 2-D "
                             f"padding mask [batch, columns] (1 = token, 0 = padding), not a custom attention pattern")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("both cache and past_key_values were given: pass the cache once, as `cache`")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, EgmlaCache):
            raise ValueError(f"the cache is a {type(cache).__name__}: EgmlaForCausalLM needs an "
                             f"EgmlaCache (model.new_hf_cache(batch_size)) or None")
        batch, seq = input_ids.shape
        new_mask = attention_mask[:, -seq:] if attention_mask is not None else None
        padded = new_mask is not None and not bool(new_mask.all())
        if cache is None and use_cache:
            cache = self.new_hf_cache(batch)
        if cache is not None:
            logits = self._forward_cached(input_ids, new_mask if padded else None, cache, inputs_embeds)
        elif padded:  # drop the pads through a throwaway cache, so every row sees only its own tokens
            logits = self._forward_cached(input_ids, new_mask, self.new_hf_cache(batch, seq), inputs_embeds)
        else:
            logits = self.model(input_ids, embeds=inputs_embeds)
        loss = None
        if labels is not None:
            if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
                raise ValueError(f"logits_to_keep={logits_to_keep!r} with labels: the loss needs every position's "
                                 f"logits; leave logits_to_keep at 0")
            # num_items_in_batch: the Trainer's count of label tokens over every micro-batch of a gradient-accumulation
            # step; it passes it (this forward takes **kwargs) and then leaves the loss unscaled, as for Llama
            num_items = kwargs.get("num_items_in_batch")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100, reduction="mean" if num_items is None else "sum")
            if num_items is not None:
                loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        if isinstance(logits_to_keep, int):
            logits = logits[:, -logits_to_keep:] if logits_to_keep > 0 else logits
        else:
            logits = logits[:, logits_to_keep.to(logits.device)]
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return tuple(x for x in (loss, logits, cache) if x is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_ARG: cache})

    def _ids_for_embeds(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """The token ids to run inputs_embeds with: input_ids where given (the same [batch, seq]: the embeddings enter
        the layers, the ids are the tokens the attention and the cache read), else placeholders, for the kinds whose
        attention never reads ids (MHA, GQA, MLA); EG-MLA without ids is refused, with what works instead."""
        hidden = self.config.hidden_size
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden:
            raise ValueError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)}: EgmlaForCausalLM takes "
                             f"[batch, seq, hidden_size={hidden}]")
        config = self.model.config
        if input_ids is not None:
            if input_ids.shape != inputs_embeds.shape[:2]:
                raise ValueError(f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} "
                                 f"given together must be the same tokens (the embeddings enter the layers, the ids "
                                 f"are what the attention reads): one id per embedding, or pass only one of them")
            return input_ids
        if config.is_gated:
            controls = f", gate_op={config.gate_op!r}" if config.gate_op != "mul" else ""
            raise ValueError(
                f"inputs_embeds without input_ids cannot run {config.variant_name()} (attention_kind='eg-mla'"
                f"{controls}): its attention gates K/V with a per-layer embedding table indexed by token id, and "
                f"embeddings alone (PEFT prompt tuning's or prefix methods' virtual tokens, soft prompts) have no ids "
                f"to look up. Pass the tokens' input_ids with the embeddings, fine-tune with LoRA (peft's LoraConfig, "
                f"which works on every kind), or use an MHA, GQA or MLA kind, which take inputs_embeds alone")
        # MHA, GQA and MLA read no token ids (their cache keeps none): the placeholders only carry the shape
        return torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)

    def _forward_cached(self, input_ids: torch.Tensor, new_mask: torch.Tensor | None, cache: EgmlaCache,
                        embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Append each row's real tokens (new_mask 1; all if None) to the cache; logits in input order. embeds: the
        layers' input in place of the token embeddings (inputs_embeds), packed as the ids are."""
        batch, seq = input_ids.shape
        cache.reserve(seq)
        if new_mask is None:
            logits = self.model(input_ids, cache.kv, embeds=embeds)
        else:
            keep = new_mask.bool()
            # Real tokens first, in order; the pads after them are written past the row's length and
            # overwritten later (egmla's ragged-batch convention), so nothing ever attends to them.
            order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
            if embeds is not None:
                embeds = embeds.gather(1, order[..., None].expand_as(embeds))
            packed = self.model(input_ids.gather(1, order), cache.kv, n_new=keep.sum(dim=1), embeds=embeds)
            logits = torch.empty_like(packed).scatter_(1, order[..., None].expand_as(packed), packed)
            logits = logits.masked_fill(~keep[..., None], 0.0)
        cache.seen += seq
        return logits
