"""One device call on several GPUs (issues 10 and 20): DDP and FSDP2 in several settings, one GPU on the same
global batch, a checkpoint saved under several processes and resumed under 1, and a profile of DDP steps.

In one command it builds the python-source corpus and its tokenizer once (cache under --work), then, each with
`torchrun --standalone --nproc_per_node=N -m egmla.train --config configs/egmla-kv64.toml` for --steps steps
into its own run directory under --work, in this order (a run that would not fit the rest of --call-budget-s,
judged from the runs before it, is skipped and reported as such; one still going at RUN_LIMIT_FACTOR times
that estimate, as a hung collective would be, is stopped with its workers so that the rest can run):
  1. `single`: 1 process, the config as it is (the reference for scaling efficiency and losses);
  2. the first of --variants at each process count of --nproc (the first count's run keeps a checkpoint at
     steps/2);
  3. with --profile, `profile`: the first variant at the first count for PROFILE_WARMUP_STEPS + --profile-steps
     steps, the last --profile-steps of them under torch.profiler (train.profile_steps); its step timeline per
     rank (GPU idle time by what the host was doing, NCCL time not overlapped by compute, data loading) and
     rank 0's costliest kernels go to profile.md (egmla.bench.profiling);
  4. `resume`: a copy of run 2 resumed from its steps/2 checkpoint under 1 process;
  5. every other variant at every count.
A variant is a named set of train settings (VARIANTS, or NAME:KEY=VALUE,... on the command line), e.g.
`ddp-static` = DDP with gradient_as_bucket_view and static_graph. Per run it reports tokens/s total and per
GPU, MFU, peak memory per GPU, scaling efficiency against `single` (targets: DDP >= 90%, FSDP2 >= 80%), the
drift (median step time of the last DRIFT_STEPS steps against the first DRIFT_STEPS after the warm-up steps;
target within 5%) and the largest relative difference of its first COMPARED_STEPS losses from `single`'s.
NVLink multicast stays off in every child (NCCL_NVLS_ENABLE=0 and friends). At most 8 files go to --out (a
device call brings back no more): multigpu.json (everything), multigpu.md (the tables for docs/benchmarks.md),
multigpu.log (the children's output), metrics.jsonl (every run's training loss and step time per step),
multigpu.png (drawn from it) and, with --profile, profile.md. Checkpoints (GBs) stay in --work.

    egmla bench multigpu --profile          # 2 GPUs, and 4 where there are 4 (about 9.5 minutes with the budget)
    egmla bench multigpu --device cpu --config configs/tiny.toml --steps 8 --max-bytes 300000
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/, and the children's PYTHONPATH
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
COMPARED_STEPS = 50  # the first N training losses of every run are compared with the 1-process run's
TARGETS = {"ddp": 0.90, "fsdp": 0.80}  # issue 20: scaling efficiency of at least 90% (DDP) and 80% (FSDP2)
DRIFT_STEPS = 50  # drift: median step time of the last N steps against the first N after the warm-up steps
WARMUP_STEPS = 3  # left out of the drift's first window, as summary.json's median leaves them out (compilation)
DRIFT_LIMIT = 0.05  # issue 20: the last steps within 5% of the first
PROFILE_WARMUP_STEPS = 30  # unprofiled steps before the profiled ones: past step 20, where issue 10's DDP drifted
PROFILE_SUMMARY_S = 30  # allowance for summarising a profile, in the time a run is expected to take
REPORT_RESERVE_S = 15  # left at the end of the call budget for the report
STOP_GRACE_S = 10.0  # a stopped run: seconds from SIGTERM (torchrun stops its workers) to SIGKILL
RUN_LIMIT_FACTOR, RUN_LIMIT_MIN_S = 3.0, 120.0  # a run is stopped past 3x its expected time (a hung collective)
DEVICE_QUERY = ("import json, torch; ok = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
                "'gpus': torch.cuda.device_count() if ok else 0, 'name': torch.cuda.get_device_name(0) if ok "
                "else 'cpu'}))")
PLOTTED = ("kind", "step", "loss", "step_s")  # what metrics.jsonl in --out keeps of a run's training records
OUT_FILES = ("multigpu.json", "multigpu.md", "multigpu.log", "metrics.jsonl", "multigpu.png", "profile.md")

# Named variants: train settings over the config. Ordered by what issue 20 asks first; --variants picks and orders.
VARIANTS = {
    "ddp": {"parallel": "ddp"},  # the config as it is (issue 10's run)
    # static_graph needs one micro-batch per process (egmla.train.trainer.batch_layout: a torch bug under no_sync)
    "ddp-static": {"parallel": "ddp", "ddp_gradient_as_bucket_view": True, "ddp_static_graph": True,
                   "micro_batch_size": 0},
    "fsdp-bf16": {"parallel": "fsdp", "fsdp_param_dtype": "bf16", "fsdp_reduce_dtype": "fp32",
                  "fsdp_reshard_after_forward": False},
    "ddp-static-bf16": {"parallel": "ddp", "ddp_gradient_as_bucket_view": True, "ddp_static_graph": True,
                        "micro_batch_size": 0, "ddp_comm_hook": "bf16"},  # and gradients all-reduced in bf16
    "ddp-one-micro-batch": {"parallel": "ddp", "micro_batch_size": 0},  # ddp-static without the DDP settings
    "fsdp": {"parallel": "fsdp"},
    "ddp-bf16-hook": {"parallel": "ddp", "ddp_gradient_as_bucket_view": True, "ddp_comm_hook": "bf16"},
    "ddp-bucket-100": {"parallel": "ddp", "ddp_gradient_as_bucket_view": True, "ddp_bucket_cap_mb": 100.0},
    # the gate tables' row-sparse update (issue 19): a different optimizer, so no loss comparison with `single`
    "ddp-row-sparse": {"parallel": "ddp", "gate_table_update": "row-sparse"},
}
DEFAULT_VARIANTS = "ddp;ddp-static;fsdp-bf16;ddp-static-bf16;ddp-one-micro-batch;fsdp"
# Settings that change how a run is laid out over processes, not what it computes (beyond rounding): a run that
# sets only these is compared with the 1-process run. bf16 ones compare at bf16 rounding, also on the CPU.
LAYOUT_SETTINGS = re.compile(r"parallel|micro_batch_size|profile_steps|checkpoint_every|keep_checkpoints|(ddp|fsdp)_.*")
BF16_SETTINGS = {"ddp_comm_hook": "bf16", "fsdp_param_dtype": "bf16", "fsdp_reduce_dtype": "bf16"}
BF16_RTOL, FP32_RTOL = 1e-2, 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(ROOT / "configs" / "egmla-kv64.toml"),
                        help="training config (default: the repository's configs/egmla-kv64.toml)")
    parser.add_argument("--steps", type=int, default=150,
                        help="optimizer steps per run (>= 2; the resume check restarts at steps/2); 150 steps of "
                             "64x1024 tokens take about 1-1.5 min per run on H200s, compilation included")
    parser.add_argument("--nproc", default="auto",
                        help="process (GPU) counts of the multi-process runs, e.g. 2 or 2,4 (the first count also "
                             "gets the checkpoint and the profile); auto = 2, and 4 where 4 GPUs are visible (2 on "
                             "--device cpu); 1 = a dry run of the whole call on one GPU (every run has 1 process)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="the multi-process runs, in order, separated by ';': a name of VARIANTS ("
                             + ", ".join(VARIANTS) + ") or NAME:KEY=VALUE,... with train.KEY settings over the config "
                             "(e.g. 'mine:parallel=ddp,ddp_bucket_cap_mb=50'); the first is the one checkpointed "
                             "and profiled")
    parser.add_argument("--profile", action="store_true",
                        help=f"also a run of the first variant at the first count: {PROFILE_WARMUP_STEPS} steps, then "
                             f"--profile-steps under torch.profiler, summarised in profile.md")
    parser.add_argument("--profile-steps", type=int, default=20, help="profiled steps (--profile)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="train.device of every run; cpu runs gloo with one thread per process")
    parser.add_argument("--max-bytes", type=int, default=100_000_000,
                        help="data.max_bytes: corpus text to use (100 MB of Python source is ~27M tokens, "
                             "more than 150 steps x 64 x 1024 read)")
    parser.add_argument("--set", "--preset-override", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="config override for every run (after the script's own)")
    parser.add_argument("--loss-rtol", type=float, default=0.0,
                        help="largest relative loss difference that counts as agreement; 0 = 1e-2 on GPU (bf16 "
                             "rounding), 1e-4 on CPU (fp32; 1e-2 there too for a variant with a bf16 setting)")
    parser.add_argument("--work", default="/tmp/egmla-multigpu", help="run directories (checkpoints: GBs)")
    parser.add_argument("--cache-dir", default="", help="tokenizer and shard cache (empty: WORK/cache)")
    parser.add_argument("--out", default="bench-out/multigpu", help="results folder")
    parser.add_argument("--call-budget-s", type=float, default=570,
                        help="the whole call ends within this: a run still going then is stopped and reported")
    parser.add_argument("--plot-only", metavar="DIR", default="",
                        help="run nothing: redraw DIR/multigpu.png from DIR/metrics.jsonl (or issue 10's "
                             "metrics_*.jsonl files)")


def child_env(device: str) -> dict:
    env = {**os.environ, **MULTICAST_OFF}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    if device == "cpu":  # one thread per process in every run: comparable rounding, no oversubscription
        env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(nproc: int, *train_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "egmla.train", "--no-progress", *train_args]


class Jobs:
    """Runs the children one after another inside the call budget; their output goes to one log."""

    def __init__(self, log_path: Path, env: dict, deadline: float):
        self.log_path, self.env, self.deadline = log_path, env, deadline

    def run(self, name: str, command: list[str], expected_s: float = 30.0, limit_s: float | None = None) -> dict:
        """run_once, and once more where torchrun lost a race for its rendezvous port before anything trained
        (PORT_TAKEN: --standalone picks a free port that another process can take first); the result says so."""
        job = self.run_once(name, command, expected_s, limit_s)
        if job["status"].startswith("failed") and port_taken(job.get("output", "")):
            first = job
            job = self.run_once(name, command, expected_s, limit_s)
            job["retried"] = f"the first attempt {first['status']}: its rendezvous port was taken ({first['wall_s']:.0f}s)"
        return job

    def run_once(self, name: str, command: list[str], expected_s: float = 30.0, limit_s: float | None = None) -> dict:
        """Run `command`, unless less than expected_s (what the runs before it predict) is left; stop it at the
        call budget's end or after limit_s, whichever comes first (a hung run must not take the rest of the call)."""
        timeout = self.deadline - time.monotonic()
        if timeout < max(30.0, expected_s):
            return {"name": name, "command": shlex.join(command),
                    "status": f"skipped: call budget spent ({timeout:.0f}s left, {expected_s:.0f}s expected)"}
        limited = limit_s is not None and limit_s < timeout
        timeout = limit_s if limited else timeout
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {name}: {shlex.join(command)}\n")
            log.flush()
            start_offset = log.tell()
            started = time.monotonic()
            # a new session, so a timeout can stop torchrun (its process group) without this process (stop)
            proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                status = "ok" if proc.wait(timeout=timeout) == 0 else f"failed (exit status {proc.returncode})"
            except subprocess.TimeoutExpired:
                stop(proc)
                status = (f"stopped after {timeout:.0f}s: over its limit ({expected_s:.0f}s expected; hung?)"
                          if limited else f"stopped after {timeout:.0f}s: call budget spent")
        wall_s = time.monotonic() - started
        with open(self.log_path, errors="replace") as log:  # a stray byte must not cost the report
            log.seek(start_offset)
            output = log.read()
        lines = output.splitlines()
        print(f"== {name}: {status} in {wall_s:.0f}s\n" + "\n".join(lines[-8 if status == "ok" else -40:]),
              flush=True)
        return {"name": name, "command": shlex.join(command), "status": status, "wall_s": wall_s,
                "output": output}


