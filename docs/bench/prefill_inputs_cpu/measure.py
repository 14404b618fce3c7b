"""Host time of one prefill call's inputs on the scheduler's thread, the way before 2026-12-07's change and after:

    OMP_NUM_THREADS=1 python docs/bench/prefill_inputs_cpu/measure.py [--rows 32] [--repeats 200]

Before: per row, the prompt's list slice as a tensor (`long_tensor`) written into a zero tensor, its count written
into another, and the row's cached prefix as a new tuple of the list. After (`Scheduler._prefill_run`): per row, a
slice of the prompt's `array('q')` made at submission, all rows copied into one buffer (`padded_rows`), the counts in
one `long_tensor`, the prefix a slice of the prompt's tuple. Prompts of 512-1,024 random ids, the first wave of
`egmla bench serve --prompt-len 1024` (a 32,768-token budget takes 32 of them). Both ways must give equal tensors.
Prints the median of `--repeats` timings of each, alternated.
"""
import argparse
import array
import random
import statistics
import time

import torch

from egmla.infer.sampling import long_tensor, padded_rows


def before(prompts: list[list[int]], width: int):
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    n_new = torch.zeros(len(prompts), dtype=torch.long)
    prefixes = []
    for i, ids in enumerate(prompts):
        tokens[i, :len(ids)] = long_tensor(ids[0:len(ids)])
        n_new[i] = len(ids)
        prefixes.append(tuple(ids[:len(ids)]))
    return tokens, n_new, prefixes


def after(prompts: list[tuple[tuple, array.array]], width: int):
    chunks, counts, prefixes = [], [], []
    for key, ids in prompts:
        chunks.append(ids[0:len(ids)])
        counts.append(len(ids))
        prefixes.append(key[:len(ids)])
    return padded_rows(chunks, width), long_tensor(counts), prefixes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(0)
    lists = [[rng.randrange(32768) for _ in range(rng.randint(512, 1024))] for _ in range(args.rows)]
    made = [(tuple(ids), array.array("q", ids)) for ids in lists]  # at submission, on the submitting thread
    width = max(map(len, lists))
    old, new = before(lists, width), after(made, width)
    assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1]) and old[2] == new[2]
    times = {"before": [], "after": []}
    for _ in range(args.repeats):
        for name, work, data in (("before", before, lists), ("after", after, made)):
            start = time.perf_counter()
            work(data, width)
            times[name].append(time.perf_counter() - start)
    b, a = statistics.median(times["before"]) * 1e6, statistics.median(times["after"]) * 1e6
    print(f"{args.rows} prompts of 512-1,024 ids, torch {torch.__version__}, medians of {args.repeats}: "
          f"before {b:.0f} µs, after {a:.0f} µs, {b / a:.1f}x less host time")


if __name__ == "__main__":
    main()
