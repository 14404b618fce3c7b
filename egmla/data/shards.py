"""Token shards: the corpus tokenized once into flat numpy files (uint16 when the vocab fits, else
uint32), one per split, with END_OF_TEXT (id 0) after each document. Cached by corpus fingerprint and
tokenizer hash; written into a temp folder and renamed, so a half-written cache is never used.

    CACHE/shards/<key>/train.bin  val.bin  meta.json
    CACHE/shards/.tmp-<owner>-<pid>-<random>/   a build in progress (owner: host and PID namespace)

A build killed outright (SIGKILL, a lost machine) leaves its temp folder; the next build removes those whose process
is gone (same owner, PID not running) or that nothing has written to for STALE_TMP_AGE_S (another host's, or one
named by an egmla before the owner was in the name).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from egmla.data.config import DataConfig
from egmla.data.corpora import CHUNK_BYTES, corpus_fingerprint, empty_split_advice, iter_documents, split_chunks
from egmla.data.tokenizer import TOKENIZER_RECIPE, text_encoder, tokenizer_sha256

SHARD_RECIPE = "shards-v3"  # v2: an end-of-text wherever a split's stream changes document; v3: id 0 only there
# (a literal `<|endoftext|>` in the text was encoded as id 0 before)
ENCODE_BATCH_BYTES = 4 << 20  # text handed to the tokenizer's parallel encoder at once
TMP_PREFIX = ".tmp-"
STALE_TMP_AGE_S = 24 * 3600  # a temp folder of no process we can check, untouched this long, is a dead build's


@dataclass
class TokenShards:
    folder: Path
    meta: dict

    def tokens(self, split: str) -> np.ndarray:
        """Read-only memmap of a split's tokens [n_tokens]."""
        count = self.meta[f"{split}_tokens"]
        if count == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.folder / f"{split}.bin", dtype=self.meta["dtype"], mode="r", shape=(count,))


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def shard_key(config: DataConfig, tokenizer) -> str:
    parts = [corpus_fingerprint(config), tokenizer_sha256(tokenizer), config.val_fraction, config.split, CHUNK_BYTES,
             TOKENIZER_RECIPE, SHARD_RECIPE]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def unigram_statistics(train: np.ndarray, val: np.ndarray, vocab_size: int) -> dict:
    """Entropy of the training tokens' unigram distribution, and the validation loss a unigram model
    (add-one smoothed training counts) gets: the baseline a language model must beat. Nats/token."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for start in range(0, len(train), 1 << 24):
        counts += np.bincount(train[start:start + (1 << 24)], minlength=vocab_size)
    probs = counts / counts.sum()
    nonzero = probs[probs > 0]
    smoothed = (counts + 1) / (counts.sum() + vocab_size)
    val_counts = np.bincount(val, minlength=vocab_size).astype(np.float64)
    return {"train_unigram_entropy": float(-(nonzero * np.log(nonzero)).sum()),
            "val_unigram_cross_entropy": float(-(val_counts * np.log(smoothed)).sum() / max(1, val_counts.sum()))}


def _write_shards(config: DataConfig, tokenizer, folder: Path, progress: bool) -> dict:
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.get_vocab_size())
    encoder = text_encoder(tokenizer)
    files = {split: open(folder / f"{split}.bin", "wb") for split in ("train", "val")}
    counts = {"train": 0, "val": 0}
    chars = {"train": 0, "val": 0}
    pending: list[tuple[str, str, bool]] = []

    def flush():
        encodings = encoder.encode_batch([text for _, text, _ in pending], add_special_tokens=False)
        for (split, _, ends_run), encoding in zip(pending, encodings):
            ids = encoding.ids + [0] if ends_run else encoding.ids
            np.asarray(ids, dtype=dtype).tofile(files[split])
            counts[split] += len(ids)
        pending.clear()

    bar = tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=not progress)
    try:
        pending_bytes = 0
        chunks = split_chunks(iter_documents(config), config.val_fraction, config.split)
        for split, text, ends_run in chunks:
            pending.append((split, text, ends_run))
            chars[split] += len(text)
            pending_bytes += len(text)
            bar.update(len(text))
            if pending_bytes >= ENCODE_BATCH_BYTES:
                flush()
                pending_bytes = 0
        flush()
    finally:
        bar.close()
        for f in files.values():
            f.close()
    return {"train_tokens": counts["train"], "val_tokens": counts["val"], "train_chars": chars["train"],
            "val_chars": chars["val"], "dtype": np.dtype(dtype).name}


def cached_shards(folder: Path) -> TokenShards | None:
    """The shards in folder if they are whole: a readable meta.json, and each split's file as long as the tokens it
    counts. The folder is renamed into place complete, but not fsynced, and a copy can stop short: such a cache is
    built again, never read (a memmap past a file's end failed in one unhelpful line)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        size = np.dtype(meta["dtype"]).itemsize
        if all((folder / f"{split}.bin").stat().st_size == meta[f"{split}_tokens"] * size
               for split in ("train", "val")):
            return TokenShards(folder, meta)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def tmp_owner() -> str:
    """Who may judge a temp folder by its PID: this host and PID namespace (containers sharing a hostname and a cache
    volume see each other's PIDs as not running)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = "0"
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname() or "host") + "." + namespace


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: running, as another user
        return True
    return True


def _last_write(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for entry in os.scandir(folder):
        with contextlib.suppress(OSError):
            times.append(entry.stat(follow_symlinks=False).st_mtime)
    return max(times)


def is_stale_tmp(folder: Path, owner: str | None = None, now: float | None = None) -> bool:
    """Whether a `.tmp-*` folder is a dead build's: its name says this owner and a PID that is not running, or
    (another owner's, or a name without one) nothing in it was written for STALE_TMP_AGE_S. A live build's folder
    never is (its PID runs; another host's writes its token files every few seconds)."""
    owner = tmp_owner() if owner is None else owner
    parts = folder.name[len(TMP_PREFIX):].rsplit("-", 2)  # owner, pid, mkdtemp's random letters (no '-' in them)
    if len(parts) == 3 and parts[0] == owner and parts[1].isdigit() and int(parts[1]) > 0:
        return not _pid_running(int(parts[1]))
    try:
        return (time.time() if now is None else now) - _last_write(folder) > STALE_TMP_AGE_S
    except OSError:  # removed meanwhile
        return False


def remove_stale_tmp(root: Path, log=print) -> list[Path]:
    """Remove the temp folders of dead builds (is_stale_tmp) and `.broken-*` folders (caches found incomplete, moved
    out of the way by a process killed before it removed them) from the shard cache `root`; returns them."""
    removed = []
    owner = tmp_owner()
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.is_dir() or entry.is_symlink():
            continue
        if entry.name.startswith(".broken-") or (entry.name.startswith(TMP_PREFIX) and is_stale_tmp(entry, owner)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        log(f"note: removed {len(removed)} folder(s) left in {root} by builds that were killed: "
            f"{', '.join(p.name for p in removed)}")
    return removed


def prepare_shards(config: DataConfig, tokenizer, progress: bool = True, log=print) -> TokenShards:
    """Tokenize the corpus (or reuse the cache) and return its shards."""
    root = config.cache_root() / "shards"
    folder = root / shard_key(config, tokenizer)
    if folder.exists():
        shards = cached_shards(folder)
        if shards is not None:
            return shards
        log(f"note: the cached shards in {folder} are incomplete; tokenizing again")
        broken = root / f".broken-{folder.name}-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.replace(folder, broken)  # out of the way first: a process reading it meanwhile keeps its open files
        shutil.rmtree(broken, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(root, log)
    log(f"tokenizing corpus {config.corpus!r} into {folder} ...")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{TMP_PREFIX}{tmp_owner()}-{os.getpid()}-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        meta = _write_shards(config, tokenizer, tmp, progress)
        vocab_size = tokenizer.get_vocab_size()
        if meta["train_tokens"] + meta["val_tokens"] == 0:
            raise ValueError(f"data.corpus={config.corpus!r}: the corpus holds no text; check the path, "
                             f"data.text_field and data.max_bytes")
        if meta["val_tokens"] == 0 or meta["train_tokens"] == 0:
            empty = "validation" if meta["val_tokens"] == 0 else "training"
            settings, how, fix = empty_split_advice(config)
            raise ValueError(f"{settings}: the {empty} split is empty ({meta['train_chars'] + meta['val_chars']:,} "
                             f"characters of text, held out {how}); {fix}")
        shards = TokenShards(tmp, meta)
        meta.update(unigram_statistics(shards.tokens("train"), shards.tokens("val"), vocab_size))
        meta.update(corpus=config.corpus, tokenizer_sha256=tokenizer_sha256(tokenizer), vocab_size=vocab_size)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenShards(folder, json.loads((folder / "meta.json").read_text()))