# torch.distributed's error when a TCP store cannot listen on its port (torch.distributed.DistNetworkError)
PORT_TAKEN = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)
TRAINED = re.compile(r"^step \d+:", re.MULTILINE)  # the trainer's per-step log line


def port_taken(output: str) -> bool:
    """Whether a run failed because its rendezvous port was taken, before any step ran."""
    return bool(PORT_TAKEN.search(output)) and not TRAINED.search(output)


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc; none elsewhere)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = Path("/proc", entry, "stat").read_text()
                    children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        found = children.get(todo.pop(), [])
        out += found
        todo += found
    return out


def stop(proc: subprocess.Popen) -> None:
    """Stop a torchrun started in a session of its own: SIGTERM to its process group (torchrun passes it on to
    its workers), then, after STOP_GRACE_S, SIGKILL to it and to every process that was below it. torchrun
    starts each worker in a session of its own, so killing torchrun's group alone would leave the workers
    running, holding their GPUs through the runs after it."""
    tree = descendants(proc.pid)  # now: once torchrun is gone, its workers no longer name it as their parent
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
        return  # torchrun ends only after its workers have
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *tree]:
        for kill in (os.killpg, os.kill):  # each worker leads a group of its own (its compile workers)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)
    proc.wait()


def run_limit_s(results: dict, expected_s: float) -> float | None:
    """How long a run may take before it is stopped as hung: RUN_LIMIT_FACTOR x its expected time, at least
    RUN_LIMIT_MIN_S; None (the call budget only) while no run has finished to predict it from."""
    if not any(r.get("median_step_s") and r.get("wall_s") for r in results.values()):
        return None
    return max(RUN_LIMIT_MIN_S, RUN_LIMIT_FACTOR * expected_s)


