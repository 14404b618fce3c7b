"""The inputs-and-outcomes table of docs/reliability.md: each input run for real, on CPU with a tiny config.

    python experiments/reliability.py --work /tmp/egmla-reliability    # runs every input (~5 min on 2 cores)
    python experiments/reliability.py --render                         # only rewrites the table from the JSON

Every input is an `egmla` command (or, for the transformers / lm-eval side, a few lines of Python) in a
fresh process. Its outcome is read from what happened, not typed in: "right result" (exit 0 and the check
of the result passes: nothing lost, nothing silently wrong), "one line" (exit 2, one error line, no
traceback), or WRONG (a traceback, a hang, a failed check). The record is experiments/results/reliability.json;
the table between the markers in docs/reliability.md is generated from it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.train.helpers import write_config  # noqa: E402  (the tests' tiny config: 2 layers, d_model 64)

RECORD = ROOT / "experiments" / "results" / "reliability.json"
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- inputs:begin (experiments/reliability.py --render) -->", "<!-- inputs:end -->"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMINGS = ("median_step_s", "tokens_per_s", "train_wall_s")


class Inputs:
    """Runs the inputs in `work`, appending one record per input."""

    def __init__(self, work: Path):
        self.work, self.records = work, []
        self.cache = work / "cache"

    # ---- running one input ------------------------------------------------------------------
    def command(self, group: str, label: str, argv: list[str], expect: str, check=None, cwd=None, env=None,
                prefix: str = "", timeout: float = 300) -> subprocess.CompletedProcess | None:
        """Run `egmla ARGV` (or `python -c` when argv[0] == "-c"); `check(result)` returns a note, or raises
        AssertionError when the result is wrong (something lost, or silently wrong)."""
        argv_full = [sys.executable, *(argv if argv[0] == "-c" else ["-m", "egmla", *argv])]
        if prefix:  # e.g. a file-size limit, through the shell
            argv_full = ["bash", "-c", prefix + ' exec "$@"', "bash", *argv_full]
        started = time.perf_counter()
        try:
            result = subprocess.run(argv_full, cwd=cwd or self.work, env={**ENV, **(env or {})}, capture_output=True,
                                    text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.record(group, label, expect, "WRONG: hang", f"no answer in {timeout:.0f} s", timeout)
            return None
        self.judge(group, label, expect, result, time.perf_counter() - started, check)
        return result

    def judge(self, group, label, expect, result, seconds, check) -> None:
        errors = [line for line in result.stderr.splitlines() if ": error: " in line or line.startswith("ValueError")]
        if "Traceback" in result.stderr:
            outcome, detail = "WRONG: traceback", result.stderr.strip().splitlines()[-1]
        elif result.returncode == 0:
            outcome, detail = "right result", ""
        elif len(errors) == 1:
            outcome, detail = "one line", errors[0]
        else:
            outcome, detail = f"WRONG: exit {result.returncode}", result.stderr.strip()[-300:]
        if check is not None and not outcome.startswith("WRONG"):
            try:
                note = check(result)
                detail = "; ".join(filter(None, [detail, note]))
            except AssertionError as err:
                outcome, detail = "WRONG: check failed", str(err)
        if not outcome.startswith("WRONG") and outcome != ("right result" if expect == "ok" else "one line"):
            outcome = f"WRONG: expected {'success' if expect == 'ok' else 'an error'}, got {outcome}"
        self.record(group, label, expect, outcome, detail, seconds)

    def record(self, group, label, expect, outcome, detail, seconds) -> None:
        entry = {"group": group, "input": label, "expect": expect, "outcome": outcome, "detail": detail,
                 "seconds": round(seconds, 1)}
        self.records.append(entry)
        print(f"[{len(self.records):2d}] {outcome:<16} {seconds:5.1f}s  {label}: {detail[:150]}", flush=True)

    # ---- fixtures ----------------------------------------------------------------------------
    def config(self, name: str, **sections) -> Path:
        return write_config(self.work / f"{name}.toml", self.cache, **sections)

    def copy_run(self, name: str) -> Path:
        target = self.work / name
        shutil.copytree(self.base, target, ignore=shutil.ignore_patterns(".lock"))
        return target

    def train(self, config: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "egmla", "train", "--config", str(config), "--run-dir",
                                 str(run_dir), "--no-progress", *extra], cwd=self.work, env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_until(predicate, process, timeout=180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the background trainer ended or stalled: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)


def steps_in(run_dir: Path) -> int:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    return max([json.loads(line)["step"] for line in lines if '"kind": "train"' in line] or [0])


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text(), parse_constant=lambda c: float(c))


class NotAnOptimizerState:
    """Pickled into optimizer.pt: an object torch.load(weights_only=True) refuses."""


def warned(text: str, note: str):
    """A check: the warning naming the skipped checkpoint was printed."""
    def check(result):
        assert text in result.stderr, f"no warning {text!r}"
        return note
    return check


def nothing_at(path: Path) -> None:
    assert not path.exists(), f"{path.name} was written"


def never_suggests_unpickling(result) -> None:
    assert "weights_only=False" not in result.stdout + result.stderr, "suggests weights_only=False"


def corrupt(path: Path) -> None:
    """Change the last 4 bytes: same size, so only a checksum tells."""
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(4 - i for i in range(4))
    path.write_bytes(bytes(data))


def rewrite_manifest(folder: Path, **extra_entries) -> None:
    from egmla.runs import write_manifest

    write_manifest(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"].update(extra_entries)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def bad_config_values(inputs: Inputs) -> None:
    for override in ("train.steps=2.5", "train.keep_checkpoints=1.5", "train.steps=abc", 'train.lr="fast"',
                     "model.d_model=64.5", "model.init_std=-1", "train.batch_size=8.0", "train.steps.x=5",
                     "train.tensorboard=maybe", "train.compile=2", "model.kv_lora_rank=512", "train.grad_clip=-1",
                     "train.weight_decay=-5", "model.norm_eps=0", "model.n_layers=2.5"):
        inputs.command("config value", f"egmla train --set {override}", ["train", "--dry-run", "--set", override],
                       "error")
    (inputs.work / "extends-missing.toml").write_text('extends = "base/nowhere.toml"\n')
    inputs.command("config value", "--config FILE whose `extends` names a missing file",
                   ["train", "--dry-run", "--config", str(inputs.work / "extends-missing.toml")], "error")
    inputs.command("config value", "--config configs/egmla-kv64.toml (extends configs/base/paper-base.toml)",
                   ["train", "--dry-run", "--config", str(ROOT / "configs" / "egmla-kv64.toml")], "ok")


def run_directories(inputs: Inputs) -> None:
    work = inputs.work
    base = inputs.base
    inputs.command("run directory", "egmla train (tiny config, 12 steps, checkpoints at 4, 8, 12)",
                   ["train", "--config", str(inputs.config("base")), "--run-dir", str(base), "--no-progress"], "ok",
                   check=lambda result: f"summary.json median step {summary(base)['median_step_s']:.3f} s")

    # two trainers on one --run-dir, and a concurrent resume while the first holds it
    shared = work / "shared"
    first = inputs.train(inputs.config("long", train=dict(steps=400, checkpoint_every=0, eval_every=0)), shared)
    wait_until(lambda: steps_in(shared) > 0, first)
    holder = f"pid {first.pid} on host {socket.gethostname()}"

    def names_holder(result):
        assert holder in result.stderr, "the error does not name the holder"
    for label, argv in (("a second `egmla train --run-dir DIR` (another seed) while the first trains",
                         ["train", "--config", str(inputs.config("seed7", train=dict(steps=4, seed=7))), "--run-dir",
                          str(shared), "--no-progress"]),
                        ("`egmla train --resume DIR` while the first trains", ["train", "--resume", str(shared),
                                                                                 "--no-progress"])):
        inputs.command("run directory", label, argv, "error", check=names_holder)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    seed = json.loads((shared / "config.json").read_text())["train"]["seed"]
    inputs.record("run directory", "... the first trainer, then stopped with Ctrl-C", "ok",
                  "right result" if first.returncode == 0 and seed == 0 else "WRONG: check failed",
                  f"exit {first.returncode}; its config (seed {seed}), metrics and checkpoint are intact", 0)

    killed = work / "killed"
    process = inputs.train(inputs.config("slow", train=dict(steps=60, checkpoint_every=10, eval_every=30)), killed)
    wait_until(lambda: (killed / "checkpoints" / "step_00000020" / "manifest.json").is_file(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()

    def resumed_to_60(result):
        assert steps_in(killed) == 60, f"metrics end at step {steps_in(killed)}"
        return "the lock of the killed trainer was not obeyed; 60 steps"

    inputs.command("run directory", "kill -9 at step >= 20, then `egmla train --resume DIR`",
                   ["train", "--resume", str(killed), "--no-progress"], "ok", check=resumed_to_60)
    (work / "a-file").write_text("x")
    inputs.command("run directory", "--run-dir FILE (a file, not a folder)",
                   ["train", "--config", str(inputs.config("base")), "--run-dir", str(work / "a-file")], "error")
    inputs.command("run directory", "a new run into a --run-dir that holds checkpoints",
                   ["train", "--config", str(inputs.config("base")), "--run-dir", str(base)], "error")
    finished = inputs.copy_run("finished")
    before = summary(finished)

    def timings_kept(result):
        after = summary(finished)
        changed = [key for key in TIMINGS if after[key] != before[key] or not math.isfinite(after[key])]
        assert not changed, f"summary.json changed {changed}: {[after[k] for k in changed]}"
        return "summary.json timings kept (no NaN)"

    inputs.command("run directory", "`egmla train --resume DIR` of a finished run",
                   ["train", "--resume", str(finished), "--no-progress"], "ok", check=timings_kept)
    inputs.command("run directory", "`--resume DIR --set train.steps=8` (fewer steps than the checkpoint's 12)",
                   ["train", "--resume", str(finished), "--no-progress", "--set", "train.steps=8"], "ok",
                   check=timings_kept)
    home = work / "home"
    (home / "runs").mkdir(parents=True)
    (home / "runs" / "latest").symlink_to(base)

    def latest_kept(result):
        assert os.readlink(home / "runs" / "latest") == str(base), "runs/latest moved"
        assert [p.name for p in (home / "runs").iterdir()] == ["latest"], "a run folder was left behind"
        return "runs/latest unchanged, no run folder left"

    inputs.command("run directory", "`egmla train --set model.n_layers=2.5` with runs/latest pointing at a good run",
                   ["train", "--set", "model.n_layers=2.5"], "error", cwd=home, check=latest_kept)
    (work / "latin1.txt").write_bytes("Café\n".encode("latin-1"))
    inputs.command("run directory", "a run that fails before its first checkpoint (a non-UTF-8 corpus), runs/latest set",
                   ["train", "--config", str(inputs.config("base")), "--set", f"data.corpus={work / 'latin1.txt'}"],
                   "error", cwd=home, check=latest_kept)


def loading(inputs: Inputs) -> None:
    work, prompt = inputs.work, ["--prompt", "To be", "--max-new-tokens", "8"]
    inputs.command("loading", "egmla generate --run DIR", ["generate", "--run", str(inputs.base), *prompt], "ok")
    named = inputs.copy_run("named-corrupt")
    corrupt(named / "checkpoints" / "step_00000012" / "model.safetensors")
    for command in ("generate", "export"):
        argv = [command, "--run", str(named), "--checkpoint", str(named / "checkpoints" / "step_00000012")]
        argv += prompt if command == "generate" else ["--to", "hf", str(work / "export-corrupt")]
        inputs.command("loading", f"egmla {command} --checkpoint STEP (a corrupted weight, same size)", argv, "error",
                       check=lambda result: nothing_at(work / "export-corrupt"))
    for command in ("generate", "export"):
        argv = [command, "--run", str(named)] + (prompt if command == "generate" else ["--to", "hf", str(work / "export-fb")])
        inputs.command("loading", f"egmla {command} with the newest checkpoint corrupted", argv, "ok",
                       check=warned("step_00000012 is unusable", "fell back to step 8 with a warning"))
    inputs.command("loading", "`egmla train --resume DIR` with the newest checkpoint corrupted",
                   ["train", "--resume", str(named), "--no-progress"], "ok")
    shaped = inputs.copy_run("wrong-shape")
    _write_wrong_shape(shaped / "checkpoints" / "step_00000012")
    for command in ("generate", "export"):
        argv = [command, "--run", str(shaped)] + (prompt if command == "generate" else ["--to", "hf", str(work / "export-shape")])
        inputs.command("loading", f"egmla {command} with a wrong-shaped newest checkpoint (checksums agree)", argv, "ok",
                       check=warned("does not load", "fell back to step 8 with a warning"))
    for entry in ("../../config.json", "/etc/hostname"):
        run = inputs.copy_run(f"manifest-{len(entry)}")
        rewrite_manifest(run / "checkpoints" / "step_00000012", **{entry: "0" * 64})
        inputs.command("loading", f"generate with manifest.json naming {entry!r}", ["generate", "--run", str(run), *prompt],
                       "ok", check=warned("not a file of this folder", "refused unread; fell back to step 8"))
    tokenizer_run = inputs.copy_run("other-tokenizer")
    from tests.infer.helpers import train_tokenizer
    train_tokenizer(320).save(str(tokenizer_run / "tokenizer.json"))
    inputs.command("loading", "egmla generate with another run's tokenizer.json",
                   ["generate", "--run", str(tokenizer_run), *prompt], "error")
    tampered = inputs.copy_run("tampered-config")
    meta = json.loads((tampered / "config.json").read_text())
    meta["model"]["gate_op"] = "add"
    (tampered / "config.json").write_text(json.dumps(meta))
    inputs.command("loading", "egmla generate with config.json's gate_op changed (no shape changes)",
                   ["generate", "--run", str(tampered), *prompt], "error")


def _write_wrong_shape(folder: Path) -> None:
    """Weights of another shape (d_model 32), without a recorded config, under a manifest that agrees."""
    from safetensors.torch import save_file

    from egmla.config import preset
    from egmla.model import Transformer

    model = Transformer(preset("tiny", vocab_size=320, n_layers=2, d_model=32, n_heads=2, qk_nope_head_dim=16,
                               qk_rope_head_dim=16, v_head_dim=16, kv_lora_rank=16, gate_dim=32, max_seq_len=64))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "output.weight"},
              str(folder / "model.safetensors"))
    rewrite_manifest(folder)


HF_SNIPPET = """
import json, shutil, sys
import egmla.hf
from transformers import AutoModelForCausalLM
folder, field, value = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
config = json.loads(open(folder + "/config.json").read())
open(folder + "/config.json", "w").write(json.dumps({**config, field: value}))
try:
    AutoModelForCausalLM.from_pretrained(folder)
