"""Training data: corpora (embedded English, Python source, local files, hub datasets), a byte-level
BPE tokenizer, token shards on disk, and batch loaders. See docs/training.md."""
from __future__ import annotations

from egmla.data.config import DataConfig


def prepare_data(config: DataConfig, vocab_size: int, tokenizer=None, progress: bool = True, log=print):
    """(tokenizer, TokenShards) for a corpus: trains the tokenizer unless one is given (resume), then
    tokenizes into shards; both are cached, so a second call is instant."""
    from egmla.data.shards import prepare_shards
    from egmla.data.tokenizer import check_tokenizer_fits, get_tokenizer

    if tokenizer is None:
        tokenizer = get_tokenizer(config, vocab_size, progress=progress, log=log)
    check_tokenizer_fits(tokenizer, vocab_size, where="tokenizer")
    return tokenizer, prepare_shards(config, tokenizer, progress=progress, log=log)


__all__ = ["DataConfig", "prepare_data"]
