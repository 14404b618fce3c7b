"""Training-speed benchmark, same as `egmla bench train` (see egmla/bench/train.py for the options).
Defaults: MHA, MLA kv64 and EG-MLA kv64 at paper-base, bf16 autocast, torch.compile, the same batch of
16 x 1024 real-text tokens for every variant; step time, tokens/s and MFU (issue targets on an H100:
MFU >= 40% for MHA, EG-MLA step <= 1.10x MLA's).

    python benchmarks/bench_train.py --out bench_train.json --markdown bench_train.md     # GPU, ~3 min
    python benchmarks/bench_train.py --device cpu --preset tiny --batch 2 --seq-len 64 --steps 2 --no-compile
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egmla.bench import train  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(parser)
    sys.exit(train.main(parser.parse_args()))
