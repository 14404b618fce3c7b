"""One device call on two GPUs (issue 10): DDP, FSDP2 and one GPU on the same global batch, plus a
checkpoint saved under 2 processes and resumed under 1.

In one command it builds the python-source corpus and its tokenizer once (cache under --work), then runs
`torchrun --standalone --nproc_per_node=2 -m egmla.train --config configs/egmla-kv64.toml` for --steps
steps with `train.parallel=ddp` (a checkpoint at steps/2), the same with `train.parallel=fsdp`, the same
global batch with `--nproc_per_node=1`, and finally resumes a copy of the DDP run from its steps/2
checkpoint under 1 process. NVLink multicast stays off in every child (NCCL_NVLS_ENABLE=0 and friends).
Results go to --out: multigpu.json (tokens/s total and per GPU, MFU, peak memory per GPU, scaling
efficiency, loss agreement, resume check), multigpu.md (a table for docs/benchmarks.md), multigpu.log (the
children's output), multigpu.png and each run's training losses and step times (metrics_RUN.jsonl, what the
plot reads; the full metrics.jsonl stays in the run directory). Checkpoints (GBs) stay in --work.

    egmla bench multigpu          # 2 GPUs (2 x H200): about 5 minutes in all
    egmla bench multigpu --device cpu --config configs/tiny.toml --steps 8 --max-bytes 300000
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/, and the children's PYTHONPATH
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
RUNS = ("ddp", "fsdp", "single", "resume")  # run directories under --work, in order
COMPARED_STEPS = 50  # the first N training losses of the three runs are compared
DDP_TARGET = 0.90  # issue 10: DDP scaling efficiency of at least 90%
REPORT_RESERVE_S = 15  # left at the end of the call budget for the report
DEVICE_QUERY = ("import json, torch; ok = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
                "'gpus': torch.cuda.device_count() if ok else 0, 'name': torch.cuda.get_device_name(0) if ok "
                "else 'cpu'}))")


PLOTTED = ("kind", "step", "loss", "step_s")  # what metrics_RUN.jsonl keeps of a run's training records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(ROOT / "configs" / "egmla-kv64.toml"), help="training config")
    parser.add_argument("--steps", type=int, default=150,
                        help="optimizer steps per run (>= 2; the resume check restarts at steps/2); 150 steps of "
                             "64x1024 tokens take about 1-1.5 min per run on H200s, compilation included")
    parser.add_argument("--nproc", type=int, default=2,
                        help="processes (GPUs) of the multi-process runs; 1 = a dry run of the whole call on a "
                             "single GPU (every run then has 1 process)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="train.device of every run; cpu runs gloo with one thread per process")
    parser.add_argument("--max-bytes", type=int, default=100_000_000,
                        help="data.max_bytes: corpus text to use (100 MB of Python source is ~27M tokens, "
                             "more than 150 steps x 64 x 1024 read)")
    parser.add_argument("--set", "--preset-override", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="config override for every run (after the script's own)")
    parser.add_argument("--loss-rtol", type=float, default=0.0,
                        help="largest relative loss difference that counts as agreement; 0 = 1e-2 on GPU (bf16 "
                             "rounding), 1e-4 on CPU (fp32)")
    parser.add_argument("--work", default="/tmp/egmla-multigpu", help="run directories (checkpoints: GBs)")
    parser.add_argument("--cache-dir", default="", help="tokenizer and shard cache (empty: WORK/cache)")
    parser.add_argument("--out", default="bench-out/multigpu", help="results folder")
    parser.add_argument("--call-budget-s", type=float, default=570,
                        help="the whole call ends within this: a run still going then is stopped and reported")
    parser.add_argument("--plot-only", metavar="DIR", default="",
                        help="run nothing: redraw DIR/multigpu.png from the metrics_*.jsonl files in DIR")


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

    def run(self, name: str, command: list[str]) -> dict:
        timeout = self.deadline - time.monotonic()
        if timeout < 30:
            return {"name": name, "command": shlex.join(command), "status": "skipped: call budget spent"}
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {name}: {shlex.join(command)}\n")
            log.flush()
            start_offset = log.tell()
            started = time.monotonic()
            # a new session, so a timeout stops torchrun and its workers (this process group only)
            proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                status = "ok" if proc.wait(timeout=timeout) == 0 else f"failed (exit status {proc.returncode})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                status = f"stopped after {timeout:.0f}s: call budget spent"
        wall_s = time.monotonic() - started
        with open(self.log_path) as log:
            log.seek(start_offset)
            output = log.read()
        lines = output.splitlines()
        print(f"== {name}: {status} in {wall_s:.0f}s\n" + "\n".join(lines[-8 if status == "ok" else -40:]),
              flush=True)
        return {"name": name, "command": shlex.join(command), "status": status, "wall_s": wall_s,
                "output": output}


def train_losses(run_dir: Path) -> dict[int, float]:
    from egmla.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"}


def max_relative_difference(losses: dict, reference: dict, steps) -> float | None:
    """max |loss - reference| / |reference| over `steps`; None when a step is missing from either run."""
    steps = list(steps)
    if not all(s in losses and s in reference for s in steps):
        return None
    return max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in steps)


def run_result(job: dict, run_dir: Path) -> dict:
    """Speed and memory of a finished run, from its summary.json."""
    summary_path = run_dir / "summary.json"
    if job["status"] != "ok" or not summary_path.is_file():
        return {**{k: v for k, v in job.items() if k != "output"}, "error_tail": job.get("output", "")[-3000:]}
    summary = json.loads(summary_path.read_text())
    world = summary["world_size"]
    return {k: v for k, v in job.items() if k != "output"} | {
        "processes": world, "steps": summary["steps"], "median_step_s": summary["median_step_s"],
        "tokens_per_s": summary["tokens_per_s"], "tokens_per_s_per_gpu": summary["tokens_per_s"] / world,
        "mfu": summary["mfu"], "peak_memory_bytes_per_rank": summary.get("peak_memory_bytes_per_rank"),
        "peak_memory_measure": summary.get("peak_memory_measure"), "final_val_loss": summary["final_val_loss"],
        "params": summary["params"], "variant": summary["variant"], "train_wall_s": summary["train_wall_s"]}


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


def compare_losses(work: Path, names: list[str], compared: int, rtol: float) -> dict:
    """The first `compared` training losses of every pair of runs."""
    losses = {name: train_losses(work / name) for name in names}
    pairs = {}
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            pairs[f"{first} vs {second}"] = max_relative_difference(losses[first], losses[second],
                                                                    range(1, compared + 1))
    values = list(pairs.values())
    worst = None if None in values or not values else max(values)
    return {"steps": compared, "max_relative_difference": worst, "pairs": pairs, "rtol": rtol,
            "passed": worst is not None and worst <= rtol}


def resume_check(work: Path, job: dict, half: int, steps: int, rtol: float, nproc: int) -> dict:
    """The run resumed under 1 process against the uninterrupted multi-process run, steps half+1..steps."""
    resumed = train_losses(work / "resume")
    difference = max_relative_difference(resumed, train_losses(work / "ddp"), range(half + 1, steps + 1))
    started_there = f"step_{half:08d}" in job.get("output", "")
    summary = work / "resume" / "summary.json"
    world = json.loads(summary.read_text())["world_size"] if summary.is_file() else None
    return {"saved_by_processes": nproc, "resumed_with_processes": world, "checkpoint_step": half,
            "compared_steps": [half + 1, steps], "resumed_from_checkpoint": started_there,
            "max_relative_difference": difference, "rtol": rtol, "status": job["status"],
            "passed": bool(job["status"] == "ok" and started_there and world == 1 and difference is not None
                           and difference <= rtol)}


def write_plotted_records(metrics: Path, target: Path) -> None:
    """The training records of a run's metrics.jsonl, with only the fields the plot reads (PLOTTED)."""
    from egmla.train.metrics import read_metrics

    lines = [json.dumps({k: r[k] for k in PLOTTED}) for r in read_metrics(metrics) if r.get("kind") == "train"]
    target.write_text("".join(line + "\n" for line in lines))


