"""Training checkpoints in the egmla.runs format, written atomically, the newest N kept.

    RUN/checkpoints/step_00000100/
      model.safetensors   full (unsharded) weights, tied output head stored once, ModelConfig in its metadata
      optimizer.pt        AdamW state keyed by parameter name (torch.save; read with weights_only=True)
      state.json          step, data position, tokens seen, lr, RNG states, tokenizer hash, run length, split sizes
      manifest.json       sha256 of every file above; written last

The folder is assembled under a temporary name, every file and the folder synced to the disk, and renamed
into place (the parent synced too) before any older checkpoint is pruned, so a crash mid-write, or a power
loss after it, leaves either the old set of checkpoints or the new one. Names are world-size independent (full state
dicts keyed by parameter name), so a checkpoint saved by N processes resumes under M.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from egmla.config import ModelConfig
from egmla.runs import (WEIGHTS, CheckpointError, atomic_write_bytes, atomic_write_json, find_checkpoint, fsync_path,
                        list_checkpoints, storage_problem, weights_metadata, write_manifest)
from egmla.train.distributed import DistInfo, broadcast_object

OPTIMIZER, STATE = "optimizer.pt", "state.json"
ASSEMBLING = ".tmp-"  # RUN/checkpoints/.tmp-step_*: a checkpoint being written, renamed into place when complete


def checkpoint_folder(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded CPU state dicts keyed by parameter name (collective under FSDP; full on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, info: DistInfo, keep: int, model_config: ModelConfig) -> Path:
    """Write checkpoint `step` (every process calls this; rank 0 writes) and prune to the newest `keep`.
    A failed write (a full disk) removes its temporary folder, leaves the older checkpoints as they were, and is raised
    on every process."""
    from safetensors.torch import save_file

    weights, optim_state = full_state_dicts(model, optimizer)
    final = checkpoint_folder(run_dir, step)
    failure = None
    if info.is_main:
        tmp = final.with_name(f"{ASSEMBLING}{final.name}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if model_config.tie_embeddings:  # the output head is the embedding: store it once, as save_model does
                weights.pop("tok_embeddings.weight", None)
            save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(tmp / WEIGHTS),
                      metadata=weights_metadata(model_config))
            fsync_path(tmp / WEIGHTS)
            atomic_write_bytes(tmp / OPTIMIZER, optimizer_bytes(optim_state))
            atomic_write_json(tmp / STATE, {**state, "step": step, "rng": rng_state()})
            write_manifest(tmp)
            fsync_path(tmp)
            if final.exists():  # re-saving a step (e.g. after resuming from an older checkpoint)
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_path(final.parent)
            prune(run_dir, final, keep)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(err, Exception):  # Ctrl-C and the like: torchrun signals every process itself
                raise
            failure = err
    # rank 0's outcome to every process, in place of a barrier: after a failed write (a full disk) the others raise
    # rank 0's error at once instead of waiting in the barrier until torchrun or the collective timeout kills them
    reported = broadcast_object(None if failure is None else shared_failure(failure), info)
    if failure is not None:
        raise failure
    if reported is not None:
        raise failure_on_another_rank(reported, final)
    return final


def shared_failure(err: Exception) -> tuple | str:
    """What the other processes need to raise rank 0's failed write as theirs: an OSError's (errno, strerror,
    filename), so that the trainer says the same line on every rank; else rank 0's message."""
    if isinstance(err, OSError):
        return err.errno, err.strerror or str(err), err.filename
    reason = storage_problem(err)  # safetensors' I/O error
    if reason is not None:
        return None, reason, None
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def failure_on_another_rank(reported: tuple | str, folder: Path) -> Exception:
    if isinstance(reported, tuple):
        return OSError(*reported)
    return RuntimeError(f"checkpoint {folder}: rank 0 failed to write it ({reported}); see rank 0's error for the "
                        f"cause and its fix")