def expected_wall_s(results: dict, steps: int, processes: int) -> float:
    """A run's wall time as the finished runs predict it: their median fixed cost (start, compilation, data,
    checkpoints: wall time less the steps at their median) plus `steps` at the slowest median step of runs with
    as many processes (of any run when none has), 10% over. 30 s before any run has finished."""
    done = [r for r in results.values() if r.get("median_step_s") and r.get("wall_s")]
    if not done:
        return 30.0
    fixed = statistics.median(r["wall_s"] - r["trained_steps"] * r["median_step_s"] for r in done)
    alike = [r["median_step_s"] for r in done if r["processes"] == processes] or [r["median_step_s"] for r in done]
    return 1.1 * (fixed + steps * max(alike))


def train_records(run_dir: Path) -> list[dict]:
    from egmla.train.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    return [r for r in read_metrics(path) if r.get("kind") == "train"] if path.is_file() else []


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_records(run_dir)}


def max_relative_difference(losses: dict, reference: dict, steps) -> float | None:
    """max |loss - reference| / |reference| over `steps`; None when a step is missing from either run."""
    steps = list(steps)
    if not all(s in losses and s in reference for s in steps):
        return None
    return max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in steps)


def drift(step_times: dict[int, float], first_step: int = 1) -> dict | None:
    """Median step time of the last DRIFT_STEPS steps against the first DRIFT_STEPS after WARMUP_STEPS warm-up
    steps (fewer, as many as fit twice, in a short run); None when no step is left to compare."""
    timed = sorted((step, t) for step, t in step_times.items() if step >= first_step + WARMUP_STEPS)
    window = min(DRIFT_STEPS, len(timed) // 2)
    if window < 1:
        return None
    first, last = timed[:window], timed[-window:]
    ratio = statistics.median(t for _, t in last) / statistics.median(t for _, t in first)
    return {"steps": window, "first": [first[0][0], first[-1][0]], "last": [last[0][0], last[-1][0]],
            "first_median_s": statistics.median(t for _, t in first),
            "last_median_s": statistics.median(t for _, t in last), "ratio": ratio,
            "passed": abs(ratio - 1) <= DRIFT_LIMIT}


def run_result(job: dict, run_dir: Path, resumed_at: int = 0) -> dict:
    """Speed and memory of a finished run, from its summary.json, with its drift (of the steps after
    resumed_at: a resumed run's metrics begin with the copied run's steps)."""
    summary_path = run_dir / "summary.json"
    job = {k: v for k, v in job.items() if k != "output"} | {"run_dir": str(run_dir)}
    if job["status"] != "ok" or not summary_path.is_file():
        tail = {} if job["status"].startswith("skipped") else {"error_tail": job.get("output", "")[-3000:]}
        return job | tail
    summary = json.loads(summary_path.read_text())
    world = summary["world_size"]
    records = [r for r in train_records(run_dir) if r["step"] > resumed_at]
    return job | {
        "processes": world, "steps": summary["steps"], "median_step_s": summary["median_step_s"],
        "trained_steps": summary["steps"] - resumed_at,
        "tokens_per_s": summary["tokens_per_s"], "tokens_per_s_per_gpu": summary["tokens_per_s"] / world,
        "mfu": summary["mfu"], "peak_memory_bytes_per_rank": summary.get("peak_memory_bytes_per_rank"),
        "peak_memory_measure": summary.get("peak_memory_measure"), "final_val_loss": summary["final_val_loss"],
        "params": summary["params"], "variant": summary["variant"], "train_wall_s": summary["train_wall_s"],
        "drift": drift({r["step"]: r["step_s"] for r in records}, resumed_at + 1)}


def link_copy(source: Path, target: Path, keep_step: int) -> None:
    """A copy of a run directory without its checkpoints after keep_step. Checkpoint files are hard links
    (resuming only reads them and writes new folders), so GBs are not copied; the rest is copied, since
    the resumed run rewrites some of it in place (loss.png)."""
    def ignore(folder, names):
        return [n for n in names if Path(folder).name == "checkpoints" and n.startswith("step_")
                and int(n.split("_")[1]) > keep_step]

    def link_or_copy(src, dst):
        if "checkpoints" in Path(src).relative_to(source).parts:
            with contextlib.suppress(OSError):  # another file system: copy
                os.link(src, dst)
                return
        shutil.copy2(src, dst)

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=ignore, copy_function=link_or_copy)


