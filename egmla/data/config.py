"""The [data] section of a training config: which corpus, how it is split, where caches live."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

from annotated_types import Gt, Lt

from egmla.config import NonNegativeInt, check_field_types


@dataclass
class DataConfig:
    corpus: str = "embedded"  # embedded | python-source | PATH/GLOB (.txt .jsonl .parquet, comma-separated) | hf:NAME
    text_field: str = "text"  # the text column of .jsonl / .parquet / hub rows
    hf_config: str = ""  # hub dataset configuration (e.g. "sample-10BT" for FineWeb-Edu)
    hf_split: str = "train"  # hub dataset split to stream
    max_bytes: NonNegativeInt = 0  # read at most this many characters of text (0 = all; set it for hub datasets)
    val_fraction: Annotated[float, Gt(0), Lt(1)] = 0.02  # share of chunks held out for validation (hash-based, deterministic)
    split: Literal["chunk", "document"] = "chunk"  # held out by 16 KB chunk, or by whole document (python-source: file)
    tokenizer_sample_bytes: NonNegativeInt = 64_000_000  # train the BPE on at most this much training text
    cache_dir: str = ""  # tokenizers and token shards; "" = $EGMLA_CACHE or ~/.cache/egmla

    def __post_init__(self):
        check_field_types(self, "data.")
        if not self.corpus.strip():  # here, not where the corpus is read: its cache key is computed first
            raise ValueError(f"data.corpus={self.corpus!r}: empty; use 'embedded', 'python-source', a file path/glob "
                             f"or 'hf:NAME'")
        if self.corpus.startswith("hf:") and len(self.corpus) == 3:
            raise ValueError("data.corpus='hf:': name the dataset, e.g. 'hf:HuggingFaceFW/fineweb-edu'")

    def to_dict(self) -> dict:
        return asdict(self)

    def cache_root(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        if os.environ.get("EGMLA_CACHE"):
            return Path(os.environ["EGMLA_CACHE"]).expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "egmla"
