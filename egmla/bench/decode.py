"""`egmla bench decode`: one layer's decode-attention time per variant and path, against its floor.

For every (batch B, context T): a full cache of T positions per sequence (token ids from real text),
one new query token per sequence; each case (egmla/bench/decode_cases.py) is timed as the median of
many repetitions (CUDA: CUDA events, L2 flushed before each repetition by a read-only pass).
Reported per case: median µs, achieved GB/s and TFLOP/s on the bytes/FLOPs the path must spend, the
floor max(bytes / HBM, FLOPs / peak) of docs/design.md §4 and the fraction of it reached, and the speedup
over MHA SDPA measured in the same run. Configurations that do not fit in memory are skipped with a note.

    egmla bench decode --out decode.json --plot decode.png        # full table (GPU, a few minutes)
    egmla bench decode --quick                                    # B=32, T=4096 only
    egmla bench decode --device cpu --preset tiny --batch 2 --context 64   # seconds, any machine
"""
from __future__ import annotations

import argparse
import statistics
import time

from egmla.configfile import int_list

HBM_GBS, PEAK_TFLOPS = 3000.0, 782.0  # docs/design.md §4: measured on an H100 80GB HBM3 (copy, 8192^3 bf16 matmul)
DEFAULT_VARIANTS = "mha,gqa4,mla-kv64,mla-kv256,egmla-kv64"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="paper-base", help="model shapes (tiny, paper-base, paper-1b)")
    parser.add_argument("--batch", default="1,8,32,128", help="comma-separated batch sizes B")
    parser.add_argument("--context", default="512,4096,16384", help="comma-separated cached context lengths T")
    parser.add_argument("--quick", action="store_true", help="only B=32, T=4096 (overrides --batch/--context)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="comma-separated variant names from egmla.variants, or 'all'")
    parser.add_argument("--paths", default="all", help="comma-separated subset of paths (sdpa, naive, absorbed, "
                        "gate-table, kernel, kernel-core, kernel+stats, grouped, grouped-plan, grouped-graph, "
                        "grouped-plan-graph)")
    parser.add_argument("--text", default="embedded", choices=["embedded", "python-source"],
                        help="real text the token ids come from (EG-MLA's gate-row traffic depends on it)")
    parser.add_argument("--device", default="auto", help="cuda, cpu, ...; auto = cuda if available")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="auto = bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up time per case")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="measured time per case (median of the repetitions)")
    parser.add_argument("--hbm-gbs", type=float, default=HBM_GBS,
                        help="HBM bandwidth for the floor, GB/s (the printed table shows the floor on CUDA, or "
                             "on another device when this or --peak-tflops is given)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="matmul peak for the floor, TFLOP/s")
    parser.add_argument("--no-graph", dest="graph", action="store_false",
                        help="time eager calls (host launch overhead included) instead of CUDA-graph replays "
                             "(the default: graph replays)")
    parser.add_argument("--out", metavar="JSON", help="write every row and the run's settings here")
    parser.add_argument("--plot", metavar="PNG", help="plot time vs context and vs batch here")
    parser.add_argument("--markdown", metavar="MD", help="write the tables as Markdown here (for docs/)")


def median_us(fn, device, warmup_ms: float, rep_ms: float) -> float:
    """Median time of fn() in µs: on CUDA, CUDA events around each repetition with L2 flushed before it
    by a read-only pass (cuda_median_us); elsewhere wall clock."""
    if device.type == "cuda":
        return cuda_median_us(fn, warmup_ms, rep_ms)
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < rep_ms / 1e3 and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


FLUSH_BYTES = 512 << 20  # several times any GPU's L2 (50 MB on H100, 60 MB on H200)
_flush_buffers: dict = {}


def cuda_median_us(fn, warmup_ms: float, rep_ms: float) -> float:
    """do_bench's method (warm-up, then events around each repetition) with a read-only L2 flush: summing a
    large buffer evicts L2 with clean lines. triton.testing.do_bench zero-fills its buffer instead, which
    leaves dirty lines in L2 that the timed kernel then pays to write back, a bias that grows as reads shrink."""
    import torch

    device = torch.cuda.current_device()
    if device not in _flush_buffers:
        buffer = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
        _flush_buffers[device] = (buffer, torch.empty((), dtype=torch.float32, device="cuda"))
    buffer, total = _flush_buffers[device]
    fn()
    torch.cuda.synchronize()
    probe_start, probe_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe_start.record()
    for _ in range(5):
        fn()
    probe_end.record()
    torch.cuda.synchronize()
    estimate_ms = max(probe_start.elapsed_time(probe_end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    repeats = max(5, min(1000, int(rep_ms / estimate_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        torch.sum(buffer, dim=0, out=total)  # the flush: reads only
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends))


def graphed(fn):
    """fn captured in a CUDA graph: replays cost no host launch overhead, so events time the device
    work alone (as a decode loop under CUDA graphs runs). Returns (replay, None) or (fn, why not)."""
    import torch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(), fn()  # compile kernels and settle the allocator outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, None
    except RuntimeError as err:  # not capturable: time it eagerly and say so
        torch.cuda.synchronize()
        return fn, f"eager (graph capture failed: {str(err)[:100]})"


def copy_bandwidth_gbs(device) -> float | None:
    """Device-to-device copy of 1 GiB, bytes read + written per second (the docs/design.md §4 ceiling)."""
    import torch

    if device.type != "cuda":
        return None
    src = torch.empty(1 << 29, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src), device, 25, 200)
    return 2 * src.numel() * 2 / us / 1e3


def resolve(args):
    import torch

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = names[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    batches, contexts = ([32], [4096]) if args.quick else (
        int_list(args.batch, "--batch"), int_list(args.context, "--context", example="512,4096"))
    return device, dtype, batches, contexts


def selected(names: str, known, what: str) -> list[str]:
    if names == "all":
        return list(known)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    for name in chosen:
        if name not in known:
            raise ValueError(f"--{what} {name!r}: choose from {', '.join(known)}")
    return chosen


def main(args) -> int:
    import torch
    from tqdm import tqdm

    from egmla.bench import decode_report
    from egmla.bench.decode_cases import PATH_NOTES, kernel_paths_available
    from egmla.bench.token_ids import text_token_ids
    from egmla.config import preset
    from egmla.variants import labels, select

    device, dtype, batches, contexts = resolve(args)
    variants = select(args.variants)
    names = labels(variants, args.preset)
    paths = selected(args.paths, PATH_NOTES, "paths")
    ids_all, id_note = text_token_ids(max(batches), max(contexts), preset(args.preset).vocab_size, args.text)
    no_kernel = kernel_paths_available(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"egmla bench decode: {device_name}, {dtype}, preset {args.preset}, ids from {args.text} text"
          + (f", copy {copy_gbs:.0f} GB/s" if copy_gbs else "") + (f"; kernel paths skipped: {no_kernel}" if no_kernel else ""))
    meta = {"benchmark": "decode", "device": device_name, "dtype": str(dtype).replace("torch.", ""),
            "preset": args.preset, "torch": torch.__version__, "triton": _triton_version(),
            "hbm_gbs_for_floor": args.hbm_gbs, "peak_tflops_for_floor": args.peak_tflops,
            "measured_copy_gbs": copy_gbs, "token_ids": id_note, "path_notes": PATH_NOTES,
            "timing": (f"median of repetitions over {args.rep_ms} ms after {args.warmup_ms} ms warm-up, "
                       f"{'CUDA-graph replays, ' if args.graph and device.type == 'cuda' else ''}"
                       f"{'CUDA events, L2 flushed (read-only) before each' if device.type == 'cuda' else 'wall clock'}"),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows = []
    jobs = [(t, b, v) for t in contexts for b in batches for v in variants]
    for max_len, batch, variant in tqdm(jobs, desc="decode bench", unit="config", disable=None):
        rows += run_config(args, variant, names[variant.name], batch, max_len, ids_all[:batch, :max_len].to(device),
                           device, dtype, paths, no_kernel)
        if args.out:  # partial results survive an interrupted run
            decode_report.write_outputs(rows, {**meta, "complete": False}, args.out, None, None, quiet=True)
    decode_report.add_ratios(rows)
    own_floor = device.type == "cuda" or (args.hbm_gbs, args.peak_tflops) != (HBM_GBS, PEAK_TFLOPS)
    print(decode_report.text_table(rows, said=no_kernel, floor=own_floor))  # the kernels' skip is in the header
    decode_report.write_outputs(rows, {**meta, "complete": True}, args.out, args.plot, args.markdown)
    return 0


def run_config(args, variant, label: str, batch: int, max_len: int, token_ids, device, dtype, paths,
               no_kernel) -> list[dict]:
    """Rows of one (variant, B, T): every wanted path timed, or skipped with the reason."""
    import torch

    from egmla.bench.decode_cases import bench_paths, build_cases
    from egmla.bench.token_ids import distinct_id_stats

    config = variant.config(args.preset, max_seq_len=max(max_len, 2))
    common = {"variant": label, "name": variant.name, "batch": batch, "context": max_len,
              **distinct_id_stats(token_ids)}
    wanted = [p for p in bench_paths(config) if p in paths]
    rows = []
    if no_kernel:  # the Triton paths, and the grouped plan (the kernels' layout), cannot run here
        triton = {p for p in wanted if p.startswith("kernel") or p in ("grouped-plan", "grouped-plan-graph")}
        rows += [{**common, "path": p, "skipped": no_kernel} for p in wanted if p in triton]
        wanted = [p for p in wanted if p not in triton]
    try:
        cases = build_cases(label, config, batch, max_len, token_ids, device, dtype, tuple(wanted))
    except torch.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return rows + [{**common, "path": p, "skipped": f"out of memory building inputs: {str(err)[:120]}"}
                       for p in wanted]
    for case in cases:
        row = {**common, "path": case.path, **case.extra}
        try:
            row.update(measure(case, device, args))
        except torch.OutOfMemoryError as err:
            row["skipped"] = f"out of memory: {str(err)[:120]}"
        except Exception as err:  # one broken path must not lose the whole table: record it, visibly
            row["skipped"] = f"error: {type(err).__name__}: {str(err)[:200]}"
            print(f"{label} {case.path} B={batch} T={max_len}: {row['skipped']}")
        rows.append(row)
    del cases
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure(case, device, args) -> dict:
    run, mode = (graphed(case.run) if device.type == "cuda" and args.graph else
                 (case.run, "eager" if device.type == "cuda" else "wall clock"))
    us = median_us(run, device, args.warmup_ms, args.rep_ms)
    floor_us = max(case.bytes / (args.hbm_gbs * 1e3), case.flops / (args.peak_tflops * 1e6))
    return {"median_us": us, "bytes": case.bytes, "flops": case.flops, "gbytes_per_s": case.bytes / us / 1e3,
            "tflops": case.flops / us / 1e6, "floor_us": floor_us, "pct_of_floor": 100 * floor_us / us,
            "timing": mode or "cuda graph"}


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__