def parse_variants(text: str) -> dict[str, dict]:
    """--variants: {name: train settings}, in order."""
    from egmla.configfile import parse_value

    variants = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        name, _, settings = entry.partition(":")
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z0-9._+-]+", name) or name in ("single", "profile", "resume") or name in variants:
            raise ValueError(f"--variants: {name!r}: a variant needs its own name of letters, digits and . _ + -")
        if not settings and name not in VARIANTS:
            raise ValueError(f"--variants: {name!r} is not one of {', '.join(VARIANTS)}; define it as "
                             f"{name}:KEY=VALUE,... (train settings)")
        values = {}
        for item in filter(None, (i.strip() for i in settings.split(","))):
            key, equals, value = item.partition("=")
            if not equals:
                raise ValueError(f"--variants: {item!r} in {name!r}: write train settings as KEY=VALUE")
            values[key.strip().removeprefix("train.")] = parse_value(value.strip())
        variants[name] = values if settings else dict(VARIANTS[name])
    if not variants:
        raise ValueError("--variants: name at least one variant")
    return variants


def setting_args(settings: dict) -> list[str]:
    """--set train.KEY=VALUE arguments (TOML values)."""
    return [a for key, value in settings.items() for a in ("--set", f"train.{key}={json.dumps(value)}")]


