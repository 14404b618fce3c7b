"""The scheduler's host µs per decode iteration when its rows are not all adjacent, on a CPU core:

    OMP_NUM_THREADS=1 python docs/bench/serve_host_cpu/holes.py --baseline REF [--rounds 5]

128 greedy rows of a tiny MLA kv64 model decode with the step's forward replaced by fixed logits (as measure.py
beside this), then rows 5 and 70 are cancelled. The engine's decode buckets are a GPU's (DEFAULT_BUCKETS), so 126
rows still need the 128-row step and no compaction closes the holes: each step runs the path for non-adjacent rows
(between a request's end and the next compaction on a GPU). `--baseline REF` loads egmla/infer/scheduler.py as of
git REF beside this checkout's and alternates them, a fresh engine and scheduler per run, 20 warm-up iterations and
300 timed; the medians of the runs' medians are printed.
"""
import argparse
import statistics
import time

import torch

import egmla.infer.scheduler
from egmla.infer.decode_step import DEFAULT_BUCKETS
from egmla.infer.engine import GenerationEngine
from egmla.model import Transformer
from egmla.variants import variant_config
from measure import ROWS, STEPS, WARM, scheduler_at

HOLES = (5, 70)


def holed_scheduler(module):
    torch.manual_seed(0)
    engine = GenerationEngine(Transformer(variant_config("mla-kv64", "tiny")).eval(), batch_buckets=DEFAULT_BUCKETS)
    scheduler = module.Scheduler(engine, max_batch=ROWS, admit_batch=ROWS)
    for i in range(ROWS):
        scheduler.submit([i + 1, 2, 3, 4], max_new_tokens=WARM + STEPS + 50, stream=False)
    for _ in range(3):  # admit, prefill, the first steps: the real model
        scheduler.step()
    step = scheduler._step
    logits = torch.randn(step.batch, 64, generator=torch.Generator().manual_seed(1))
    step.run = lambda: logits
    for row in HOLES:
        scheduler._rows[row].handle.cancel()
    for _ in range(3):
        scheduler.step()
    assert scheduler.running == ROWS - len(HOLES) and scheduler._step is step, "a compaction closed the holes"
    return scheduler


def median_step_us(module) -> float:
    scheduler = holed_scheduler(module)
    with scheduler._generating_held():
        for _ in range(WARM):
            scheduler.step()
        times = []
        for _ in range(STEPS):
            start = time.perf_counter()
            scheduler.step()
            times.append(time.perf_counter() - start)
    assert scheduler.running == ROWS - len(HOLES), "a row ended during the timing"
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git ref of the scheduler to compare with, alternating")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    modules = {args.baseline: scheduler_at(args.baseline), "this checkout": egmla.infer.scheduler}
    runs = {name: [] for name in modules}
    for _ in range(args.rounds):
        for name, module in modules.items():
            runs[name].append(median_step_us(module))
    for name, values in runs.items():
        print(f"{name:>14}: {statistics.median(values):6.1f} µs per iteration (runs: "
              f"{', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