def plot(out: Path, resumed_at: int) -> Path | None:
    """multigpu.png: training loss and step time against step for every run (the step-time panel shows
    jitter that a median hides); the resumed run from step resumed_at + 1 on. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (loss_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for name in RUNS:
        path = out / f"metrics_{name}.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [r for r in records if r.get("kind") == "train"]
        if name == "resume":  # its metrics file begins with the DDP run's steps, copied with the checkpoint
            train = [r for r in train if r["step"] > resumed_at]
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label=name)
        timed = train[1:]  # a process's first step holds compilation
        time_ax.plot([r["step"] for r in timed], [1000 * r["step_s"] for r in timed], lw=1, label=name)
    loss_ax.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss")
    time_ax.set(xlabel="step", ylabel="step time (ms)", title="step time (global batch)")
    for ax in (loss_ax, time_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "multigpu.png")
    plt.close(fig)
    return out / "multigpu.png"


def markdown(report: dict) -> str:
    """A table for docs/benchmarks.md."""
    def gib(values):
        return " / ".join(f"{v / 2**30:.1f}" for v in values) if values else "-"

    def pct(value):
        return f"{100 * value:.1f}%" if value is not None else "-"

    runs, efficiency = report["runs"], report["scaling_efficiency"]
    lines = [f"Device: **{report['device']}** ({report['gpus']} visible, torch {report['torch']}); "
             f"{report['variant']}, {report['steps']} steps of {report['batch_size']} x {report['seq_len']} "
             f"tokens per run, `{Path(report['config']).name}`"
             + (" (dry run: every run has 1 process)." if report["nproc"] == 1 else "."), "",
             f"```bash\n{report['command']}\n```", "",
             "| run | processes | tokens/s | tokens/s per GPU | MFU | peak memory per GPU (GiB) | "
             "scaling efficiency |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, label in (("ddp", "DDP"), ("fsdp", "FSDP2"), ("single", "1 GPU, same global batch"),
                        ("resume", f"resumed under 1 process from step {report['resume']['checkpoint_step']}")):
        run = runs.get(name, {})
        if "tokens_per_s" not in run:
            lines.append(f"| {label} | | {run.get('status', 'not run')} | | | | |")
            continue
        lines.append(f"| {label} | {run['processes']} | {run['tokens_per_s']:,.0f} | "
                     f"{run['tokens_per_s_per_gpu']:,.0f} | {pct(run['mfu'])} | "
                     f"{gib(run['peak_memory_bytes_per_rank'])} | {pct(efficiency.get(name))} |")
    agreement, resume = report["loss_agreement"], report["resume"]

    def number(value):
        return "missing" if value is None else f"{value:.2e}"

    pairs = ", ".join(f"{pair} {number(value)}" for pair, value in agreement["pairs"].items())
    lines += ["", f"Scaling efficiency = {report['nproc']}-GPU tokens/s / ({report['nproc']} x 1-GPU tokens/s); "
              f"target for DDP >= {DDP_TARGET:.0%}: {'met' if report['ddp_target_met'] else 'missed'}. "
              f"Peak memory: {runs.get('ddp', {}).get('peak_memory_measure') or 'not recorded'}, per rank.",
              f"Loss agreement, first {agreement['steps']} training losses, max relative difference: {pairs} "
              f"(tolerance {agreement['rtol']:g}: {'passed' if agreement['passed'] else 'FAILED'}).",
              f"Resume: checkpoint of step {resume['checkpoint_step']} saved by {resume['saved_by_processes']} "
              f"process(es), resumed under {resume['resumed_with_processes'] or '-'}; steps "
              f"{resume['compared_steps'][0]}-{resume['compared_steps'][1]} vs the uninterrupted run: max relative "
              f"difference "
              f"{number(resume['max_relative_difference'])} ({'passed' if resume['passed'] else 'FAILED'})."]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    if args.steps < 2 or args.nproc < 1:
        raise ValueError(f"--steps={args.steps}, --nproc={args.nproc}: need at least 2 steps and 1 process")
    if args.plot_only:
        folder = Path(args.plot_only)
        resumed_at = json.loads((folder / "multigpu.json").read_text())["resume"]["checkpoint_step"]
        print(plot(folder, resumed_at) or "matplotlib is not installed")
        return 0
    started = time.monotonic()
    from egmla.configfile import load_toml
    from egmla.data import prepare_data
    from egmla.train.config import RunConfig

    out, work = Path(args.out), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir).resolve() if args.cache_dir else work / "cache"
    env = child_env(args.device)
    query = subprocess.run([sys.executable, "-c", DEVICE_QUERY], env=env, capture_output=True, text=True, check=True)
    device = json.loads(query.stdout)
    print(f"device {device['name']} x {device['gpus']}, torch {device['torch']}, {os.cpu_count()} CPUs", flush=True)
    if args.device != "cpu" and device["gpus"] < args.nproc:
        print(f"error: --nproc={args.nproc} but {device['gpus']} GPU(s) visible; use --device cpu for a gloo run",
              file=sys.stderr)
        return 2

    half = args.steps // 2
    overrides = [f"data.cache_dir={json.dumps(str(cache_dir))}", f"data.max_bytes={args.max_bytes}",
                 f"train.steps={args.steps}", f"train.device={json.dumps(args.device)}", "train.eval_every=0",
                 f"train.checkpoint_every={half}", "train.keep_checkpoints=2", *args.overrides]
    values = load_toml(args.config, overrides)
    run = RunConfig.from_dict(values)
    prep_started = time.monotonic()
    _, shards = prepare_data(run.data, run.model.vocab_size, progress=False)
    prep_s = time.monotonic() - prep_started
    print(f"data ready in {prep_s:.0f}s: {shards.meta['train_tokens']:,} training tokens", flush=True)

    jobs = Jobs(out / "multigpu.log", env, started + args.call_budget_s - REPORT_RESERVE_S)
    config_args = ["--config", str(Path(args.config).resolve())] + [a for o in overrides for a in ("--set", o)]
    results, outputs = run_all(jobs, work, config_args, args.nproc, half)
    for name in RUNS:  # the plotted records first: they survive a failure in the report below
        if (work / name / "metrics.jsonl").is_file():
            write_plotted_records(work / name / "metrics.jsonl", out / f"metrics_{name}.jsonl")

    rtol = args.loss_rtol or (1e-2 if device["gpus"] and args.device != "cpu" else 1e-4)
    single_speed = results["single"].get("tokens_per_s")
    efficiency = {name: results[name]["tokens_per_s"] / (args.nproc * single_speed)
                  for name in ("ddp", "fsdp") if single_speed and "tokens_per_s" in results[name]}
    report = {
        "device": device["name"], "gpus": device["gpus"], "torch": device["torch"], "nproc": args.nproc,
        "command": shlex.join(["egmla", *sys.argv[1:]]),
        "config": args.config, "overrides": overrides, "steps": args.steps, "batch_size": run.train.batch_size,
        "micro_batch_size": run.train.micro_batch_size, "seq_len": run.train.seq_len,
        "variant": run.model.variant_name(), "data": shards.meta, "data_prep_s": prep_s,
        "runs": results, "scaling_efficiency": efficiency,
        "ddp_target_met": efficiency.get("ddp", 0.0) >= DDP_TARGET,
        "loss_agreement": compare_losses(work, ["ddp", "fsdp", "single"], min(COMPARED_STEPS, args.steps), rtol),
        "resume": resume_check(work, outputs["resume"], half, args.steps, rtol, args.nproc),
        "call_s": time.monotonic() - started,
    }
    (out / "multigpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "multigpu.md").write_text(markdown(report))
    plot(out, half)
    print(markdown(report), flush=True)
    finished = all(r["status"] == "ok" for r in results.values())
    return 0 if finished and report["loss_agreement"]["passed"] and report["resume"]["passed"] else 1


def run_all(jobs: Jobs, work: Path, config_args: list[str], nproc: int, half: int) -> tuple[dict, dict]:
    """The DDP, FSDP2 and single-process runs, then the resume of the DDP run's step-`half` checkpoint
    under 1 process: (results by run, the jobs with their output)."""
    for name in RUNS:  # nothing left from an earlier call can be mistaken for this call's results
        shutil.rmtree(work / name, ignore_errors=True)
    results, outputs = {}, {}
    for name, processes, mode in (("ddp", nproc, "ddp"), ("fsdp", nproc, "fsdp"), ("single", 1, "ddp")):
        only_final = [] if name == "ddp" else ["--set", "train.checkpoint_every=0", "--set", "train.keep_checkpoints=1"]
        outputs[name] = jobs.run(name, torchrun(processes, *config_args, "--run-dir", str(work / name), "--set",
                                                f"train.parallel={mode}", *only_final))
        results[name] = run_result(outputs[name], work / name)
    if results["ddp"]["status"] == "ok":
        link_copy(work / "ddp", work / "resume", half)
        outputs["resume"] = jobs.run("resume", torchrun(1, "--resume", str(work / "resume")))
    else:
        outputs["resume"] = {"status": "skipped: the DDP run failed"}
    results["resume"] = run_result(outputs["resume"], work / "resume")
    return results, outputs

