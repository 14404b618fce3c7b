"""A run's `tokenizers` BPE as a transformers `PreTrainedTokenizerFast`, with its special tokens named.

egmla runs save a byte-level BPE (tokenizer.json). Which of its tokens ends a document is found by
name among the usual spellings; a tokenizer with a single special token uses it for everything
(GPT-2's convention: <|endoftext|> is BOS, EOS and, for batching, PAD).
"""
from __future__ import annotations

from pathlib import Path

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "<|im_end|>")
BOS_NAMES = ("<s>", "<bos>", "<|bos|>", "<|begin_of_text|>", "<|startoftext|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


def special_tokens(tokenizer) -> dict[str, str | None]:
    """{"eos_token", "bos_token", "pad_token"} of a `tokenizers.Tokenizer` (None where it has none)."""
    vocab = tokenizer.get_vocab()
    specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]

    def first(names):
        return next((name for name in names if name in vocab), None)

    eos = first(EOS_NAMES) or (specials[0] if len(specials) == 1 else None)
    return {"eos_token": eos, "bos_token": first(BOS_NAMES) or eos, "pad_token": first(PAD_NAMES) or eos}


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """{"eos_token_id", "bos_token_id", "pad_token_id"} for EgmlaConfig / DeepseekV3Config."""
    return {f"{role}_id": (tokenizer.token_to_id(token) if token is not None else None)
            for role, token in special_tokens(tokenizer).items()}


def hf_tokenizer(run_dir: str | Path, model_max_length: int | None = None):
    """The run's tokenizer.json as a `PreTrainedTokenizerFast`, special tokens set."""
    from transformers import PreTrainedTokenizerFast

    from egmla.runs import load_tokenizer

    tokenizer = load_tokenizer(run_dir)  # raises a clear error when tokenizer.json is missing
    kwargs = {role: token for role, token in special_tokens(tokenizer).items() if token is not None}
    if model_max_length:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)
