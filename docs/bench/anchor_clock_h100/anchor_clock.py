"""The anchor's step clock, A/B: CUDA events (egmla.bench.hf_anchors' default since 2026-12-06) against a device
sync before sampling (the clock of the tables committed before), alternated events, sync, sync, events per batch;
transformers' LlamaForCausalLM at paper-base, bf16, random 2,048-token prompts, 16 new tokens, 2 timed repeats.

    python docs/bench/anchor_clock_h100/anchor_clock.py OUT.json     (a CUDA machine, from the repository root)
"""
import json
import statistics
import sys

import torch

from egmla.bench.hf_anchors import anchor_model, time_anchor
from egmla.config import preset
from egmla.variants import variant_config

config = variant_config("mha", preset("paper-base"))
model = anchor_model("llama", config, 2048 + 16, "cuda", torch.bfloat16)
generator = torch.Generator().manual_seed(0)
rows = []
for batch in (1, 32, 128):
    prompts = torch.randint(0, config.vocab_size, (batch, 2048), generator=generator).tolist()
    for sync in (False, True, True, False):
        timed = time_anchor(model, prompts, 16, 2, sync_clock=sync)
        rows.append({"batch": batch, "clock": "sync" if sync else "events", **timed})
        print(rows[-1], flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=1)
print("| batch | clock | step ms (median of its 2 passes) | prefill ms |")
for batch in (1, 32, 128):
    for clock in ("events", "sync"):
        passes = [row for row in rows if row["batch"] == batch and row["clock"] == clock]
        print(f"| {batch} | {clock} | {statistics.median(r['step_ms_median'] for r in passes):.3f} | "
              f"{statistics.median(r['prefill_ms'] for r in passes):.1f} |")
