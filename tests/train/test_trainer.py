"""The trainer in-process: run-directory contents, determinism, accumulation, divergence, bad inputs."""
import json
import math

import pytest
import torch

import egmla.train.loss
import egmla.train.trainer as trainer
from egmla.data.loader import WindowedTokens
from egmla.data import prepare_data
from egmla.data.tokenizer import train_tokenizer
from egmla.runs import list_checkpoints, load_model, load_tokenizer, verify_checkpoint
from egmla.train.config import RunConfig
from egmla.train.trainer import TrainingDiverged, train
from tests.train.helpers import run_config, train_losses

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    lines = []
    summary = train(run_config(cache_dir, train=dict(tensorboard=True, keep_checkpoints=2)), run_dir, progress=False,
                    log=lines.append)
    summary["printed"] = lines  # what the run said, for the tests below
    return run_dir, summary


def test_run_directory_holds_everything(finished_run):
    run_dir, summary = finished_run
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["model"]["attention"] == "eg-mla"
    assert RunConfig.from_dict(meta).to_dict() == {k: meta[k] for k in ("name", "model", "train", "data")}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in records if r["kind"] == "val"] == [6, 12]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records if r["kind"] == "train")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000008", "step_00000012"]  # keep 2
    for folder in list_checkpoints(run_dir):
        assert verify_checkpoint(folder) is None
        state = json.loads((folder / "state.json").read_text())
        assert state["sequences_consumed"] == state["step"] * 8 and len(state["rng"]["torch"]) > 100
    assert summary["final_val_loss"] == records[-1]["val_loss"]
    assert summary["params"] > summary["params_without_gate_tables"]
    assert summary["peak_memory_measure"] == "peak RSS (ru_maxrss)" and summary["peak_memory_bytes_per_rank"][0] > 0
    assert summary["peak_reserved_bytes_per_rank"] is None  # a CUDA allocator's figure: none on the CPU
    last = summary["printed"][-1]
    assert f"peak memory {summary['peak_memory_bytes_per_rank'][0] / 1e9:.2f} GB by peak RSS (ru_maxrss)" in last
    assert "reserved" not in last


def test_saved_model_and_tokenizer_reload(finished_run, cache_dir):
    """egmla.runs.load_model reads the trainer's checkpoint: its validation loss is the logged one."""
    run_dir, summary = finished_run
    model, meta = load_model(run_dir)
    tokenizer = load_tokenizer(run_dir)
    assert tokenizer.get_vocab_size() <= model.config.vocab_size
    assert tokenizer.decode(tokenizer.encode("To be, or not to be").ids) == "To be, or not to be"
    # the run's own shards (cached: no rebuild); the cache holds other tests' corpora too, so not its first folder
    _, shards = prepare_data(run_config(cache_dir).data, model.config.vocab_size, tokenizer, progress=False,
                             log=lambda *_: None)
    windows = WindowedTokens(shards.tokens("val"), 32, "validation")
    inputs, targets = windows.batch(range(16))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    assert float(loss) == pytest.approx(summary["final_val_loss"], rel=1e-5)


def test_same_seed_same_losses_other_seed_other_losses(tmp_path, cache_dir, finished_run):
    run = run_config(cache_dir, train=dict(steps=12, checkpoint_every=0))
    train(run, tmp_path / "again", **QUIET)
    assert train_losses(tmp_path / "again") == train_losses(finished_run[0])
    train(run_config(cache_dir, train=dict(steps=3, seed=1)), tmp_path / "seed1", **QUIET)
    assert train_losses(tmp_path / "seed1")[1] != train_losses(finished_run[0])[1]


def test_memory_savers_train_the_same_model(tmp_path, cache_dir, finished_run, monkeypatch):
    """train.activation_checkpointing and train.loss_chunk_tokens change what is kept for the backward, not the
    math: every step's loss and the final validation loss (also chunked) equal the plain run's to rounding. (What
    they keep: tests/train/test_loss.py, test_recompute.py.)"""
    recomputed, chunked = [], []
    real_blocks, real_loss = trainer.recompute_blocks, egmla.train.loss.linear_cross_entropy
    monkeypatch.setattr(trainer, "recompute_blocks", lambda model, every: recomputed.extend(real_blocks(model, every)))
    monkeypatch.setattr(egmla.train.loss, "linear_cross_entropy",
                        lambda *args, **kwargs: chunked.append(args[3]) or real_loss(*args, **kwargs))
    summary = train(run_config(cache_dir, train=dict(steps=12, checkpoint_every=0, activation_checkpointing=1,
                                                     loss_chunk_tokens=40)), tmp_path / "lean", **QUIET)
    plain = train_losses(finished_run[0])
    lean = train_losses(tmp_path / "lean")
    assert sorted(lean) == sorted(plain) == list(range(1, 13))
    for step in plain:
        assert lean[step] == pytest.approx(plain[step], rel=1e-5), step
    assert summary["final_val_loss"] == pytest.approx(finished_run[1]["final_val_loss"], rel=1e-5)
    assert recomputed == [0, 1] and set(chunked) == {40}  # both blocks; training and validation chunked


