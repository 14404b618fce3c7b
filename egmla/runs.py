"""A run directory on disk, and loading a model from one. Never unpickles: weights are safetensors,
everything else JSON (the trainer's optimizer state uses torch.load(weights_only=True)).

    RUN/
      config.json                 {"format_version": 1, "model": {ModelConfig}, "train": {...}, "data": {...}}
      tokenizer.json              a `tokenizers` byte-level BPE
      checkpoints/step_00000100/  model.safetensors, manifest.json (sha256 of every file), ... (trainer state)
      model.safetensors           optional: final/exported weights (used when there is no checkpoint)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from egmla.config import ModelConfig
from egmla.model import Transformer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_weights(model: Transformer, path: str | Path) -> None:
    """safetensors, atomically; tied weights are stored once."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(folder: str | Path) -> None:
    """Record the sha256 of every file in a checkpoint folder; written last, so its presence means complete."""
    folder = Path(folder)
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(folder / MANIFEST, {"format_version": FORMAT_VERSION, "files": files})


def verify_checkpoint(folder: str | Path) -> str | None:
    """None if the folder is complete and every checksum matches, else why not."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"manifest.json unreadable: {err}"
    for name, digest in files.items():
        if not (folder / name).is_file():
            return f"{name} missing"
        if sha256_file(folder / name) != digest:
            return f"{name} checksum mismatch (corrupt or truncated)"
    return None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def latest_checkpoint(run_dir: str | Path, warn=print) -> Path | None:
    """Newest checkpoint that verifies; a corrupt newer one is reported and skipped."""
    for folder in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        warn(f"warning: skipping checkpoint {folder}: {problem}; using the previous one")
    return None


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"run={str(run_dir)!r}: no config.json there; pass a directory written by `egmla train`")
    meta = json.loads(path.read_text())
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"run={str(run_dir)!r}: format_version={version!r} but this egmla reads version "
                         f"{FORMAT_VERSION}; re-export it with the egmla version that wrote it")
    return meta


def load_model(run_dir: str | Path, device="cpu", dtype: torch.dtype | None = None,
               checkpoint: str | Path | None = None) -> tuple[Transformer, dict]:
    """The model of a run (latest good checkpoint, else RUN/model.safetensors) and its config.json."""
    from safetensors.torch import load_model as st_load_model

    meta = read_run_config(run_dir)
    config = ModelConfig.from_dict(meta["model"])
    weights = Path(checkpoint) / "model.safetensors" if checkpoint else None
    if weights is None:
        latest = latest_checkpoint(run_dir)
        weights = latest / "model.safetensors" if latest else Path(run_dir) / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"run={str(run_dir)!r}: no weights found (no valid checkpoint, no model.safetensors)")
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device)
    model.tie_weights()
    st_load_model(model, weights, device=str(device))
    model._rebuild_buffers()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), meta


def load_tokenizer(run_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(run_dir) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"run={str(run_dir)!r}: no tokenizer.json; the run directory is incomplete")
    return Tokenizer.from_file(str(path))
