"""The training loop: data, model, optimizer, validation, checkpoints, logs. One function, `train`.

Runs as one process or under torchrun (DDP or FSDP2 from egmla.train.distributed). Every process
sees the same global batch sequence (egmla.data.loader), takes its contiguous slice and accumulates
micro-batches, so the result does not depend on the number of processes beyond rounding.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import signal
import time
from pathlib import Path

import torch

from egmla.bench.profiling import StepProfiler
from egmla.model import Transformer
from egmla.runs import (FORMAT_VERSION, StorageError, atomic_write_bytes, atomic_write_json, list_checkpoints,
                        storage_problem)
from egmla.train import checkpoint as ckpt
from egmla.train.config import (RunConfig, TrainConfig, cpu_work_warning, resolve_compile_mode, uses_cuda_graphs,
                                warmup_warning)
from egmla.train.loss import token_loss
from egmla.train.recompute import recompute_blocks
from egmla.train.distributed import (DistInfo, all_reduce_sum, broadcast_object, clip_grad_norm,
                                     gradient_sync, init_distributed, others_wait_for_rank_0, parallelize,
                                     per_rank)
from egmla.train.runlock import claim_run_dir
from egmla.train.metrics import (MetricsLog, flops_per_token, peak_flops, peak_memory_bytes, peak_reserved_bytes,
                                 plot_loss_curve, read_metrics)
from egmla.train.optim import build_optimizer, lr_at, set_lr


CALIBRATION_STEPS = 20  # a time-budgeted run (train.steps = 0) sets its length after timing this many steps of a call


class TrainingDiverged(ValueError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


class StopFlag:
    """SIGINT/SIGTERM ask the loop to save and stop after the current step. Another signal more than
    2 s later aborts; sooner ones are echoes (torchrun forwards the terminal's Ctrl-C to its workers,
    which already got it) and are ignored."""

    def __init__(self):
        self.requested, self.previous, self.first_at = False, {}, 0.0

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested, self.first_at = True, time.monotonic()
        elif time.monotonic() - self.first_at > 2.0:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def batch_layout(run: RunConfig, info: DistInfo) -> tuple[int, int]:
    """(micro_batch_size, accumulation steps) per process, or a ValueError saying what to change."""
    train = run.train
    if train.batch_size % info.world_size:
        raise ValueError(f"train.batch_size={train.batch_size}: must be divisible by the number of processes "
                         f"({info.world_size})")
    per_process = train.batch_size // info.world_size
    micro = train.micro_batch_size or per_process
    if micro > per_process or per_process % micro:
        raise ValueError(f"train.micro_batch_size={micro}: must divide the per-process batch {per_process} "
                         f"(train.batch_size={train.batch_size} over {info.world_size} processes)")
    if train.ddp_static_graph and train.parallel == "ddp" and info.enabled and micro < per_process:
        raise ValueError(f"train.ddp_static_graph=true with gradient accumulation ({per_process // micro} "
                         f"micro-batches per process): DDP's static graph fails under no_sync() in torch 2.13 and "
                         f"before (an internal assert on the first backward, pytorch/pytorch#143580); set "
                         f"train.micro_batch_size=0 (one micro-batch of {per_process} per process) or "
                         f"train.ddp_static_graph=false")
    return micro, per_process // micro


def autocast_for(run: RunConfig, device: torch.device):
    use_bf16 = run.train.dtype == "bf16" or (run.train.dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext, "fp32"
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bf16"


def graph_step_begin(graphs: bool) -> None:
    """With CUDA-graph compile modes: a new step begins, the graphs' previous outputs may be overwritten."""
    if graphs:
        torch.compiler.cudagraph_mark_step_begin()