def test_gradient_accumulation_matches_the_full_batch(tmp_path, cache_dir, finished_run):
    train(run_config(cache_dir, train=dict(steps=4, micro_batch_size=2, checkpoint_every=0)), tmp_path / "acc", **QUIET)
    full = train_losses(finished_run[0])
    # same schedule only for the step-1 lr (warmup); compare the steps whose inputs agree: 1 and 2
    accumulated = train_losses(tmp_path / "acc")
    for step in (1, 2):
        assert accumulated[step] == pytest.approx(full[step], rel=1e-5)


def test_non_finite_loss_stops_naming_the_step_and_keeps_checkpoints(tmp_path, cache_dir, monkeypatch):
    real_loss = trainer.token_loss
    calls = {"n": 0}

    def loss_that_explodes(model, inputs, targets, reduction="mean", **options):
        loss = real_loss(model, inputs, targets, reduction, **options)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 5 and model.training else loss

    monkeypatch.setattr(trainer, "token_loss", loss_that_explodes)
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="step 5: non-finite loss"):
        train(run_config(cache_dir, train=dict(checkpoint_every=2, eval_every=0)), run_dir, **QUIET)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000002", "step_00000004"]
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(run_dir))


def test_resume_refuses_a_different_tokenizer_and_loses_nothing(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run = run_config(cache_dir, train=dict(steps=4))
    train(run, run_dir, **QUIET)
    other = train_tokenizer(["a completely different text, tokenized differently " * 50], 300)
    (run_dir / "tokenizer.json").write_text(other.to_str())
    with pytest.raises(ValueError, match="tokenizer.json differs"):
        train(run, run_dir, resume=True, **QUIET)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004"]
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(run_dir))