def describe(settings: dict) -> str:
    return ", ".join(f"{key}={json.dumps(value) if isinstance(value, bool) else value}"
                     for key, value in settings.items()) or "-"


def process_counts(text: str, device: dict, on_cpu: bool) -> list[int]:
    if text == "auto":
        return [2] if on_cpu else [n for n in (2, 4) if n <= device["gpus"]] or [2]
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        raise ValueError(f"--nproc={text!r}: give process counts such as 2 or 2,4, or auto") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts) or (1 in counts and len(counts) > 1):
        raise ValueError(f"--nproc={text!r}: distinct counts of at least 2 processes, or 1 alone (a dry run)")
    return counts


def plan_runs(variants: dict, counts: list[int], steps: int, profile_steps: int) -> list[dict]:
    """The runs in the order they are made (see the module's docstring): {name, processes, steps, variant,
    settings (the variant's), extra (train settings of this run alone)}; the resume run names the run it
    resumes and its checkpoint step instead."""
    first, half = next(iter(variants)), steps // 2
    final_only = {"checkpoint_every": 0, "keep_checkpoints": 1}
    runs = [{"name": "single", "processes": 1, "steps": steps, "variant": "single", "settings": {},
             "extra": final_only}]
    for index, name in enumerate(variants):
        for n in counts:
            extra = {} if (index, n) == (0, counts[0]) else final_only
            runs.append({"name": f"{name}-x{n}", "processes": n, "steps": steps, "variant": name,
                         "settings": variants[name], "extra": extra})
        if index == 0 and profile_steps:
            profiled = PROFILE_WARMUP_STEPS + profile_steps
            runs.append({"name": "profile", "processes": counts[0], "steps": profiled, "variant": first,
                         "settings": variants[first],
                         "extra": final_only | {"steps": profiled, "profile_steps": profile_steps}})
        if index == 0:
            runs.append({"name": "resume", "processes": 1, "steps": steps - half, "variant": first,
                         "settings": variants[first], "resumes": f"{first}-x{counts[0]}", "checkpoint_step": half})
    return runs


def skipped_on_cpu(run: dict, on_cpu: bool) -> str | None:
    if on_cpu and run["processes"] > 1 and run["settings"].get("ddp_comm_hook") == "bf16" \
            and run["settings"].get("parallel", "ddp") == "ddp":
        return ("skipped on the CPU: DDP takes the bf16 compression hook only with CUDA and NCCL >= 2.10 "
                "(register_comm_hook refuses bf16_compress_hook on gloo)")
    return None


def run_all(jobs: Jobs, work: Path, config_args: list[str], runs: list[dict], on_cpu: bool) -> dict:
    """Every planned run in order: {name: result}."""
    for run in runs:  # nothing left from an earlier call can be mistaken for this call's results
        shutil.rmtree(work / run["name"], ignore_errors=True)
    results = {}
    waiting = {run["resumes"] for run in runs if "resumes" in run}  # runs whose checkpoints a later run resumes
    for run in runs:
        name, processes = run["name"], run["processes"]
        if "resumes" in run:
            source = results.get(run["resumes"], {})
            if source.get("status") != "ok":
                job = {"name": name, "status": f"skipped: {run['resumes']} did not finish"}
            else:
                link_copy(work / run["resumes"], work / name, run["checkpoint_step"])
                expected = expected_wall_s(results, run["steps"], 1)
                job = jobs.run(name, torchrun(1, "--resume", str(work / name)), expected,
                               run_limit_s(results, expected))
        elif reason := skipped_on_cpu(run, on_cpu):
            job = {"name": name, "status": reason}
        else:
            command = torchrun(processes, *config_args, "--run-dir", str(work / name),
                               *setting_args(run["settings"] | run["extra"]))
            expected = expected_wall_s(results, run["steps"], processes)
            expected += PROFILE_SUMMARY_S if "profile_steps" in run["extra"] else 0
            job = jobs.run(name, command, expected, run_limit_s(results, expected))
        results[name] = {"variant": run["variant"], "settings": run["settings"], "extra": run.get("extra", {})} \
            | run_result(job, work / name, run.get("checkpoint_step", 0))
        if "resumes" in run:  # its log names the checkpoint it started from
            results[name]["resumed_from_checkpoint"] = f"step_{run['checkpoint_step']:08d}" in job.get("output", "")
        # each run ends with a checkpoint (the trainer's final one: ~3.8 GB at paper-base); keep only those a later
        # run resumes from, so that a call's ~10 runs do not fill the machine's disk
        waiting.discard(run.get("resumes"))
        for done in [name] + ([run["resumes"]] if "resumes" in run else []):
            if done not in waiting:
                shutil.rmtree(work / done / "checkpoints", ignore_errors=True)
    return results


def loss_tolerance(settings: dict, on_gpu: bool, rtol: float) -> float:
    if rtol:
        return rtol
    bf16 = on_gpu or any(settings.get(key) == value for key, value in BF16_SETTINGS.items())
    return BF16_RTOL if bf16 else FP32_RTOL


