"""A run directory on disk, and loading a model from one. Never unpickles: weights are safetensors,
everything else JSON (the trainer's optimizer state uses torch.load(weights_only=True)).

    RUN/
      config.json                 {"format_version": 1, "model": {ModelConfig}, "train": {...}, "data": {...}}
      tokenizer.json              a `tokenizers` byte-level BPE
      checkpoints/step_00000100/  model.safetensors, manifest.json (sha256 of every file), ... (trainer state)
      model.safetensors           optional: final weights (tried after every checkpoint), beside a manifest.json

Every weights file carries its ModelConfig in its safetensors metadata and is loaded only through
`find_checkpoint`: checksums verified, manifest names confined to their folder, config and tokenizer
compared with the run's, the newest good checkpoint used unless one is named.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from egmla.config import ModelConfig
from egmla.model import Transformer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
WEIGHTS_CONFIG_KEY = "egmla_model_config"  # safetensors metadata: the ModelConfig the weights belong to


class CheckpointError(ValueError):
    """No checkpoint that verifies and loads (or the one named is unusable); says why."""


class StorageError(ValueError):
    """A write failed (a full disk, a read-only folder): one line; no half-written file is left behind."""


def storage_problem(err: BaseException) -> str | None:
    """The one-line reason of a failed read or write (an OSError, or safetensors' I/O error), else None."""
    if isinstance(err, OSError):
        return f"{err.strerror or err}: {err.filename}" if err.filename else str(err.strerror or err)
    if type(err).__name__ == "SafetensorError" and "I/O error" in str(err):
        return str(err).split("I/O error: ", 1)[1]
    return None


def umask_mode(mode: int = 0o666) -> int:
    """`mode` under the process umask: what open() would give a new file. mkstemp makes its file private (0600), so
    a run or an export written through it would be unreadable to the others that share a machine."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def fsync_path(path: str | Path) -> None:
    """fsync a file's data or a folder's entries (a rename is durable only once both are)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from None  # a failed write() names no file: name it
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


def weights_metadata(config: ModelConfig) -> dict[str, str]:
    """safetensors metadata that binds weights to the config they were trained with: the fields the
    tensors cannot reveal (gate_op, gate_norm, rope_theta, norm_eps, ...) are checked against it on load."""
    return {"format": "pt", WEIGHTS_CONFIG_KEY: json.dumps(config.to_dict(), sort_keys=True)}


def config_mismatch(weights_path: str | Path, config: dict) -> str | None:
    """None if the weights' recorded model config (if any) equals `config`, else which fields differ."""
    from safetensors import safe_open

    with safe_open(str(weights_path), "pt") as f:
        recorded = (f.metadata() or {}).get(WEIGHTS_CONFIG_KEY)
    if recorded is None:
        return None  # written before the config was recorded: shapes are still checked when loading
    recorded = ModelConfig.from_dict(json.loads(recorded)).to_dict()
    differ = [f"{key}={config.get(key)!r} (the weights were trained with {recorded.get(key)!r})"
              for key in sorted(set(recorded) | set(config)) if recorded.get(key) != config.get(key)]
    return "config differs from the weights': " + ", ".join(differ) if differ else None


def record_weights_config(path: str | Path, config: ModelConfig) -> None:
    """Add weights_metadata(config) to a safetensors file written by someone else (transformers'
    save_pretrained), rewriting it atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        metadata = {**(f.metadata() or {}), **weights_metadata(config)}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        fsync_path(tmp)  # else a crash after the rename can leave the old name holding a truncated file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_weights(model: Transformer, path: str | Path) -> None:
    """safetensors, atomically, with the config in its metadata and its sha256 in the folder's manifest;
    tied weights are stored once."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_model(model, tmp, metadata=weights_metadata(model.config))
        os.chmod(tmp, umask_mode())
        fsync_path(tmp)  # else a crash after the rename can leave the old name holding a truncated file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_manifest(path.parent, names=[path.name])


def write_manifest(folder: str | Path, names: list[str] | None = None) -> None:
    """Record the sha256 of every file in a folder (or of `names`, added to the manifest already there).
    A checkpoint writes it last, so its presence means complete."""
    folder = Path(folder)
    files = (read_manifest(folder) or {}) if names else {}
    for name in names or [p.name for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST]:
        files[name] = sha256_file(folder / name)
    atomic_write_json(folder / MANIFEST, {"format_version": FORMAT_VERSION, "files": files})


def read_manifest(folder: Path) -> dict | None:
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def verify_checkpoint(folder: str | Path, required: tuple[str, ...] = (WEIGHTS,)) -> str | None:
    """None if the folder is complete and every checksum matches, else why not. Every file the manifest
    names must be a plain file of this folder (no '..', no absolute path, no link leading out), and
    `required` files must be among them: nothing is read unverified."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        if not any(folder.glob("*.safetensors")):
            return ("not a checkpoint: no manifest.json and no weights; give a run's checkpoints/step_N folder "
                    "(or leave --checkpoint out for the run's latest good one)")
        return "no manifest.json (the write did not finish)"
    files = read_manifest(folder)
    if files is None:
        return "manifest.json unreadable"
    root = folder.resolve()
    for name, digest in files.items():
        path = folder / name
        if name != Path(name).name or name in ("", ".", "..") or path.resolve().parent != root:
            return f"manifest.json names {name!r}, which is not a file of this folder"
        if not path.is_file():
            return f"{name} missing"
        if sha256_file(path) != digest:
            return f"{name} checksum mismatch (corrupt or truncated)"
    for name in required:
        if name not in files:
            return f"{name} is not in manifest.json, so it cannot be verified"
    return None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def _warn_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def checkpoint_problem(folder: Path, run_dir: Path, meta: dict, tokenizer_hash) -> str | None:
    """Why `folder` cannot serve `run_dir` (None if it can): checksums, and the weights' recorded config
    and the trainer's recorded tokenizer hash against the run's own config.json and tokenizer.json."""
    if folder.is_file():
        return f"a file, not a checkpoint folder; give the folder that holds it ({folder.parent})"
    if not folder.is_dir():
        return "no such folder"
    problem = verify_checkpoint(folder)
    if problem is None:
        try:
            problem = config_mismatch(folder / WEIGHTS, ModelConfig.from_dict(meta["model"]).to_dict())
        except Exception as err:  # SafetensorError: the verified file is not safetensors at all
            problem = f"{WEIGHTS} does not load: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    if problem is None and (folder / "state.json").is_file():
        try:
            state = json.loads((folder / "state.json").read_text())
        except ValueError:  # not JSON (a UnicodeDecodeError included)
            state = None
        recorded = state.get("tokenizer_sha256") if isinstance(state, dict) else None
        if not isinstance(state, dict):
            problem = "state.json is not the JSON object the trainer writes"
        elif recorded is not None and not (run_dir / "tokenizer.json").is_file():  # not "differs": it is gone
            problem = f"{run_dir / 'tokenizer.json'} is missing; restore the run's own tokenizer.json"
        elif recorded is not None and recorded != tokenizer_hash():
            problem = (f"{run_dir / 'tokenizer.json'} differs from the tokenizer it was trained with; "
                       f"restore the run's own tokenizer.json")
    return problem


def find_checkpoint(run_dir: str | Path, load, checkpoint: str | Path | None = None, warn=_warn_stderr,
                    final_weights: bool = True):
    """(folder, load(folder)) for the checkpoint to use: the one rule of resume, generate, export and the
    transformers/lm-eval adapters.

    Named explicitly (`checkpoint`): that folder, or a ValueError saying why not. Otherwise the newest
    checkpoint that verifies (checkpoint_problem) and loads; a bad one is reported with `warn` and the
    previous one tried; RUN/model.safetensors comes last (if `final_weights`)."""
    run_dir = Path(run_dir)
    meta = read_run_config(run_dir)
    tokenizer_hash = functools.cache(lambda: _tokenizer_hash(run_dir))

    def attempt(folder: Path):
        problem = checkpoint_problem(folder, run_dir, meta, tokenizer_hash)
        if problem is not None:
            return None, problem
        try:
            return (folder, load(folder)), None
        except Exception as err:  # verified, yet does not load (wrong shapes, an unreadable file): say why
            return None, f"does not load: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"

    if checkpoint is not None:
        found, problem = attempt(Path(checkpoint))
        if found is None:
            raise CheckpointError(f"--checkpoint {str(checkpoint)!r}: {problem}")
        return found
    candidates = list(reversed(list_checkpoints(run_dir)))
    if final_weights and (run_dir / WEIGHTS).is_file():
        candidates.append(run_dir)
    problems = []
    for folder in candidates:
        found, problem = attempt(folder)
        if found is not None:
            return found
        problems.append(f"{folder.name}: {problem}")
        warn(f"warning: {folder} is unusable ({problem}); trying the previous checkpoint")
    raise CheckpointError(f"run={str(run_dir)!r}: no usable weights ("
                          + ("; ".join(problems) or "no checkpoint and no model.safetensors") + ")")


def _tokenizer_hash(run_dir: Path) -> str | None:
    from egmla.data.tokenizer import tokenizer_sha256

    path = run_dir / "tokenizer.json"
    return tokenizer_sha256(load_tokenizer(run_dir)) if path.is_file() else None


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"run={str(run_dir)!r}: no config.json there; pass a directory written by `egmla train`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"run={str(run_dir)!r}: {path} is not valid JSON ({error}); it is written by `egmla train` "
                         f"or `egmla export`: restore it from a copy or train / export the run again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"run={str(run_dir)!r}: {path} holds a JSON {type(meta).__name__}, not the object `egmla "
                         f"train` writes; restore it from a copy or train the run again")
    if meta.get("model_type") == "egmla":  # load_model takes exports; what reads a run's own config here cannot
        raise ValueError(f"run={str(run_dir)!r}: an EgmlaForCausalLM export (`egmla export --to hf`), not a run "
                         f"directory: this needs the run written by `egmla train` (an export has no checkpoints, "
                         f"optimizer state or training config); `egmla generate`, `serve`, `eval` and `plan` take "
                         f"the export")
    if "model_type" in meta:  # a transformers folder of another model
        raise ValueError(f"run={str(run_dir)!r}: a Hugging Face folder of model_type={meta['model_type']!r}, not an "
                         f"egmla run or EgmlaForCausalLM export; load it with transformers (or vLLM) instead")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"run={str(run_dir)!r}: format_version={version!r} but this egmla reads version "
                         f"{FORMAT_VERSION}; re-export it with the egmla version that wrote it")
    if not isinstance(meta.get("model"), dict):
        raise ValueError(f"run={str(run_dir)!r}: {path} has model={meta.get('model')!r}, not the object of model fields "
                         f"`egmla train` writes; restore it from a copy or train the run again")
    return meta


def load_model(run_dir: str | Path, device="cpu", dtype: torch.dtype | None = None,
               checkpoint: str | Path | None = None, warn=_warn_stderr) -> tuple[Transformer, dict]:
    """The model of a run and its config.json, from the checkpoint find_checkpoint picks (verified). An exported
    Hugging Face folder (`egmla export --to hf`) is taken too (egmla.hf.export.load_hf_export)."""
    from safetensors.torch import load_model as st_load_model

    from egmla.hf.export import is_hf_export

    if is_hf_export(run_dir):
        if checkpoint is not None:
            raise ValueError(f"checkpoint={str(checkpoint)!r}: {str(run_dir)!r} is a Hugging Face export, which has "
                             f"one set of weights and no checkpoints; leave --checkpoint out")
        from egmla.hf.export import load_hf_export

        return load_hf_export(run_dir, device=device, dtype=dtype)

    meta = read_run_config(run_dir)
    config = ModelConfig.from_dict(meta["model"])

    def load(folder: Path) -> Transformer:
        with torch.device("meta"):
            model = Transformer(config)
        model = model.to_empty(device=device)
        model.tie_weights()
        st_load_model(model, folder / WEIGHTS, device=str(device))
        model._rebuild_buffers()
        return model

    _, model = find_checkpoint(run_dir, load, checkpoint=checkpoint, warn=warn)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), meta


def load_tokenizer(run_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(run_dir) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"run={str(run_dir)!r}: no tokenizer.json; the run directory is incomplete")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise ValueError(f"run={str(run_dir)!r}: tokenizer.json does not load ({error}); copy it again from the "
                         f"run that wrote it") from None
