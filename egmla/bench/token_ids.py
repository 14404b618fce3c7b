"""Token ids from real text for the decode benchmark (docs/design.md §4: how often ids repeat decides how
many of EG-MLA's gate rows come from L2 instead of HBM, so uniform random ids would mislead).

A byte-level BPE of the model's vocab size is trained on a sample of the corpus (the recipe of
egmla.data.tokenizer), the corpus is encoded, and sequence b of the batch is the b-th consecutive
window of the token stream. Sources: `embedded` (the English corpus shipped in the package) and
`python-source` (this Python installation's .py files).
"""
from __future__ import annotations

import functools
import itertools

import torch

TEXT_SOURCES = ("embedded", "python-source")
CHARS_PER_TOKEN = 5  # generous: a 32K BPE averages about 4 characters a token on English, fewer on code
TOKENIZER_SAMPLE_CHARS = 4_000_000


def _documents(source: str, max_chars: int) -> list[str]:
    from egmla.data.corpora import embedded_documents, python_source_documents

    if source == "embedded":
        texts, total = [], 0
        for _, text in embedded_documents():
            texts.append(text[: max_chars - total])
            total += len(texts[-1])
            if total >= max_chars:
                break
        return texts
    if source == "python-source":
        return [text for _, text in python_source_documents(max_bytes=max_chars)]
    raise ValueError(f"text source {source!r}: choose one of {', '.join(TEXT_SOURCES)}")


@functools.lru_cache(maxsize=4)
def _tokenizer_and_texts(source: str, vocab_size: int, tokens: int) -> tuple[object, list[str]]:
    """The texts that hold `tokens` ids of `source` and the BPE trained on a sample of them."""
    from egmla.data.tokenizer import train_tokenizer

    texts = _documents(source, tokens * CHARS_PER_TOKEN + 100_000)
    sample = list(itertools.islice(_chunks(texts), TOKENIZER_SAMPLE_CHARS // 10_000))
    return train_tokenizer(sample, vocab_size), texts


def text_tokenizer(batch: int, length: int, vocab_size: int, source: str = "embedded"):
    """The tokenizer that `text_token_ids(batch, length, vocab_size, source)` encodes with (its sample, so its merges,
    depends on how much text the ids need)."""
    return _tokenizer_and_texts(source, vocab_size, batch * length)[0]


@functools.lru_cache(maxsize=4)
def _token_stream(source: str, vocab_size: int, tokens: int) -> tuple[torch.Tensor, int]:
    """At least `tokens` ids of `source` (repeated if the corpus is shorter) and how many were distinct text."""
    tokenizer, texts = _tokenizer_and_texts(source, vocab_size, tokens)
    ids = [i for encoding in tokenizer.encode_batch(texts) for i in encoding.ids + [0]]  # 0 = end of text
    stream = torch.tensor(ids, dtype=torch.int32)
    available = stream.numel()
    if available < tokens:
        stream = stream.repeat(-(-tokens // available))
    return stream, available


def _chunks(texts: list[str], size: int = 10_000):
    for text in texts:
        for start in range(0, len(text), size):
            yield text[start:start + size]


def text_token_ids(batch: int, length: int, vocab_size: int, source: str = "embedded") -> tuple[torch.Tensor, dict]:
    """ids [batch, length] int32 from real text, and a note {source, tokens_available, repeated}."""
    stream, available = _token_stream(source, vocab_size, batch * length)
    ids = stream[: batch * length].view(batch, length).clone()
    return ids, {"source": source, "tokens_available": available, "repeated": available < batch * length}


def distinct_id_stats(ids: torch.Tensor) -> dict:
    """Distinct ids over the whole batch and per sequence (mean), the quantities gate-row traffic follows."""
    per_sequence = [int(row.unique().numel()) for row in ids]
    return {"distinct_ids_batch": int(ids.unique().numel()),
            "distinct_ids_per_sequence": sum(per_sequence) / len(per_sequence),
            "positions_per_distinct_id": ids.shape[1] * len(per_sequence) / sum(per_sequence)}