@torch.no_grad()
def evaluate(model, windows, max_sequences: int, micro_batch: int, autocast, info: DistInfo,
             graphs: bool = False, chunk_tokens: int = 0) -> float:
    """Mean validation loss over the fixed held-out windows. Each process scores its share; all run
    the same number of forwards (FSDP needs that), padding with a discarded batch where short. chunk_tokens: the
    loss's chunks (train.loss_chunk_tokens), so that validation needs no more memory than training."""
    from egmla.data.loader import validation_window_ids

    mine = validation_window_ids(windows, max_sequences, info.rank, info.world_size)
    count = windows.num_windows if max_sequences <= 0 else min(max_sequences, windows.num_windows)
    rounds = math.ceil(math.ceil(count / info.world_size) / micro_batch)
    total, tokens = 0.0, 0
    model.eval()
    try:  # back in train mode on an error too (out of memory, a lost process): a caller may go on training
        for r in range(rounds):
            ids = mine[r * micro_batch:(r + 1) * micro_batch]
            inputs, targets = windows.batch(ids if len(ids) else [0])
            graph_step_begin(graphs)
            with autocast():
                loss = token_loss(model, inputs.to(info.device), targets.to(info.device), reduction="sum",
                                  chunk_tokens=chunk_tokens)
            if len(ids):
                total, tokens = total + float(loss), tokens + targets.numel()
        total, tokens = all_reduce_sum([total, tokens], info)
    finally:
        model.train()
    return total / tokens


def write_run_files(run: RunConfig, run_dir: Path, tokenizer) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    from egmla import __version__

    atomic_write_json(run_dir / "config.json", {"format_version": FORMAT_VERSION, "egmla_version": __version__,
                                               **run.to_dict()})
    atomic_write_bytes(run_dir / "tokenizer.json", tokenizer.to_str().encode())


def refuse_reshuffling(run: RunConfig, run_dir: Path) -> None:
    """The data order is drawn from train.seed per epoch and resumed by position: another seed mid-run would repeat
    some windows of the epoch and skip others."""
    saved = json.loads((run_dir / "config.json").read_text()).get("train", {}).get("seed", run.train.seed)
    if saved != run.train.seed:
        raise ValueError(f"train.seed={run.train.seed}: the run was started with seed {saved}, which orders its data; "
                         f"keep it to resume, or start a new run")


def refuse_steps_behind(steps: int, step: int) -> None:
    """`--resume RUN --set train.steps=N` with N below the checkpoint's step would record a length the run has
    already passed (config.json would say N while its weights are at the later step). 0 is a time budget, not a
    length."""
    if 0 < steps < step:
        raise ValueError(f"train.steps={steps}: the run's checkpoint is already at step {step}; pass train.steps "
                         f"above {step} to train further, or train.steps={step} to finish it where it is")


def keep_train_changes(run: RunConfig, run_dir: Path, log) -> None:
    """A resumed run's changed train.* settings (`--resume RUN --set train.steps=...`) go into its config.json, so
    that the next resume continues with them rather than the ones it started with."""
    path = run_dir / "config.json"
    saved = json.loads(path.read_text())
    train = run.train.to_dict()
    changed = [f"train.{key} {saved.get('train', {}).get(key)!r} -> {value!r}" for key, value in train.items()
               if saved.get("train", {}).get(key) != value]
    if changed:
        atomic_write_json(path, {**saved, "train": train})
        log(f"changed on resume, kept in {path}: {', '.join(changed)}")


def warn_if_the_corpus_changed(state: dict, meta: dict, say) -> None:
    """A resume reads the corpus as it is now: if its splits hold other token counts than when the checkpoint was
    written (files added, edited, or the python-source installation changed), the run goes on over other data, so
    the resumed losses are no longer those of an uninterrupted run. Said, not refused: continuing on a grown corpus
    can be what the user wants. (Checkpoints written before 2026-12-06 did not record the counts.)"""
    changed = [f"{name} {state[key]:,} -> {meta[now]:,}" for name, key, now in (
        ("training tokens", "train_split_tokens", "train_tokens"), ("validation tokens", "val_split_tokens",
                                                                    "val_tokens")) if key in state and state[key] != meta[now]]
    if changed:
        say(f"warning: the corpus changed since this checkpoint ({', '.join(changed)}): the resumed run trains and "
            f"validates on other data than the run so far; restore the corpus (data.corpus) to resume exactly")


