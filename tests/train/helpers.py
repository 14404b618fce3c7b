"""A tiny training config (2 layers, d_model 64, vocab 320, the embedded corpus capped at 300 KB) and
helpers that run `egmla train` in-process or as a real subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from egmla.configfile import merge
from egmla.train.config import RunConfig

TINY = {
    "name": "tiny-test",
    "model": dict(preset="tiny", vocab_size=320, n_layers=2, d_model=64, n_heads=2, qk_nope_head_dim=16,
                  qk_rope_head_dim=16, v_head_dim=16, kv_lora_rank=16, gate_dim=32, max_seq_len=64),
    "train": dict(steps=12, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=6, eval_sequences=16,
                  checkpoint_every=4, keep_checkpoints=3, log_every=2, tensorboard=False),
    "data": dict(corpus="embedded", max_bytes=300_000, val_fraction=0.1),
}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def write_config(path: Path, cache_dir: Path, **sections) -> Path:
    """TINY merged with {section: {key: value}} overrides, as a TOML file using cache_dir."""
    values = merge(TINY, sections)
    values["data"] = {**values["data"], "cache_dir": str(cache_dir)}
    lines = [f"name = {toml_value(values['name'])}"]
    for section in ("model", "train", "data"):
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values[section].items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_config(cache_dir: Path, **sections) -> RunConfig:
    values = merge(TINY, sections)
    values["data"] = {**values["data"], "cache_dir": str(cache_dir)}
    return RunConfig.from_dict(values)


def egmla_command(*args: str, torchrun: int = 0) -> list[str]:
    """`egmla train ARGS` as `python -m egmla.train ARGS` (same code, skips loading the other
    subcommands), optionally under torchrun with that many processes."""
    assert args[0] == "train"
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                "-m", "egmla.train", *args[1:]]
    return [sys.executable, "-m", "egmla.train", *args[1:]]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.pop("EGMLA_CACHE", None)
    env["OMP_NUM_THREADS"] = "1"  # the same thread count for every process count: comparable rounding
    return env


def run_egmla(*args: str, torchrun: int = 0, cwd: Path | None = None, timeout: float = 240,
              check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(egmla_command(*args, torchrun=torchrun), cwd=cwd, env=subprocess_env(),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"egmla {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def train_losses(run_dir: Path) -> dict[int, float]:
    """{step: training loss} from a run's metrics.jsonl."""
    losses = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            losses[record["step"]] = record["loss"]
    return losses


def start_training(config: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    """`egmla train --config CONFIG --run-dir RUN_DIR` as a background process (stdout and stderr together)."""
    return subprocess.Popen(egmla_command("train", "--config", str(config), "--run-dir", str(run_dir), "--no-progress",
                                          *extra), env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert process.poll() is None, f"training ended early:\n{process.stdout.read()}"
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the training subprocess")