except ValueError as err:
    print(f"ValueError: {err}", file=sys.stderr); sys.exit(2)
"""
LM_EVAL_SNIPPET = """
import sys
from egmla.hf.lm_eval_model import EgmlaLM
try:
    EgmlaLM(run=sys.argv[1], device="cpu")
except ValueError as err:
    print(f"ValueError: {err}", file=sys.stderr); sys.exit(2)
"""


def transformers_side(inputs: Inputs) -> None:
    exported = inputs.work / "hf-export"
    inputs.command("transformers", "egmla export --run DIR --to hf OUT",
                   ["export", "--run", str(inputs.base), "--to", "hf", str(exported)], "ok")
    for field, value in (("gate_op", "add"), ("rope_theta", 500.0), ("gate_norm", "rmsnorm"),
                         ("num_hidden_layers", 1)):
        copy = shutil.copytree(exported, inputs.work / f"hf-{field}")
        inputs.command("transformers", f"AutoModelForCausalLM.from_pretrained(OUT) with config.json {field}={value!r}",
                       ["-c", HF_SNIPPET, str(copy), field, json.dumps(value)], "error")
    broken = inputs.copy_run("lm-eval-corrupt")
    for folder in (broken / "checkpoints").iterdir():
        corrupt(folder / "model.safetensors")
    inputs.command("transformers", "lm-eval EgmlaLM(run=DIR) with every checkpoint corrupted",
                   ["-c", LM_EVAL_SNIPPET, str(broken)], "error")


def failures(inputs: Inputs) -> None:
    work = inputs.work
    full = work / "disk-full"

    def no_temp_left(result):
        left = [p.name for p in (full / "checkpoints").iterdir()] if (full / "checkpoints").is_dir() else []
        assert not any(name.startswith(".tmp") for name in left), f"left behind: {left}"
        return "no .tmp-step_* left"

    inputs.command("I/O", "a disk that fills at the first checkpoint (ulimit -f 200 KB: a real EFBIG)",
                   ["train", "--config", str(inputs.config("base")), "--run-dir", str(full), "--no-progress"], "error",
                   prefix="ulimit -f 200;", check=no_temp_left)
    import torch

    for which in ("newest", "every"):
        run = inputs.copy_run(f"optimizer-{which}")
        folders = sorted((run / "checkpoints").iterdir())
        for folder in folders[-1:] if which == "newest" else folders:
            torch.save(NotAnOptimizerState(), folder / "optimizer.pt")
            rewrite_manifest(folder)
        inputs.command("I/O", f"--resume with {which} optimizer.pt not loadable (a pickled object, checksums agree)",
                       ["train", "--resume", str(run), "--no-progress", "--set", "train.steps=14"],
                       "ok" if which == "newest" else "error", check=never_suggests_unpickling)
    for label, env in (("no network", {}), ("HF_HUB_OFFLINE=1", {"HF_HUB_OFFLINE": "1"})):
        inputs.command("I/O", f"data.corpus=hf:HuggingFaceFW/fineweb-edu, {label}",
                       ["train", "--set", "data.corpus=hf:HuggingFaceFW/fineweb-edu", "--set",
                        f"data.cache_dir={work / 'hub-cache'}", "--run-dir", str(work / "hub-run")], "error", env=env)
    files = {"random.bin.txt": os.urandom(4096), "latin1.txt": "Café au lait\n".encode("latin-1"),
             "rows.jsonl": b'{"text": "fine"}\nnot json\n', "table.parquet": b"not a parquet file"}
    for name, content in files.items():
        folder = work / f"corpus-{name.split('.')[0]}"
        folder.mkdir()
        (folder / name).write_bytes(content)
        inputs.command("I/O", f"data.corpus=FOLDER holding {name} ({'binary' if 'random' in name else 'bad'})",
                       ["train", "--set", f"data.corpus={folder}", "--set", f"data.cache_dir={work / 'file-cache'}",
                        "--run-dir", str(work / f"run-{name}")], "error")


def render(records: list[dict]) -> str:
    lines = ["| # | area | input | outcome | what the user sees / what was checked | s |",
             "|---|---|---|---|---|---|"]
    for number, r in enumerate(records, 1):
        detail = r["detail"].replace("|", "\\|")
        lines.append(f"| {number} | {r['group']} | {r['input'].replace('|', '/')} | {r['outcome']} | {detail} | "
                     f"{r['seconds']} |")
    wrong = sum(r["outcome"].startswith("WRONG") for r in records)
    counts = {kind: sum(r["outcome"] == kind for r in records) for kind in ("right result", "one line")}
    lines.append(f"\n{len(records)} inputs: {counts['right result']} right results, {counts['one line']} one-line "
                 f"errors, {wrong} wrong.")
    return "\n".join(lines)


def write_doc(records: list[dict]) -> None:
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    DOC.write_text(head + BEGIN + "\n" + render(records) + "\n" + END + rest.split(END, 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="reliability-work", help="scratch folder (removed first)")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/reliability.md's table from the JSON")
    args = parser.parse_args()
    if not args.render:
        work = Path(args.work).resolve()
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        inputs = Inputs(work)
        inputs.base = work / "base"
        for group in (bad_config_values, run_directories, loading, transformers_side, failures):
            group(inputs)
        for r in inputs.records:
            r["detail"] = r["detail"].replace(str(work), "WORK").replace(str(ROOT), "REPO")
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(json.dumps(inputs.records, indent=1) + "\n")
    write_doc(json.loads(RECORD.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