def remove_cut_short_saves(run_dir: str | Path) -> tuple[list[Path], int]:
    """Remove what saves killed mid-write (SIGKILL, a power loss) left behind: checkpoint folders still under their
    temporary name (a paper-base one holds weights and optimizer state, gigabytes) and the `.NAME.*.tmp` files of
    atomic writes in the run folder (final weights, summary). Call only while holding the run's lock
    (egmla.train.runlock): no live writer can own them then. Returns what was removed and its size in bytes."""
    run_dir = Path(run_dir)
    leftovers = [p for p in (run_dir / "checkpoints").glob(f"{ASSEMBLING}step_*") if p.is_dir()]
    leftovers += [p for p in run_dir.glob(".*.tmp") if p.is_file()]
    size = 0
    for path in leftovers:
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        size += sum(f.stat().st_size for f in files)
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return leftovers, size


def prune(run_dir: str | Path, written: Path, keep: int) -> None:
    """After `written` is in place: drop the checkpoints of later steps (a history abandoned by resuming from an
    older checkpoint, because the later ones were unusable: kept, they would be 'newest' at the next resume and
    make the pruning below delete the good ones), then all but the newest `keep`, never `written` itself."""
    step_of = written.name
    for folder in list_checkpoints(run_dir):
        if folder.name > step_of:
            shutil.rmtree(folder, ignore_errors=True)
    for folder in list_checkpoints(run_dir)[:-keep]:
        if folder != written:
            shutil.rmtree(folder, ignore_errors=True)


def optimizer_bytes(optim_state: dict) -> memoryview:
    """torch.save into memory (the state's size again, on the host, not copied once more): written with an
    ordinary write, a full disk is an OSError the trainer reports in one line; torch.save straight to a file turns
    it into an opaque RuntimeError."""
    buffer = io.BytesIO()
    torch.save(optim_state, buffer)
    return buffer.getbuffer()


STATE_KEYS = ("step", "sequences_consumed", "rng")  # what a resume reads from state.json


def read_state(folder: Path) -> dict:
    state = json.loads((folder / STATE).read_text())
    missing = [key for key in STATE_KEYS if key not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:  # else a KeyError mid-resume; as a CheckpointError, find_checkpoint tries the previous checkpoint
        raise CheckpointError(f"{STATE} lacks {', '.join(missing)}; it is not one the trainer wrote")
    return state


def load_weights(folder: Path, model: nn.Module) -> None:
    """Load a checkpoint's weights into an unwrapped model (before parallelize)."""
    from safetensors.torch import load_model

    device = next(model.parameters()).device
    load_model(model, str(folder / WEIGHTS), device=str(device))


def read_optimizer(folder: Path) -> dict:
    """optimizer.pt, read with weights_only=True (tensors and plain containers only, never other objects)."""
    try:
        return torch.load(folder / OPTIMIZER, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own message would suggest unpickling arbitrary objects: do not pass it on
        raise CheckpointError(f"{OPTIMIZER} is not an optimizer state of tensors ({type(err).__name__}); egmla "
                              f"reads it with weights_only=True only") from None


def load_optimizer(optim_state: dict, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the full optimizer state (moments, step counts) into an optimizer over the (possibly wrapped or sharded)
    model. Its parameter groups keep their own settings: this run's weight_decay, betas and eps (changed on resume
    with --set train.KEY=...) and this device's fused/foreach choice, not the ones saved with the state. Call it
    while no parameter has a gradient: set_optimizer_state_dict first fills a fresh optimizer's state by a step over
    zero gradients of its own, and fails where gradients are already there."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    try:
        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{folder / OPTIMIZER}: does not fit this model's parameters ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); it belongs to another model") from None
    for group, own in zip(optimizer.param_groups, settings):  # the load replaced them with the checkpoint's
        group.update(own)


def find_resumable(run_dir: str | Path, model: nn.Module, warn=print) -> tuple[Path, dict, dict]:
    """(folder, state, optimizer state) of the newest checkpoint that verifies and loads (its weights are
    then in `model`): egmla.runs.find_checkpoint's rule, so an unusable one is reported and the previous tried."""
    def load(folder: Path) -> tuple[dict, dict]:
        state, optim_state = read_state(folder), read_optimizer(folder)
        load_weights(folder, model)
        return state, optim_state

    try:
        folder, (state, optim_state) = find_checkpoint(run_dir, load, warn=warn, final_weights=False)
    except CheckpointError as err:
        raise CheckpointError(f"--resume {str(run_dir)!r}: {str(err).split(': ', 1)[1]}; start a new run "
                              f"instead") from None
    return folder, state, optim_state