def test_resume_with_an_unreadable_tokenizer_json_is_one_line(tmp_path):
    """The tokenizers library raises a bare Exception naming no file: it reached the user as a traceback."""
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(ValueError, match=r"tokenizer.json is not a readable tokenizer \(.+\); restore the run's own "
                                         r"tokenizer.json from a copy") as raised:
        trainer.load_run_tokenizer(tmp_path)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("sections, message", [
    (dict(train=dict(batch_size=100_000)), "train.batch_size=100000: the training split has only"),
    (dict(train=dict(micro_batch_size=3)), "train.micro_batch_size=3: must divide the per-process batch 8"),
    (dict(train=dict(seq_len=128)), "train.seq_len=128: exceeds model.max_seq_len=64"),
    (dict(data=dict(corpus="/no/such/dir/*.txt")), "does not exist and matches no file"),
    (dict(train=dict(setps=3)), "train.setps: unknown config key; did you mean 'steps'"),
    (dict(trian=dict(steps=3)), "trian: unknown config section; did you mean 'train'"),
    (dict(model=dict(kv_lora_rnk=8)), "model.kv_lora_rnk: unknown config key; did you mean 'kv_lora_rank'"),
])
def test_bad_input_is_a_clear_error(tmp_path, cache_dir, sections, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        train(run_config(cache_dir, **sections), tmp_path / "bad", **QUIET)


def test_empty_data_file_is_a_clear_error(tmp_path, cache_dir):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no training text|holds no text"):
        train(run_config(cache_dir, data=dict(corpus=str(tmp_path / "empty.txt"))), tmp_path / "bad", **QUIET)


def test_time_budgeted_run_sets_its_length_after_calibration(tmp_path, cache_dir):
    messages = []
    run = run_config(cache_dir, train=dict(steps=0, time_limit_s=4.0, warmup_steps=20, eval_every=0,
                                           checkpoint_every=0))
    summary = train(run, tmp_path / "budget", progress=False, log=messages.append)
    [note] = [m for m in messages if m.startswith("time budget")]
    planned = int(note.split("training for ")[1].split()[0])
    assert planned > 20 and summary["steps"] <= planned
    assert not any(m.startswith("warning: train.warmup_steps") for m in messages)  # the budget outlasts the warmup
    assert summary["stop_reason"] in (None, "time limit reached")  # a busy machine may hit the hard limit
    [folder] = list_checkpoints(tmp_path / "budget")
    assert json.loads((folder / "state.json").read_text())["total_steps"] == planned


def test_progress_bar_shows_the_evaluation_of_its_step(tmp_path, cache_dir, monkeypatch):
    """The bar's val= after an evaluation step is that step's printed validation loss (it once lagged one)."""
    import tqdm

    events = []

    class RecordingBar:
        def __init__(self, *args, **kwargs):
            self.total = kwargs.get("total")

        def update(self, count):
            pass

        def set_postfix(self, **values):
            events.append(("postfix", values["val"]))

        def write(self, text):
            events.append(("write", text))

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", RecordingBar)
    train(run_config(cache_dir, train=dict(checkpoint_every=0)), tmp_path / "bar", progress=True, log=lambda *_: None)
    notes = [i for i, (kind, _) in enumerate(events) if kind == "write"]
    assert len(notes) == 2 and events[0] == ("postfix", "-")  # evaluations at steps 6 and 12; none before step 6
    for index in notes:
        printed = float(events[index][1].split("val loss ")[1].split()[0])
        kind, shown = events[index + 1]
        assert kind == "postfix" and shown == f"{printed:.3f}"


def test_compile_mode_reaches_each_block_and_graph_modes_mark_each_step(tmp_path, cache_dir, monkeypatch):
    """train.compile_mode goes to every block's compile; with a CUDA-graph mode (reduce-overhead) every training
    micro-batch and every validation forward first marks a new step (stale graph outputs may be overwritten).
    Compilation is stubbed: the switch is what is tested here; its speed is a GPU measurement (egmla bench
    train --compile-mode)."""
    compiled, marks, blocks = [], [], []

    def compile_block(self, **kwargs):
        compiled.append(kwargs.get("mode"))
        blocks.append(self)

    def mark():  # before each micro-batch: the gradients are the trainer's own, never a graph's output
        marks.append(all(p.grad is not None for block in blocks for p in block.parameters()))

    monkeypatch.setattr(torch.nn.Module, "compile", compile_block)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", mark)
    monkeypatch.setattr(egmla.train.loss, "compiled_cross_entropy", lambda: egmla.train.loss.cross_entropy)
    run = run_config(cache_dir, train=dict(steps=3, micro_batch_size=4, compile=True, compile_mode="reduce-overhead",
                                           eval_every=0, eval_sequences=8, checkpoint_every=0))
    train(run, tmp_path / "graphs", **QUIET)
    assert compiled == ["reduce-overhead"] * 2  # TINY's two blocks
    assert len(marks) == 3 * 2 + 2  # 3 steps x 2 micro-batches, and 8 validation sequences in micro-batches of 4
    assert all(marks)  # own_gradients: autograd adds into them in place (pytorch/pytorch#169545)
    marks.clear()
    train(run_config(cache_dir, train=dict(steps=2, compile=True, eval_every=0, checkpoint_every=0)),
          tmp_path / "plain", **QUIET)
    assert compiled[2:] == ["default"] * 2 and not marks


def test_cuda_graph_modes_refuse_several_processes(tmp_path, cache_dir, monkeypatch):
    """CUDA-graph compile modes are for one process (untested with DDP/FSDP2): a clear error before anything is
    written."""
    from egmla.train.distributed import DistInfo

    monkeypatch.setattr(trainer, "init_distributed", lambda device: DistInfo(rank=0, world_size=2))
    run = run_config(cache_dir, train=dict(steps=1, warmup_steps=1, compile=True, compile_mode="reduce-overhead"))
    with pytest.raises(ValueError, match="compile_mode='reduce-overhead' with 2 processes.*compile_mode='default'"):
        train(run, tmp_path / "run", **QUIET)
    assert not (tmp_path / "run").exists()


def test_evaluate_puts_the_model_back_in_train_mode_when_it_raises():
    """A validation that failed (out of memory, say) left the model in eval mode, for a caller that goes on."""
    import contextlib

    import numpy as np

    from egmla.train.distributed import DistInfo

    class Failing(torch.nn.Module):
        def forward(self, inputs, **_):
            raise RuntimeError("out of memory")

    model, windows = Failing(), WindowedTokens(np.arange(200, dtype=np.int64) % 50, 8, "validation")
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.evaluate(model, windows, 4, 2, contextlib.nullcontext, DistInfo())
    assert model.training
