"""Time a server start's graph captures: paper-base EG-MLA kv64 (random weights, bf16), max_batch 32 (README.md beside).
Run from the repository root: python docs/bench/capture_at_start_h100/capture_time.py"""
import time

import torch

from egmla.bench.generate import _random_model
from egmla.infer.engine import GenerationEngine
from egmla.infer.scheduler import Scheduler
from egmla.variants import variant_config

name = "egmla-kv64"
config = variant_config(name, "paper-base", max_seq_len=1024)
engine = GenerationEngine(_random_model(config, torch.device("cuda"), torch.bfloat16), prefill_graphs=True)
scheduler = Scheduler(engine, max_batch=32, max_len=1024)
scheduler.step()  # the cache, as a server's start allocates it
start = time.perf_counter()
decode = scheduler.capture_graphs()
decoded = time.perf_counter()
listed = len(scheduler.prefill_buckets(256))
prefill = scheduler.capture_prefill_graphs(256)
done = time.perf_counter()
print(f"{name}: {decode} decode graphs {decoded - start:.2f} s; {prefill} of {listed} prefill buckets (<= 256 tokens) "
      f"{done - decoded:.2f} s ({(done - decoded) / max(prefill, 1) * 1e3:.0f} ms each); memory allocated "
      f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB, reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB")
