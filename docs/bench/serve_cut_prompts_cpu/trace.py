"""Count fresh and continued prefill forwards of the scheduler in the serving bench's shape, scaled down 8x
(prompts 64-128 tokens against a 4,096-token budget, as 512-1,024 against 32,768), tiny preset, on the CPU."""
import random, sys, time
import torch
from egmla.infer.scheduler import Scheduler
from egmla.infer.engine import GenerationEngine
from egmla.config import preset
from egmla.model import Transformer

torch.manual_seed(0)
config = preset("tiny", attention="mla", kv_lora_rank=16, max_seq_len=160)
model = Transformer(config).eval()
engine = GenerationEngine(model)
rng = random.Random(0)
prompts = [[rng.randrange(1, config.vocab_size) for _ in range(rng.randint(64, 128))] for _ in range(256)]
outs = [rng.randint(16, 32) for _ in prompts]
kinds = {"fresh": 0, "continued": 0}
prefill_run = Scheduler._prefill_run
def spy(self, run, every_position):
    kinds["continued" if any(self._rows[row].fed for row, _ in run) else "fresh"] += 1
    return prefill_run(self, run, every_position)
Scheduler._prefill_run = spy
scheduler = Scheduler(engine, max_batch=128, max_len=160, prefill_chunk=4096, max_waiting=256)
handles = [scheduler.submit(p, max_new_tokens=n) for p, n in zip(prompts, outs)]
start = time.perf_counter()
while scheduler.step():
    pass
print(sys.argv[1], kinds, "decode steps", scheduler.stats.decode_steps, "prefill calls", scheduler.stats.prefill_calls,
      f"{time.perf_counter() - start:.1f} s")