def load_run_tokenizer(run_dir: Path):
    from tokenizers import Tokenizer

    path = run_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"--resume {str(run_dir)!r}: no tokenizer.json there; the run directory is incomplete")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the library's own exception type, with no file name: a traceback reached the user
        raise ValueError(f"--resume {str(run_dir)!r}: {path} is not a readable tokenizer "
                         f"({str(err).splitlines()[0]}); restore the run's own tokenizer.json from a copy (the "
                         f"weights were trained with its ids), or start a new run") from None


def setup_data(run: RunConfig, run_dir: Path, resume: bool, info: DistInfo, progress: bool, log):
    """Tokenizer (the run's own on resume) and shards; rank 0 builds the caches, the others then read them."""
    from egmla.data import prepare_data

    tokenizer = load_run_tokenizer(run_dir) if resume else None
    result = None
    with others_wait_for_rank_0(info):  # longer than a collective may: a large corpus takes rank 0 an hour
        if info.is_main:
            result = prepare_data(run.data, run.model.vocab_size, tokenizer, progress=progress, log=log)
    if not info.is_main:
        result = prepare_data(run.data, run.model.vocab_size, tokenizer, progress=False, log=lambda *_: None)
    return result


def device_label(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' or 'cpu': what timings are quoted against."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def train(run: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True, log=print,
          on_checkpoint=None) -> dict:
    """Train `run` into run_dir (resume=True: continue from its newest good checkpoint). Returns a summary.
    The run directory is locked for the run's life (a second trainer gets a clear error). on_checkpoint(run_dir)
    is called on rank 0 after each checkpoint is written. A file-system error (a full disk) becomes one line."""
    run_dir = Path(run_dir)
    info = init_distributed(run.train.device)
    if uses_cuda_graphs(run.train.compile_mode) and info.world_size > 1:  # before anything is written
        raise ValueError(f"train.compile_mode={run.train.compile_mode!r} with {info.world_size} processes: the "
                         f"CUDA-graph modes are built and measured for one process; use compile_mode='default' "
                         f"under torchrun")
    with claim_run_dir(run_dir, resume, info):
        if info.is_main:  # the lock is ours: what a save killed mid-write left is dead, and may be gigabytes
            removed, size = ckpt.remove_cut_short_saves(run_dir)
            if removed:
                log(f"removed {len(removed)} leftover(s) of saves cut short ({size / 1e6:,.1f} MB): "
                    + ", ".join(str(path.relative_to(run_dir)) for path in removed))
        try:
            return _train(run, run_dir, resume, progress, log, on_checkpoint, info)
        except Exception as err:
            reason = storage_problem(err)
            if reason is None:
                raise
            # a full disk wants space; a path through a file or a read-only folder (data.cache_dir) wants another path
            fix = ("free space" if getattr(err, "errno", None) in (None, errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                   else "make that path a folder you can write")
            then = (f"the checkpoints in {run_dir} are intact: {fix} and continue with `egmla train --resume "
                    f"{run_dir}`" if list_checkpoints(run_dir) else f"{fix} and start again")
            raise StorageError(f"{reason} (training into {run_dir}); {then}") from None


def _train(run: RunConfig, run_dir: Path, resume: bool, progress: bool, log, on_checkpoint, info: DistInfo) -> dict:
    say = log if info.is_main else (lambda *_: None)
    setup = _set_up(run, run_dir, resume, progress, info, say)
    step, val_loss, step_times, stop_reason, wall_s = _run_steps(run, run_dir, setup, progress, info, say,
                                                                 on_checkpoint)
    return finish(run, run_dir, info, setup.model, setup.shards.meta, step, val_loss, step_times, setup.peak,
                  setup.step_flops, stop_reason, wall_s, say)


@dataclasses.dataclass
class Resumed:
    """The checkpoint a resumed run continues from; its weights are already in the model."""
    folder: Path
    state: dict  # training state as saved by _run_steps's save(): step, data position, rng, total_steps, ...
    optim_state: dict


@dataclasses.dataclass
class TrainingSetup:
    """What _set_up built or restored, for the step loop and the summary."""
    cfg: TrainConfig  # run.train with compile_mode resolved; not yet a time-budgeted run's calibrated steps
    micro_batch: int
    shards: object  # egmla.data.prepare_data's result: tokens per split and their meta
    tokenizer_hash: str
    train_windows: object
    val_windows: object
    model: Transformer  # as built: parameter counts for the summary
    wrapped: torch.nn.Module  # model compiled and parallelized: what trains, validates and is saved
    optimizer: torch.optim.Optimizer
    graphs: bool  # a CUDA-graph compile mode
    autocast: object
    batches: object  # TrainBatches, at the resumed position
    resumed: Resumed | None  # None: a fresh run
    start_step: int
    tokens_per_step: int
    peak: float | None  # the device's peak FLOP/s, for MFU (CUDA only)
    step_flops: float
    metrics: MetricsLog


def _set_up(run: RunConfig, run_dir: Path, resume: bool, progress: bool, info: DistInfo, say) -> TrainingSetup:
    """Data, model (its checkpoint loaded on resume), optimizer and metrics log, in the order the steps need."""
    from egmla.data.loader import TrainBatches, WindowedTokens
    from egmla.data.tokenizer import tokenizer_sha256

    cfg = dataclasses.replace(run.train, compile_mode=resolve_compile_mode(  # 'auto' -> what runs here
        run.train.compile_mode, run.train.compile, info.device.type, info.world_size))
    for warning in (warmup_warning(cfg), cpu_work_warning(run, info.device.type)):
        if warning is not None:
            say(warning)
    micro_batch, accumulation = batch_layout(run, info)
    tokenizer, shards = setup_data(run, run_dir, resume, info, progress, say)
    tokenizer_hash = tokenizer_sha256(tokenizer)
    if resume:
        refuse_reshuffling(run, run_dir)
    if info.is_main and not resume:
        write_run_files(run, run_dir, tokenizer)
    train_windows = WindowedTokens(shards.tokens("train"), cfg.seq_len, "training")
    val_windows = WindowedTokens(shards.tokens("val"), cfg.seq_len, "validation")

    model, resumed = _build_model(run, cfg, run_dir, resume, shards.meta, say)
    start_step, position = 0, 0
    if resumed is not None:
        start_step, position = resumed.state["step"], resumed.state["sequences_consumed"]
    wrapped, optimizer, graphs = _prepare_for_training(model, cfg, info, resumed)

    autocast, precision = autocast_for(run, info.device)
    batches = TrainBatches(train_windows, cfg.batch_size, cfg.seed, position)
    if resumed is not None:
        refuse_steps_behind(cfg.steps, start_step)
        if info.is_main:  # only now: a resume refused before leaves config.json as it was
            keep_train_changes(run, run_dir, say)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    device_name = device_label(info.device)
    peak = peak_flops(device_name, cfg.peak_tflops) if info.device.type == "cuda" else None
    step_flops = flops_per_token(run.model, cfg.seq_len) * tokens_per_step
    metrics = MetricsLog(run_dir, info.is_main, cfg.tensorboard, start_step=start_step, warn=say)
    say(f"{run.name}: {run.model.variant_name()}, {model.num_params() / 1e6:.2f}M parameters "
        f"({model.num_params(False) / 1e6:.2f}M without gate tables), {info.world_size} process(es) on "
        f"{device_name}, {precision}, batch {cfg.batch_size}x{cfg.seq_len} tokens "
        f"({accumulation} micro-batch(es) of {micro_batch}), {shards.meta['train_tokens']:,} training tokens"
        + (f", {cfg.gate_table_update} gate-table updates" if run.model.is_gated else "")
        + (f", compiled ({cfg.compile_mode})" if cfg.compile else "")
        + (f", every {cfg.activation_checkpointing} block(s) recomputed in backward" if cfg.activation_checkpointing
           else "")
        + (f", loss in chunks of {cfg.loss_chunk_tokens} tokens" if cfg.loss_chunk_tokens else ""))
    say(f"unigram baseline: train-token entropy {shards.meta['train_unigram_entropy']:.3f} nats/token, "
        f"unigram model on validation {shards.meta['val_unigram_cross_entropy']:.3f}")
    return TrainingSetup(cfg=cfg, micro_batch=micro_batch, shards=shards, tokenizer_hash=tokenizer_hash,
                         train_windows=train_windows, val_windows=val_windows, model=model, wrapped=wrapped,
                         optimizer=optimizer, graphs=graphs, autocast=autocast, batches=batches, resumed=resumed,
                         start_step=start_step, tokens_per_step=tokens_per_step, peak=peak, step_flops=step_flops,
                         metrics=metrics)


def _build_model(run: RunConfig, cfg, run_dir: Path, resume: bool, data_meta: dict, say
                 ) -> tuple[Transformer, Resumed | None]:
    """The model on the CPU, with the newest good checkpoint's weights on resume (None for a fresh run)."""
    torch.manual_seed(cfg.seed)
    model = Transformer(run.model)  # initialised on the CPU: identical on every device and process count
    model.check_inputs = False  # ids come from our tokenizer, checked against vocab_size above
    if not resume:
        return model, None
    # weights verified and loaded; the tokenizer hash was checked against the run's tokenizer.json
    resumed = Resumed(*ckpt.find_resumable(run_dir, model, warn=say))
    if resumed.state.get("seq_len", cfg.seq_len) != cfg.seq_len:
        raise ValueError(f"train.seq_len={cfg.seq_len}: the checkpoint was trained with seq_len="
                         f"{resumed.state['seq_len']}; keep it to resume")
    warn_if_the_corpus_changed(resumed.state, data_meta, say)
    say(f"resuming from {resumed.folder} (step {resumed.state['step']})")
    return model, resumed


def _prepare_for_training(model: Transformer, cfg, info: DistInfo, resumed: Resumed | None):
    """(wrapped model, optimizer, graphs): the model on its device, recomputed, compiled and parallelized, with
    the optimizer (its state and the RNG restored on resume)."""
    model = model.to(info.device)
    graphs = uses_cuda_graphs(cfg.compile_mode)
    recompute_blocks(model, cfg.activation_checkpointing)  # before compile and parallelize wrap the blocks
    if cfg.compile:
        for block in model.layers:
            block.compile(mode=cfg.compile_mode)
    wrapped = parallelize(model, cfg, info)
    optimizer = build_optimizer(wrapped, cfg)
    if resumed is not None:  # before own_gradients: ckpt.load_optimizer needs parameters without gradients
        ckpt.load_optimizer(resumed.optim_state, resumed.folder, wrapped, optimizer)
        ckpt.set_rng_state(resumed.state["rng"])
    if graphs:
        own_gradients(wrapped)
    return wrapped, optimizer, graphs


def _run_steps(run: RunConfig, run_dir: Path, setup: TrainingSetup, progress: bool, info: DistInfo, say,
               on_checkpoint) -> tuple[int, float | None, list[float], str | None, float]:
    """The step loop with validation, checkpoints and stops: (last step, its validation loss, this call's step
    times, stop reason or None, wall seconds)."""
    from tqdm import tqdm

    cfg, wrapped, batches, metrics = setup.cfg, setup.wrapped, setup.batches, setup.metrics

    # save() and validate() read cfg when called: a time-budgeted run's steps are set after calibration
    def save(step: int) -> Path:
        checkpoint_state = {
            "sequences_consumed": batches.position, "tokens_seen": batches.position * cfg.seq_len,
            "epoch": batches.epoch, "lr": lr_at(max(0, step - 1), cfg), "world_size": info.world_size,
            "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "tokenizer_sha256": setup.tokenizer_hash,
            "total_steps": cfg.steps, "train_split_tokens": setup.shards.meta["train_tokens"],
            "val_split_tokens": setup.shards.meta["val_tokens"]}
        folder = ckpt.save_checkpoint(run_dir, step, wrapped, setup.optimizer, checkpoint_state, info,
                                      cfg.keep_checkpoints, run.model)
        if info.is_main and on_checkpoint is not None:
            on_checkpoint(run_dir)
        return folder

    def validate(step: int) -> float:
        loss = evaluate(wrapped, setup.val_windows, cfg.eval_sequences, setup.micro_batch, setup.autocast, info,
                        graphs=setup.graphs, chunk_tokens=cfg.loss_chunk_tokens)
        metrics.log({"kind": "val", "step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
        return loss

    resumed = setup.resumed
    if cfg.steps == 0 and resumed is not None and resumed.state.get("total_steps"):
        cfg = dataclasses.replace(cfg, steps=resumed.state["total_steps"])  # a time-budgeted run, already calibrated
    bar = tqdm(total=cfg.steps or None, initial=setup.start_step, desc=run.name, unit="step",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    step, val_loss, step_times, last_saved, stop_reason = setup.start_step, None, [], setup.start_step, None
    profiler = StepProfiler(cfg, run_dir, info, say)  # train.profile_steps: the last steps under torch.profiler
    wall_start = time.perf_counter()
    try:
        with StopFlag() as stop:
            while cfg.steps == 0 or step < cfg.steps:
                profiler.begin(step + 1)
                started = time.perf_counter()
                lr = lr_at(step, cfg)
                set_lr(setup.optimizer, lr)
                time_up = cfg.time_limit_s > 0 and started - wall_start > cfg.time_limit_s
                loss_value, grad_norm, signal_votes, time_votes = train_step(
                    wrapped, setup.optimizer, batches, setup.train_windows, setup.micro_batch, setup.autocast, info,
                    cfg, step, stop.requested, time_up)
                step += 1
                step_times.append(time.perf_counter() - started)
                profiler.end(step)
                record = {"kind": "train", "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                          "tokens": batches.position * cfg.seq_len, "step_s": step_times[-1],
                          "tokens_per_s": setup.tokens_per_step / step_times[-1]}
                if setup.peak:
                    record["mfu"] = setup.step_flops / step_times[-1] / (setup.peak * info.world_size)
                metrics.log(record, tensorboard=step % cfg.log_every == 0)
                # after 20 steps of this call (a resumed call's first steps compile): until then lr_at holds the peak
                if cfg.steps == 0 and len(step_times) == CALIBRATION_STEPS:
                    cfg = dataclasses.replace(cfg, steps=budgeted_steps(cfg, step, step_times, wall_start, info))
                    bar.total = cfg.steps
                    say(f"time budget {cfg.time_limit_s:.0f}s: training for {cfg.steps} steps")
                    if (warning := warmup_warning(cfg)) is not None:  # a budget shorter than the warmup
                        say(warning)
                bar.update(1)
                validated = bool(cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
                if validated:
                    val_loss = validate(step)
                    note = f"step {step}: train loss {loss_value:.4f}, val loss {val_loss:.4f}"
                    (bar.write if progress and info.is_main else say)(f"{note} (ppl {math.exp(min(val_loss, 50)):.1f})")
                if step % cfg.log_every == 0 or step == cfg.steps:  # after validating: the bar shows this step's val
                    bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_loss:.3f}" if val_loss is not None else "-",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                # (a stop asked during the last step: the run is done.) The reason comes from the summed votes, so that
                # every process agrees: each started its clock at its own time, and another may pass the limit first
                if (signal_votes or time_votes) and step != cfg.steps:
                    stop_reason = "interrupted" if signal_votes else "time limit reached"
                    if stop_reason == "time limit reached" and not validated:
                        # the summary's final_val_loss is this step's, not an older step's or None (compare and
                        # paper_repro take it as the run's result); on top of the limit, like the checkpoint. A Ctrl-C
                        # wants out at once: not validated
                        val_loss = validate(step)
                    break
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
                    save(step)
                    last_saved = step
        if stop_reason and step != last_saved:
            folder = save(step)
            say(f"{stop_reason}: checkpoint saved at step {step} in {folder}; continue with "
                f"`egmla train --resume {run_dir}`")
        elif val_loss is None and not stop_reason:  # resumed a finished run: report its validation loss
            done = [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl")
                    if r.get("kind") == "val" and r.get("step") == step] if info.is_main else []
            done = broadcast_object(done, info)  # rank 0's file decides for all: validate() is a collective
            val_loss = done[-1] if done else validate(step)  # (not logged twice)
    finally:
        profiler.close()
        bar.close()
        metrics.close()
    return step, val_loss, step_times, stop_reason, time.perf_counter() - wall_start


def budgeted_steps(cfg, step: int, step_times: list[float], wall_start: float, info: DistInfo) -> int:
    """Total steps that fit train.time_limit_s at the speed measured so far in this call (rank 0 decides for all),
    leaving 5% for validation and checkpoints. The first quarter of the steps (warm-up) is not counted."""
    steady = sorted(step_times[len(step_times) // 4:])
    remaining = 0.95 * cfg.time_limit_s - (time.perf_counter() - wall_start)
    total = step + max(1, int(remaining / steady[len(steady) // 2]))
    return broadcast_object(total, info)


def train_step(model, optimizer, batches, windows, micro_batch: int, autocast, info: DistInfo, cfg, step: int,
               stop_requested: bool, time_up: bool) -> tuple[float, float, float, float]:
    """One optimizer step over the next global batch: (mean loss, gradient norm, the numbers of processes asked to
    stop by a signal and past train.time_limit_s)."""
    from egmla.data.loader import local_micro_batches

    loss_sum = torch.zeros((), device=info.device)
    micro_batches = local_micro_batches(batches.next_window_ids(), info.rank, info.world_size, micro_batch)
    for index, ids in enumerate(micro_batches):
        with phase("data"):
            inputs, targets = (t.to(info.device, non_blocking=True) for t in windows.batch(ids))
        graph_step_begin(uses_cuda_graphs(cfg.compile_mode))
        try:
            with gradient_sync(model, index == len(micro_batches) - 1), autocast(), phase("forward_backward"):
                loss = token_loss(model, inputs, targets, compiled=cfg.compile, chunk_tokens=cfg.loss_chunk_tokens)
                (loss / len(micro_batches)).backward()
        except torch.OutOfMemoryError:
            raise ValueError(f"train.micro_batch_size={micro_batch}: a micro-batch of {micro_batch}x{cfg.seq_len} "
                             f"tokens does not fit in device memory; lower train.micro_batch_size (gradient "
                             f"accumulation keeps the global batch)") from None
        loss_sum += loss.detach()
    with phase("clip"):
        grad_norm = clip_grad_norm(model, cfg.grad_clip)
    with phase("loss_reduce"):
        loss_total, signal_votes, time_votes = all_reduce_sum(
            [float(loss_sum) / len(micro_batches), float(stop_requested), float(time_up)], info)
    loss_value = loss_total / info.world_size
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        what, value = ("loss", loss_value) if not math.isfinite(loss_value) else ("gradient norm", grad_norm)
        raise TrainingDiverged(f"step {step + 1}: non-finite {what} ({value}); stopped before the update. The "
                               f"last good checkpoint is kept; lower train.lr or raise train.warmup_steps")
    with phase("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=not uses_cuda_graphs(cfg.compile_mode))  # see own_gradients
    return loss_value, grad_norm, signal_votes, time_votes


def own_gradients(model) -> None:
    """For the CUDA-graph compile modes: give every trainable parameter a zero gradient of its own before the first
    backward (and after a resume has loaded the optimizer state: ckpt.load_optimizer needs no gradients there);
    train_step then zeroes it in place. Otherwise autograd adopts a micro-batch's gradient, an output in
    the graph's memory pool, as .grad, and the next micro-batch's replay overwrites it: an error, or accumulated
    gradients silently lost (pytorch/pytorch#169545). With .grad already there, autograd adds into it."""
    for param in model.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)


def phase(name: str):
    """A labelled range of the training step (egmla.NAME) for torch.profiler (train.profile_steps; the labels
    are read by egmla.bench.profiling.PHASES); next to nothing when no profiler runs."""
    return torch.profiler.record_function(f"egmla.{name}")


def finish(run, run_dir, info, model, data_meta, step, val_loss, step_times, peak, step_flops, stop_reason,
           wall_s, say) -> dict:
    """Summary, summary.json and the loss-curve plot (rank 0)."""
    summary_path = Path(run_dir) / "summary.json"
    if step_times:
        steady = sorted(step_times[min(len(step_times) - 1, 3):])  # skip warm-up steps
        median_step = steady[len(steady) // 2]
        timings = {"median_step_s": median_step,
                   "tokens_per_s": run.train.batch_size * run.train.seq_len / median_step,
                   "mfu": step_flops / median_step / (peak * info.world_size) if peak else None, "train_wall_s": wall_s}
    else:  # nothing trained in this call (a finished run resumed): keep the timings measured when it ran
        previous = json.loads(summary_path.read_text()) if info.is_main and summary_path.is_file() else {}
        timings = {key: previous.get(key) for key in ("median_step_s", "tokens_per_s", "mfu", "train_wall_s")}
    peak_memory, memory_measure = peak_memory_bytes(info.device)
    reserved = peak_reserved_bytes(info.device)
    summary = {
        "name": run.name, "variant": run.model.variant_name(), "steps": step, "interrupted": stop_reason is not None,
        "stop_reason": stop_reason,
        "final_val_loss": val_loss, "final_val_ppl": math.exp(min(val_loss, 50)) if val_loss else None,
        "train_unigram_entropy": data_meta["train_unigram_entropy"],
        "val_unigram_cross_entropy": data_meta["val_unigram_cross_entropy"],
        "params": model.num_params(), "params_without_gate_tables": model.num_params(False),
        "kv_elements_per_token": run.model.kv_elements_per_token(),
        **timings, "world_size": info.world_size, "device": device_label(info.device), "run_dir": str(run_dir),
        "peak_memory_bytes_per_rank": [int(v) for v in per_rank(peak_memory, info)],  # a collective: all ranks
        "peak_memory_measure": memory_measure,
        "peak_reserved_bytes_per_rank": [int(v) for v in per_rank(reserved, info)] if reserved is not None else None,
    }
    if info.is_main:
        atomic_write_json(summary_path, summary)
        plot = plot_loss_curve(Path(run_dir) / "metrics.jsonl", Path(run_dir) / "loss.png",
                               f"{run.name} ({run.model.variant_name()})", data_meta["val_unigram_cross_entropy"])
        if val_loss is not None:
            say(f"final validation loss {val_loss:.4f} nats/token (perplexity {summary['final_val_ppl']:.1f}); "
                f"unigram baseline {data_meta['val_unigram_cross_entropy']:.4f} "
                f"(train-token entropy {data_meta['train_unigram_entropy']:.4f})")
        speed = (f"median step {summary['median_step_s']:.3f}s, {summary['tokens_per_s']:,.0f} tokens/s"
                 if step_times else f"no step to train: the run is at step {step}")
        memory = f"; peak memory {peak_memory / 1e9:.2f} GB by {memory_measure}"
        memory += f", {reserved / 1e9:.2f} GB reserved" if reserved is not None else ""
        say(speed + (f", MFU {100 * summary['mfu']:.1f}%" if step_times and summary["mfu"] else "") + memory
            + (f"; loss curve {plot}" if plot else "") + f"; run directory {run_dir}")
    return summary

