"""Host µs of the small operations a scheduler decode iteration issues, with the GPU busy (a long kernel queued)."""
import statistics, time, torch
dev = torch.device("cuda")
big = torch.randn(8192, 8192, device=dev)
logits = torch.randn(128, 32768, device=dev, dtype=torch.bfloat16)
nxt = torch.zeros(256, dtype=torch.long, device=dev); tokens = torch.zeros(128, 1, dtype=torch.long, device=dev)
n_new = torch.zeros(128, dtype=torch.long, device=dev)
ids = logits.argmax(-1)
pinned = torch.empty(128, dtype=torch.long, pin_memory=True)
rows = list(range(128))
ops = {
    "torch.tensor(128 ints)": lambda: torch.tensor(rows, dtype=torch.long),
    "torch.tensor(...).pin_memory()": lambda: torch.tensor(rows, dtype=torch.long).pin_memory(),
    "torch.empty(128, pin_memory=True)": lambda: torch.empty(128, dtype=torch.long, pin_memory=True),
    "pinned[:] = torch.tensor(list)": lambda: pinned.copy_(torch.tensor(rows, dtype=torch.long)),
    "H2D copy_ from pinned, non_blocking": lambda: n_new.copy_(pinned, non_blocking=True),
    "D2H copy_ into pinned, non_blocking": lambda: pinned.copy_(ids, non_blocking=True),
    "Event() + record()": lambda: torch.cuda.Event().record(),
    "event.record() (kept Event)": (lambda e=torch.cuda.Event(): e.record()),
    "logits.argmax(-1)": lambda: logits.argmax(-1),
    "nxt[0:128] = ids": lambda: nxt.__setitem__(slice(0, 128), ids),
    "tokens[:128, 0].copy_(nxt[:128])": lambda: tokens[:128, 0].copy_(nxt[:128]),
    "logits[:128]": lambda: logits[:128],
}
for name, op in ops.items():
    times = []
    for rep in range(200):
        if rep % 50 == 0:
            torch.cuda.synchronize(); big @ big  # keep the GPU busy for ~1 ms: the ops queue behind it
        t = time.perf_counter(); op(); times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    print(f"{name:40s} median {1e6*statistics.median(times):7.1f} µs   p90 {1e6*sorted(times)[180]:7.1f}")
