"""Byte-level BPE (GPT-2 style) trained with the `tokenizers` library, cached by corpus and vocab size.

Id 0 is END_OF_TEXT, placed between documents. The 256 byte symbols are always in the vocabulary, so
any text encodes; the vocab size therefore must be at least 257.
"""
from __future__ import annotations

import hashlib
import json
import sys

from egmla.data.config import DataConfig
from egmla.data.corpora import corpus_fingerprint, empty_split_advice, iter_documents, split_chunks

END_OF_TEXT = "<|endoftext|>"
TOKENIZER_RECIPE = "bytelevel-bpe-v1"  # bump when the recipe changes, to invalidate caches
MIN_VOCAB = 257


def new_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts, vocab_size: int, length: int | None = None, progress: bool = False):
    """Train a byte-level BPE of exactly vocab_size ids (fewer if the text has too few merges).
    progress: the library's bars, on a terminal only (elsewhere they draw nothing but print blank lines)."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"model.vocab_size={vocab_size}: a byte-level BPE needs at least {MIN_VOCAB} "
                         f"(256 bytes + end-of-text); use e.g. 512 or more")
    tokenizer = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress and sys.stderr.isatty())
    tokenizer.train_from_iterator(texts, trainer, length=length)
    return tokenizer


def text_encoder(tokenizer):
    """A copy of tokenizer that encodes its special tokens' spellings as the text they are: a corpus that holds
    the characters `<|endoftext|>` (Python sources, text about language models) gets their bytes, as the BPE was
    trained on them, not id 0, which the shards place only where a document ends."""
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(tokenizer.to_str())
    encoder.encode_special_tokens = True
    return encoder


def tokenizer_sha256(tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def _training_texts(config: DataConfig, seen: dict[str, int]):
    """Training-split chunks, up to config.tokenizer_sample_bytes (validation text is never seen); seen counts the
    characters of each split read (for an error that says why there was no training text)."""
    total, budget = 0, config.tokenizer_sample_bytes
    for split, text, _ in split_chunks(iter_documents(config), config.val_fraction, config.split):
        seen[split] += len(text)
        if split != "train":
            continue
        if budget and total + len(text) > budget:
            if total == 0:  # a budget below one chunk: its first part (whole chunks only would be no text at all)
                yield text[:budget]
            return
        total += len(text)
        yield text


def get_tokenizer(config: DataConfig, vocab_size: int, progress: bool = True, log=print):
    """The cached tokenizer for (corpus, vocab size), training it first if needed."""
    from tokenizers import Tokenizer

    key = hashlib.sha256(json.dumps([corpus_fingerprint(config), vocab_size, config.val_fraction, config.split,
                                     config.tokenizer_sample_bytes, TOKENIZER_RECIPE]).encode()).hexdigest()
    path = config.cache_root() / "tokenizers" / f"{key[:24]}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as err:  # written atomically, so cut short outside egmla (a partial copy): train it again
            log(f"note: the cached tokenizer {path} is unreadable ({str(err).splitlines()[0]}); training it again")
    log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on corpus {config.corpus!r} ...")
    seen = {"train": 0, "val": 0}
    tokenizer = train_tokenizer(_training_texts(config, seen), vocab_size, progress=progress)
    if not seen["train"]:  # not judged by the vocab size: a text without merges, or vocab_size=257, has 257 too
        if seen["val"]:  # there is text, but all of it went to validation
            settings, how, fix = empty_split_advice(config)
            raise ValueError(f"{settings}: the training split is empty (all {seen['val']:,} characters of text "
                             f"were held out, {how}); {fix}")
        raise ValueError(f"data.corpus={config.corpus!r}: no training text to learn a tokenizer from; "
                         f"check the path, data.text_field and data.max_bytes")
    if tokenizer.get_vocab_size() < vocab_size:
        log(f"note: the corpus yields only {tokenizer.get_vocab_size()} tokens (< vocab_size {vocab_size})")
    from egmla.runs import atomic_write_bytes

    atomic_write_bytes(path, tokenizer.to_str().encode())
    return tokenizer


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str) -> None:
    """Every id the tokenizer can produce must be a row of the model's embedding."""
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"{where}: tokenizer has {tokenizer.get_vocab_size()} ids but model.vocab_size="
                         f"{vocab_size}; set model.vocab_size >= {tokenizer.get_vocab_size()} or use the "
                         f"tokenizer trained for this vocab size")
    if tokenizer.token_to_id(END_OF_TEXT) != 0:
        raise ValueError(f"{where}: tokenizer has no {END_OF_TEXT!r} at id 0; it was not made by egmla")