def compare_losses(work: Path, results: dict, compared: int, on_gpu: bool, rtol: float) -> dict:
    """The first `compared` training losses of every run against the 1-process run's (not the resumed run,
    whose first steps are a copy, nor the profiled run, whose length sets another lr schedule, nor a variant
    that trains differently, e.g. gate_table_update)."""
    reference = train_losses(work / "single")
    runs = {}
    for name, result in results.items():
        if name in ("single", "resume") or result.get("status") != "ok":
            continue
        different = [key for key in result["settings"] | result["extra"] if not LAYOUT_SETTINGS.fullmatch(key)]
        if different:
            runs[name] = {"compared": False,
                          "note": f"trains differently from the 1-process run ({', '.join(different)})"}
            continue
        difference = max_relative_difference(train_losses(work / name), reference, range(1, compared + 1))
        tolerance = loss_tolerance(result["settings"], on_gpu, rtol)
        runs[name] = {"compared": True, "max_relative_difference": difference, "rtol": tolerance,
                      "passed": difference is not None and difference <= tolerance}
    compared_runs = [r for r in runs.values() if r["compared"]]
    differences = [r["max_relative_difference"] for r in compared_runs]
    return {"steps": compared, "reference": "single", "runs": runs,
            "max_relative_difference": None if None in differences or not differences else max(differences),
            "passed": bool(compared_runs) and all(r["passed"] for r in compared_runs)}


def resume_check(work: Path, results: dict, run: dict, steps: int, on_gpu: bool, rtol: float) -> dict:
    """The run resumed under 1 process against the uninterrupted multi-process run, steps half+1..steps."""
    half, source, job = run["checkpoint_step"], run["resumes"], results["resume"]
    difference = max_relative_difference(train_losses(work / "resume"), train_losses(work / source),
                                         range(half + 1, steps + 1))
    started_there = job.get("resumed_from_checkpoint", False)
    tolerance = loss_tolerance(run["settings"], on_gpu, rtol)
    return {"source": source, "saved_by_processes": results.get(source, {}).get("processes"),
            "resumed_with_processes": job.get("processes"), "checkpoint_step": half,
            "compared_steps": [half + 1, steps], "resumed_from_checkpoint": started_there,
            "max_relative_difference": difference, "rtol": tolerance, "status": job["status"],
            "passed": bool(job["status"] == "ok" and started_there and job.get("processes") == 1
                           and difference is not None and difference <= tolerance)}


def targets(results: dict, counts: list[int]) -> dict:
    """Per parallel mode and process count: the best run's scaling efficiency against the issue's target."""
    out = {}
    for mode, target in TARGETS.items():
        for n in counts:
            runs = {name: r["scaling_efficiency"] for name, r in results.items()
                    if r.get("scaling_efficiency") is not None and r.get("processes") == n and name != "profile"
                    and r["settings"].get("parallel", "ddp") == mode}
            if runs:
                best = max(runs, key=runs.get)
                out[f"{mode}-x{n}"] = {"best_run": best, "scaling_efficiency": runs[best], "target": target,
                                       "met": runs[best] >= target}
    return out


def write_plotted_records(work: Path, names: list[str], target: Path) -> None:
    """Every run's training records in one file (a call brings back at most 8 files), with the run's name and
    only the fields the plot reads (PLOTTED)."""
    lines = [json.dumps({"run": name} | {k: r[k] for k in PLOTTED}) for name in names
             for r in train_records(work / name)]
    target.write_text("".join(line + "\n" for line in lines))


