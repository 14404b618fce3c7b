"""The embedding sum at small batch: one launch against the split over ids (a few settings, not the whole sweep).

The script that wrote mass_split.json on one H100 (2026-12-06): `PYTHONPATH=. python
docs/bench/mass_split_h100/settings.py mass_split.json`. `egmla bench kernel-sweep --kernels mass` times every
setting (192 per shape) and writes the same rows."""
import json
import sys

import torch
from egmla.bench.kernel_sweep import sweep_mass, VOCAB
from egmla.bench.token_ids import text_token_ids
out = sys.argv[1]
ids, _ = text_token_ids(32, 2048, VOCAB, "embedded")
rows = []
configs = [(64, 64, 2, 3, 1), (64, 64, 2, 3, 0), (16, 64, 4, 3, 1), (16, 64, 4, 3, 0), (64, 32, 2, 3, 0),
           (32, 64, 4, 3, 0), (128, 64, 4, 3, 0)]
for batch in (1, 4, 8, 32):
    rows += sweep_mass(batch, 2048, "embedded", ids, torch.device("cuda"), configs=configs)
json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, open(out, "w"), indent=1)
for r in rows:
    print(r["batch"], r["block_e"], r["block_u"], r["num_warps"], r["splits"], r["splits_auto"], round(r.get("us", -1), 1))
