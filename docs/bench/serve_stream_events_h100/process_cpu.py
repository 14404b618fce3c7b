"""Host time of the scheduler's read of one decode step (`Scheduler._process`) for 128 rows, with the requests
submitted streamed (an event per row) or not (`stream=False`): tiny model on the CPU, token ids only.

    python docs/bench/serve_stream_events_h100/process_cpu.py
"""
import statistics
import time

import torch

import egmla.infer.scheduler as scheduler_module
from egmla.config import preset
from egmla.infer.engine import GenerationEngine
from egmla.infer.scheduler import Scheduler
from egmla.model import Transformer

ROWS, STEPS, REPEATS = 128, 300, 3


def per_step_us(stream: bool) -> float:
    torch.manual_seed(0)
    engine = GenerationEngine(Transformer(preset("tiny", max_seq_len=512)).eval())
    scheduler = Scheduler(engine, max_batch=ROWS, admit_batch=ROWS)
    for _ in range(ROWS):
        scheduler.submit([1, 2, 3], max_new_tokens=500, stream=stream)
    for _ in range(4):  # admit, prefill and a few steps: every row running
        scheduler.step()
    rows = list(range(ROWS))
    requests = [scheduler._rows[row] for row in rows]
    ids = torch.randint(10, 100, (ROWS,))
    total = 0.0
    for _ in range(STEPS):
        pending = scheduler_module._Pending(rows, requests, scheduler_module.to_host_async(ids))
        start = time.perf_counter()
        scheduler._process(pending)
        total += time.perf_counter() - start
    return total / STEPS * 1e6


if __name__ == "__main__":
    for stream in (True, False):  # warm-up, once each
        per_step_us(stream)
    times = {stream: [per_step_us(stream) for _ in range(REPEATS)] for stream in (True, False)}
    for stream, values in times.items():
        print(f"stream={stream!s:5}: _process of {ROWS} rows {statistics.median(values):6.1f} us per step "
              f"(median of {REPEATS} x {STEPS} steps; {', '.join(f'{v:.1f}' for v in values)})")