def plotted_records(folder: Path) -> dict[str, list[dict]]:
    """{run: training records} from metrics.jsonl, or, where there is none, from issue 10's metrics_RUN.jsonl
    files (a folder may hold both: this call's runs beside issue 10's, several with the same names)."""
    runs: dict[str, list[dict]] = {}
    if (folder / "metrics.jsonl").is_file():
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                runs.setdefault(record["run"], []).append(record)
    for path in [] if (folder / "metrics.jsonl").is_file() else sorted(folder.glob("metrics_*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs[path.stem.removeprefix("metrics_")] = [r for r in records if r.get("kind") == "train"]
    return runs


def plot(out: Path, resumed_at: int) -> Path | None:
    """multigpu.png: training loss and step time against step for every run (the step-time panel shows
    jitter and drift that a median hides); the resumed run from step resumed_at + 1 on. None without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (loss_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    for name, train in plotted_records(out).items():
        if name == "resume":  # its metrics file begins with the source run's steps, copied with the checkpoint
            train = [r for r in train if r["step"] > resumed_at]
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label=name)
        timed = train[1:]  # a process's first step holds compilation
        time_ax.plot([r["step"] for r in timed], [1000 * r["step_s"] for r in timed], lw=1, label=name)
    loss_ax.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss")
    time_ax.set(xlabel="step", ylabel="step time (ms)", title="step time (global batch)")
    for ax in (loss_ax, time_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "multigpu.png")
    plt.close(fig)
    return out / "multigpu.png"


def markdown(report: dict) -> str:
    """The tables for docs/benchmarks.md."""
    def gib(values):
        return " / ".join(f"{v / 2**30:.1f}" for v in values) if values else "-"

    def pct(value):
        return f"{100 * value:.1f}%" if value is not None else "-"

    def number(value):
        return "missing" if value is None else f"{value:.2e}"

    runs, agreement, resume = report["runs"], report["loss_agreement"], report["resume"]
    lines = [f"Device: **{report['device']}** ({report['gpus']} visible, torch {report['torch']}); "
             f"{report['variant']}, {report['steps']} steps of {report['batch_size']} x {report['seq_len']} "
             f"tokens per run (micro-batch {report['micro_batch_size'] or 'batch / processes'} unless a run sets "
             f"it), `{Path(report['config']).name}`"
             + (" (dry run: every run has 1 process)." if report["nproc"] == [1] else "."), "",
             f"```bash\n{report['command']}\n```", "",
             "| run | processes | settings | tokens/s | tokens/s per GPU | MFU | peak memory per GPU (GiB) | "
             "scaling efficiency | drift: last / first steps | loss vs 1 process |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        label = (f"resumed under 1 process from {resume['source']}'s step {resume['checkpoint_step']}"
                 if name == "resume" else name)
        if "tokens_per_s" not in run:
            lines.append(f"| {label} | {run.get('processes', '')} | {describe(run['settings'])} | "
                         f"{run.get('status', 'not run')} | | | | | | |")
            continue
        d = run.get("drift")
        drift_cell = (f"{d['ratio']:.3f} ({'ok' if d['passed'] else 'DRIFT'})"
                      if d and name not in ("resume", "profile") else "-")  # profiled steps are slower
        loss = agreement["runs"].get(name, {})
        loss_cell = (f"{number(loss['max_relative_difference'])} ({'ok' if loss['passed'] else 'FAILED'})"
                     if loss.get("compared") else ("not compared" if loss else "-"))
        shown = {k: v for k, v in run.get("extra", {}).items() if k in ("steps", "profile_steps")}
        lines.append(f"| {label} | {run['processes']} | {describe(run['settings'] | shown)} | "
                     f"{run['tokens_per_s']:,.0f} | {run['tokens_per_s_per_gpu']:,.0f} | {pct(run['mfu'])} | "
                     f"{gib(run['peak_memory_bytes_per_rank'])} | {pct(run.get('scaling_efficiency'))} | "
                     f"{drift_cell} | {loss_cell} |")
    met = "; ".join(f"{key}: best {t['best_run']} {pct(t['scaling_efficiency'])} (target {t['target']:.0%}: "
                    f"{'met' if t['met'] else 'missed'})" for key, t in report["targets"].items())
    memory = next((r.get("peak_memory_measure") for r in runs.values() if r.get("peak_memory_measure")), None)
    lines += ["", f"Scaling efficiency = N-process tokens/s / (N x 1-process tokens/s), from each run's median step "
              f"(steps after the first {WARMUP_STEPS}). {met or 'No multi-process run finished'}. "
              f"Drift = median step time of the last {DRIFT_STEPS} steps / the first {DRIFT_STEPS} after the first "
              f"{WARMUP_STEPS} (fewer in a short run); within {DRIFT_LIMIT:.0%} passes. Peak memory: "
              f"{memory or 'not recorded'}, per rank.",
              f"Loss agreement, first {agreement['steps']} training losses against the 1-process run, largest "
              f"relative difference {number(agreement['max_relative_difference'])} "
              f"({'passed' if agreement['passed'] else 'FAILED'}; tolerance {BF16_RTOL:g} at bf16 rounding, "
              f"{FP32_RTOL:g} in fp32 on the CPU).",
              f"Resume: {resume['source']}'s checkpoint of step {resume['checkpoint_step']}, saved by "
              f"{resume['saved_by_processes'] or '-'} process(es), resumed under "
              f"{resume['resumed_with_processes'] or '-'}; "
              f"steps {resume['compared_steps'][0]}-{resume['compared_steps'][1]} vs the uninterrupted run: max "
              f"relative difference {number(resume['max_relative_difference'])} "
              f"({'passed' if resume['passed'] else 'FAILED: ' + resume['status']})."]
    lines += [f"Run {name} ran twice: {run['retried']}." for name, run in runs.items() if run.get("retried")]
    if report.get("profile"):
        lines += ["", "Profile of the `profile` run: [profile.md](profile.md)."]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    if args.steps < 2 or args.profile_steps < 1:
        raise ValueError(f"--steps={args.steps}, --profile-steps={args.profile_steps}: need at least 2 steps and "
                         f"1 profiled step")
    if args.plot_only:
        folder = Path(args.plot_only)
        resumed_at = json.loads((folder / "multigpu.json").read_text())["resume"]["checkpoint_step"]
        print(plot(folder, resumed_at) or "matplotlib is not installed")
        return 0
    started = time.monotonic()
    from egmla.configfile import load_toml
    from egmla.data import prepare_data
    from egmla.train.config import RunConfig

    variants = parse_variants(args.variants)
    out, work = Path(args.out), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:  # nothing left from an earlier call can be mistaken for this call's results
        (out / name).unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir).resolve() if args.cache_dir else work / "cache"
    env = child_env(args.device)
    query = subprocess.run([sys.executable, "-c", DEVICE_QUERY], env=env, capture_output=True, text=True, check=True)
    device = json.loads(query.stdout)
    on_cpu = args.device == "cpu" or not device["gpus"]
    counts = process_counts(args.nproc, device, on_cpu)
    print(f"device {device['name']} x {device['gpus']}, torch {device['torch']}, {os.cpu_count()} CPUs; "
          f"process counts {counts}; variants {', '.join(variants)}", flush=True)
    if not on_cpu and device["gpus"] < max(counts):
        print(f"error: --nproc={args.nproc} but {device['gpus']} GPU(s) visible; use --device cpu for a gloo run",
              file=sys.stderr)
        return 2

    half = args.steps // 2
    overrides = [f"data.cache_dir={json.dumps(str(cache_dir))}", f"data.max_bytes={args.max_bytes}",
                 f"train.steps={args.steps}", f"train.device={json.dumps(args.device)}", "train.eval_every=0",
                 f"train.checkpoint_every={half}", "train.keep_checkpoints=2", *args.overrides]
    values = load_toml(args.config, overrides)
    run = RunConfig.from_dict(values)
    runs = plan_runs(variants, counts, args.steps, args.profile_steps if args.profile else 0)
    for planned in runs:  # a bad setting fails here, before anything runs
        with_settings = setting_args(planned["settings"] | planned.get("extra", {}))
        RunConfig.from_dict(load_toml(args.config, overrides + with_settings[1::2]))
    prep_started = time.monotonic()
    _, shards = prepare_data(run.data, run.model.vocab_size, progress=False)
    prep_s = time.monotonic() - prep_started
    print(f"data ready in {prep_s:.0f}s: {shards.meta['train_tokens']:,} training tokens", flush=True)

    jobs = Jobs(out / "multigpu.log", env, started + args.call_budget_s - REPORT_RESERVE_S)
    config_args = ["--config", str(Path(args.config).resolve())] + [a for o in overrides for a in ("--set", o)]
    results = run_all(jobs, work, config_args, runs, on_cpu)
    write_plotted_records(work, [r["name"] for r in runs], out / "metrics.jsonl")  # first: survives a failure below

    on_gpu = not on_cpu
    single_speed = results["single"].get("tokens_per_s")
    for name, result in results.items():
        if single_speed and "tokens_per_s" in result and name not in ("single", "resume"):
            result["scaling_efficiency"] = result["tokens_per_s"] / (result["processes"] * single_speed)
    profile = None
    if results.get("profile", {}).get("status") == "ok" and (work / "profile" / "profile.json").is_file():
        profile = json.loads((work / "profile" / "profile.json").read_text())
        shutil.copyfile(work / "profile" / "profile.md", out / "profile.md")
    report = {
        "device": device["name"], "gpus": device["gpus"], "torch": device["torch"], "nproc": counts,
        "command": shlex.join(["egmla", *sys.argv[1:]]), "variants": variants,
        "config": args.config, "overrides": overrides, "steps": args.steps, "batch_size": run.train.batch_size,
        "micro_batch_size": run.train.micro_batch_size, "seq_len": run.train.seq_len,
        "variant": run.model.variant_name(), "data": shards.meta, "data_prep_s": prep_s,
        "runs": results, "scaling_efficiency": {n: r["scaling_efficiency"] for n, r in results.items()
                                                if "scaling_efficiency" in r},
        "targets": targets(results, counts),
        "loss_agreement": compare_losses(work, results, min(COMPARED_STEPS, args.steps), on_gpu, args.loss_rtol),
        "resume": resume_check(work, results, next(r for r in runs if r["name"] == "resume"), args.steps, on_gpu,
                               args.loss_rtol),
        "profile": profile, "call_s": time.monotonic() - started,
    }
    (out / "multigpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "multigpu.md").write_text(markdown(report))
    plot(out, half)
    print(markdown(report), flush=True)
    if profile:
        print((out / "profile.md").read_text(), flush=True)
    failed = [name for name, r in results.items() if r["status"] != "ok" and not r["status"].startswith("skipped")]
    resumed = report["resume"]["passed"] or report["resume"]["status"].startswith("skipped")
    return 0 if not failed and report["loss_agreement"]["passed"] and resumed else 1
