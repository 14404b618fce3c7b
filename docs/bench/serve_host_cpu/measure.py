"""Host time of the scheduler's decode iteration (`Scheduler.step()`) for 128 running rows on the CPU, the model left
out: a tiny MLA kv64 model brings every row into its decode phase, then the decode step's forward is replaced by
fixed logits [rows, 64] (an argmax over 64 columns, so that what is timed is the scheduler's own Python and the small
tensor operations it launches, as on a GPU, where the forward is a graph replay the device runs).

    OMP_NUM_THREADS=1 python docs/bench/serve_host_cpu/measure.py [--baseline origin/main] [--profile]

--baseline REF: also time egmla/infer/scheduler.py as of git REF (loaded as a module of its own next to this
checkout's), alternating with this checkout's run by run; medians of the runs' per-iteration medians.
--profile: cProfile of this checkout's iterations (the top functions by own time).
"""
import argparse
import cProfile
import importlib.util
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import egmla.infer.scheduler
from egmla.infer.engine import GenerationEngine
from egmla.model import Transformer
from egmla.variants import variant_config

ROWS, WARM, STEPS = 128, 20, 300
ROOT = Path(__file__).resolve().parents[3]


def module_at(ref: str, path: str, name: str):
    """The file `path` as of git `ref`, imported as a module `name` of its own (its imports from this checkout)."""
    source = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def scheduler_at(ref: str):
    """egmla/infer/scheduler.py as of git `ref`, with the per-token `SequenceState` of egmla/infer/engine.py as of
    `ref` (the rest of egmla from this checkout)."""
    module = module_at(ref, "egmla/infer/scheduler.py", "scheduler_baseline")
    module.SequenceState = module_at(ref, "egmla/infer/engine.py", "engine_baseline").SequenceState
    return module


def running_scheduler(module, stream: bool):
    """A scheduler of `module` with ROWS greedy requests in their decode phase and its decode step's forward
    replaced by fixed logits."""
    torch.manual_seed(0)
    engine = GenerationEngine(Transformer(variant_config("mla-kv64", "tiny")).eval())
    scheduler = module.Scheduler(engine, max_batch=ROWS, admit_batch=ROWS)
    for i in range(ROWS):  # distinct prompts (no shared prefill), long enough outputs to outlast the timing
        scheduler.submit([i + 1, 2, 3, 4], max_new_tokens=WARM + STEPS + 50, stream=stream)
    for _ in range(3):  # admit, prefill, the first steps: the real model
        scheduler.step()
    assert scheduler.running == ROWS and scheduler.stats.decode_steps >= 2
    step = scheduler._step
    scheduler.handles = [request.handle for request in scheduler._rows if request is not None]
    logits = torch.randn(step.batch, 64, generator=torch.Generator().manual_seed(1))
    step.run = lambda: logits
    return scheduler


def drain(scheduler) -> None:
    """What a server's readers do between steps (untimed): take every handle's events, so that they do not pile up."""
    for handle in scheduler.handles:
        events = handle._events
        while not events.empty():
            events.get_nowait()


def time_steps(scheduler, profile: cProfile.Profile | None = None, loop: bool = True) -> tuple[float, dict]:
    """Median µs per `step()` over STEPS iterations (after WARM), and the phases' host µs per iteration. loop: as the
    scheduler's thread runs them (`_loop`: where the scheduler has `_generating_held`, inside it, which the steps then
    do not enter each); loop=False: as a caller by hand does (each step enters `engine.generating()`)."""
    if loop and hasattr(scheduler, "_generating_held"):
        with scheduler._generating_held():
            return _time_steps(scheduler, scheduler.step, profile)
    return _time_steps(scheduler, scheduler.step, profile)


def _time_steps(scheduler, iterate, profile: cProfile.Profile | None) -> tuple[float, dict]:
    for _ in range(WARM):
        iterate()
        drain(scheduler)
    before = dict(scheduler.stats.host_seconds)
    times = []
    if profile is not None:
        profile.enable()
    for _ in range(STEPS):
        start = time.perf_counter()
        iterate()
        times.append(time.perf_counter() - start)
        if profile is not None:
            profile.disable()
        drain(scheduler)
        if profile is not None:
            profile.enable()
    if profile is not None:
        profile.disable()
    phase_seconds = dict(scheduler.stats.host_seconds)
    assert scheduler.running == ROWS, "a row ended during the timing"
    phases = {k: (v - before.get(k, 0.0)) / STEPS * 1e6 for k, v in phase_seconds.items()}
    return statistics.median(times) * 1e6, phases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", help="git ref of the scheduler to compare with, alternating")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--stream", choices=("on", "off", "both"), default="both")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--by-hand", action="store_true", help="time step() (each entering engine.generating()), not "
                                                                "the thread's iterations")
    args = parser.parse_args()
    torch.set_num_threads(1)
    streams = {"on": [True], "off": [False], "both": [True, False]}[args.stream]
    if args.profile:
        profile = cProfile.Profile()
        time_steps(running_scheduler(egmla.infer.scheduler, True), profile)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return
    modules = {"this": egmla.infer.scheduler}
    if args.baseline:
        modules = {args.baseline: scheduler_at(args.baseline), **modules}
    for stream in streams:
        for module in modules.values():  # warm-up, once each
            time_steps(running_scheduler(module, stream), loop=not args.by_hand)
        medians = {name: [] for name in modules}
        phases = {name: [] for name in modules}
        for round_ in range(args.rounds):
            order = list(modules.items()) if round_ % 2 == 0 else list(modules.items())[::-1]
            for name, module in order:
                median, phase = time_steps(running_scheduler(module, stream), loop=not args.by_hand)
                medians[name].append(median)
                phases[name].append(phase)
        what = "step() by hand" if args.by_hand else "the scheduler thread's iteration"
        print(f"stream={stream}: {ROWS} rows, host time per decode iteration ({what}), model replaced by fixed logits "
              f"(median of {args.rounds} runs' medians over {STEPS} iterations; runs alternated)")
        for name in modules:
            phase = {k: statistics.median(p[k] for p in phases[name]) for k in phases[name][0]}
            print(f"  {name:>12}: {statistics.median(medians[name]):7.1f} us  "
                  f"[{', '.join(f'{v:.1f}' for v in medians[name])}]  phases: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in phase.items()))
        if len(modules) == 2:
            (a, va), (b, vb) = [(n, statistics.median(v)) for n, v in medians.items()]
            print(f"  {b} / {a}: {vb / va:.3f} ({va / vb:.2f}x faster)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
