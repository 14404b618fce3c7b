"""`egmla bench grouped`: the grouped EG-MLA decode study (docs/design.md §4b, docs/grouped-decode.md), one
layer of paper-base.

Per text corpus (python-source, embedded English; a 32K byte-level BPE trained on each): the distinct-id
count per context length, then per (B, T) the decode-attention time of MHA SDPA, MLA kv64 on path kernel
(absorbed, Triton), EG-MLA kv64 on path kernel (fused rebuild, cached norm stats) and EG-MLA kv64 grouped
(+ launch settings of its kernels, + the per-step plan), all in one run (CUDA-graph replays, median of CUDA
events, L2 flushed read-only), and a bf16 check of grouped against the fused kernel (and the fp32 reference for B <= 32).
Each shape runs with equal lengths (every sequence holds T positions) and, with `--lengths equal,ragged`, a
ragged batch beside it (lengths spread from T/2 to T; MHA SDPA then runs the padded batch with a key mask).
With --control (default) the same-table control egmla-kv64-bias is timed on its 'absorbed' decode too.

    egmla bench grouped --ids .cache/bench_ids/ids.safetensors --out grouped.json
    egmla bench grouped --ids .cache/bench_ids/ids.safetensors --ids-only      # build the ids (CPU)
    egmla bench grouped --plot grouped.json docs/grouped-decode.png           # plot a result
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from egmla.bench.options import read_result
from egmla.configfile import int_list

STUDIED = ("mha", "mla-kv64", "egmla-kv64")  # egmla.variants names: the baseline, MLA, EG-MLA
CONTROL = "egmla-kv64-bias"  # issue 18's same-table control: its 'absorbed' decode also depends on the ids
# Launch settings of the grouped kernels timed beside the defaults: the up-projection summing W^V_h s per row (the
# default before the gate_dot form), the settings before 2026-12-03's sweep (two warps per launch, chunks of 32,
# 32 ids x 4 heads per absorb program, two row splits, per-row sums), chunks of 32 with today's other settings, key
# gathers, the one-launch fused kernel (egmla/kernels/studies/grouped_fused.py) and the persistent Gluon kernel
# (egmla/kernels/studies/grouped_gluon.py: its default, 8 warps capped at 128 registers, and its per-item work alone, a
# timing aid whose output is wrong), both measured slower: docs/grouped-decode.md.
LAUNCH_SETTINGS = {"grouped per-row sums": {"gate_dot": False, "num_warps": (4, 1, 2)},
                   "grouped t32": {"block_t": 32, "num_warps": (4, 2, 4)},
                   "grouped before": {"block_t": 32, "block_ids": 32, "heads_per_program": 4, "block_rows": 64,
                                      "num_warps": 2, "num_splits": 2, "gate_dot": False},
                   "grouped keygather": {"key_gather": True},
                   # A and S through memory in fp8 with a scale per (row, head): half their bytes, each value rounded
                   # once (not exact: docs/grouped-decode.md)
                   "grouped fp8 intermediates": {"intermediates": "fp8"},
                   "grouped fused u16 t64": {"kernel": "fused", "block_ids": 16, "block_t": 64},
                   "grouped gluon": {"kernel": "gluon"},
                   "grouped gluon 8 warps r128": {"kernel": "gluon", "warps": (2, 4), "max_registers": 128},
                   "grouped gluon items only": {"kernel": "gluon", "items_only": True},
                   # the three launches per slice of sequences, so that a slice's absorbed queries and value sums
                   # (the per-(sequence, id) intermediates) can stay in L2 between its launches
                   **{f"grouped slices {n}": {"batch_slice": n} for n in (4, 8, 16, 32)},
                   # Triton's pipelining stages per launch (absorb, attend, upproj): the attend launch's one-warp
                   # programs are limited by shared memory (8 KB each, ~21 per SM in Nsight Compute)
                   **{f"grouped stages {a}-{b}-{c}": {"num_stages": (a, b, c)}
                      for a, b, c in ((3, 1, 3), (3, 2, 3), (3, 3, 1), (3, 3, 2), (3, 3, 4), (2, 1, 2), (1, 1, 1))},
                   # one launch over ranges of grouped positions, its A and S rows read back from L2 by the program
                   # that wrote them (egmla/kernels/studies/grouped_scratch.py; 3.3-3.9x slower on an H200)
                   "grouped scratch r256": {"kernel": "scratch"},
                   "grouped scratch r128": {"kernel": "scratch", "range_len": 128},
                   "grouped scratch r512 w8": {"kernel": "scratch", "range_len": 512, "num_warps": 8},
                   # one fused CUDA launch (egmla/kernels/studies/grouped_decode_cuda.cu: mma.sync, two warps per head, W^K
                   # and W^V in shared memory, blocks of 16 ids absorbed, attended and up-projected on chip) over
                   # segments of N grouped positions, H heads per block
                   **{f"grouped cuda s{n} h{h}": {"kernel": "cuda", "segment": n, "heads_per_block": h}
                      for n, h in ((512, 4), (256, 4), (1024, 4), (256, 2), (512, 2))}}


# what --settings times by default (the slices and stages were measured once, 2026-12-04, and lost: opt-in; so were
# the fp8 intermediates, 2026-12-07)
DEFAULT_SETTINGS = tuple(k for k in LAUNCH_SETTINGS
                         if not k.startswith(("grouped slices", "grouped stages", "grouped scratch", "grouped cuda",
                                              "grouped fp8")))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="paper-base", help="model shapes")
    p.add_argument("--batch", default="1,8,32,128", help="comma-separated batch sizes")
    p.add_argument("--context", default="512,4096,16384", help="comma-separated context lengths")
    p.add_argument("--text", default="python-source,embedded", help="comma-separated corpora (token-id sources)")
    p.add_argument("--ids", metavar="SAFETENSORS", help="token ids per corpus: read if present, else built and saved here")
    p.add_argument("--ids-only", action="store_true", help="only build the token ids and print the distinct-id ratios")
    p.add_argument("--variant-shapes", default="32x4096,128x4096,32x16384,1x4096,8x4096",
                   help="BxT shapes where the grouped kernels' other launch settings are also timed ('' = none)")
    p.add_argument("--settings", default="",
                   help="comma-separated labels of the launch settings to time at --variant-shapes, or all, or none "
                        "(default: " + ", ".join(DEFAULT_SETTINGS) + "; also: "
                        + ", ".join(k for k in LAUNCH_SETTINGS if k not in DEFAULT_SETTINGS) + ")")
    p.add_argument("--in-step", type=int, default=0, metavar="N",
                   help="at --variant-shapes, also time MHA SDPA, MLA kv64 kernel-core and EG-MLA kv64 grouped-graph "
                        "as N layers of a step: N calls, each over its own cache and weights, in one CUDA graph; rows "
                        "'<path> in-step' give the time per layer (what a layer costs inside a step, where the graph's "
                        "fixed replay cost is paid once, not per layer). 0 = off; memory: N caches per path")
    p.add_argument("--lengths", default="equal,ragged",
                   help="comma-separated: equal (every sequence holds T positions), ragged (lengths spread from T/2 "
                        "to T; B = 1 is always equal); launch settings are timed at equal lengths only")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also time the same-table control {CONTROL} on its 'absorbed' decode (MLA's plus a term "
                        f"per distinct id)")
    p.add_argument("--pdl-ab", action="store_true",
                   help="at --variant-shapes, also time every Triton path with programmatic dependent launch turned "
                        "off (rows '<path> no-pdl'; egmla.kernels.pdl_setting): what PDL saves, in the same run (paths "
                        "whose kernels launch without it, the grouped and the control's, time the same code twice)")
    p.add_argument("--check", default="1,8,32",
                   help="batch sizes whose grouped output is also checked against the fp32 reference")
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke test (TRITON_INTERPRET=1, --preset tiny)")
    p.add_argument("--warmup-ms", type=float, default=20.0, help="warm-up per case")
    p.add_argument("--rep-ms", type=float, default=80.0, help="measured time per case (median of repetitions)")
    p.add_argument("--out", metavar="JSON", help="write rows and settings here")
    p.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="plot a result file (time vs context) and exit")
    p.add_argument("--markdown", nargs=2, metavar=("JSON", "MD"),
                   help="write a result file's table as Markdown (for docs/) and exit")
    p.add_argument("--traffic", nargs="+", metavar=("MD", "JSON"),
                   help="write, per result file, what the three grouped launches must move (the method's floor plus "
                        "the absorbed queries and value sums written and read back) beside the measured time and "
                        "issue 17's targets, as Markdown to MD, and exit (egmla/bench/grouped_traffic.py)")
    p.add_argument("--targets", nargs="+", metavar=("MD", "JSON"),
                   help="write issue 17's targets as read from one or more result files (a column each, newest "
                        "first) as Markdown to MD, and exit")


def main(args) -> int:
    if args.plot:
        plot(*args.plot)
    elif args.markdown:
        markdown(*args.markdown)
    elif args.traffic:
        if len(args.traffic) < 2:
            raise SystemExit("--traffic MD JSON [JSON ...]: name the Markdown file to write and at least one result "
                             "file")
        from egmla.bench.grouped_traffic import write_traffic

        write_traffic(args.traffic[0], args.traffic[1:], args.preset)
    elif args.targets:
        if len(args.targets) < 2:
            raise SystemExit("--targets MD JSON [JSON ...]: name the Markdown file to write and at least one result file")
        from egmla.bench.grouped_targets import write_targets

        write_targets(args.targets[0], args.targets[1:])
    else:
        run(args)
    return 0


def token_ids(args, texts, batch, length, vocab) -> dict:
    from safetensors.torch import load_file, save_file

    from egmla.bench.token_ids import text_token_ids

    path = Path(args.ids) if args.ids else None
    stored = load_file(path) if path and path.is_file() else {}
    ids = {}
    for text in texts:
        key = f"{text}@{vocab}"  # a BPE of the model's vocab size, trained on the corpus
        if key not in stored or stored[key].shape[0] < batch or stored[key].shape[1] < length:
            print(f"tokenizing {text} ({batch} x {length} ids, BPE of {vocab} ids trained on it) ...", flush=True)
            stored[key] = text_token_ids(batch, length, vocab, text)[0].contiguous()
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file(stored, str(path))
        ids[text] = stored[key]
    return ids


def check_grouped(config, batch, length, ids, device, dtype, with_reference, lengths=None) -> dict:
    """bf16 grouped output vs the fused rebuild kernel on the same inputs (both read the norm statistics the
    context carries, as from a cache), and vs the fp32 reference."""
    from egmla.bench.grouped import fp32_reference, grouped_inputs

    attn, args, groups = grouped_inputs(config, batch, length, ids, device, dtype, lengths)
    grouped = attn.attend_grouped(*args).float()
    fused = attn.attend_kernel(*args).float()
    out = {"rel_err_vs_fused": ((grouped - fused).norm() / fused.norm()).item(), "finite": bool(grouped.isfinite().all())}
    if with_reference:
        ref = fp32_reference(attn, args, groups)
        out["rel_err_vs_fp32_ref"] = ((grouped.view_as(ref) - ref).norm() / ref.norm()).item()
    return out


def bench_shape(args, text, tok, device, dtype, timing, with_variants: bool, with_reference: bool,
                lengths_kind: str = "equal") -> list[dict]:
    """Every path at one (B, T) with ids `tok` [B, T] of corpus `text`; MHA / MLA only for the first corpus.
    lengths_kind 'ragged': sequence lengths spread from T/2 to T (decode_cases.ragged_lengths)."""
    import torch

    from egmla.bench.decode import measure
    from egmla.bench.decode_cases import build_cases, ragged_lengths
    from egmla.bench.grouped import grouped_cases
    from egmla.kernels import pdl_enabled, pdl_setting
    from egmla.variants import variant_config

    batch, length = tok.shape
    lengths = ragged_lengths(batch, length, device) if lengths_kind == "ragged" else None
    mha, mla, egmla = (variant_config(name, args.preset, max_seq_len=length) for name in STUDIED)
    cases = []
    if text == args.text.split(",")[0].strip():  # MHA / MLA do not depend on the ids
        cases += build_cases(mha.variant_name(), mha, batch, length, tok, device, dtype, ("sdpa",), lengths)
        # kernel-core is MLA's decode as the model runs it at kv64 (W_UK / W_UV folded into the projections,
        # mla.MultiHeadLatentAttention.fold_absorption); kernel adds the two absorb einsums of the unfolded path
        cases += build_cases(mla.variant_name(), mla, batch, length, tok, device, dtype, ("kernel-core", "kernel"),
                             lengths)
    cases += build_cases(egmla.variant_name(), egmla, batch, length, tok, device, dtype, ("kernel",), lengths)
    if args.control:
        control = variant_config(CONTROL, args.preset, max_seq_len=length)
        cases += build_cases(control.variant_name(), control, batch, length, tok, device, dtype, ("absorbed",),
                             lengths)
    cases += grouped_cases(egmla, batch, length, tok, device, dtype,
                           variants=launch_settings(args) if with_variants else None, lengths=lengths)
    held = length * batch if lengths is None else int(lengths.sum())
    rows = []
    if with_variants and getattr(args, "in_step", 0) > 1:
        builders = {(egmla.variant_name(), "grouped-graph"): lambda: grouped_cases(
            egmla, batch, length, tok, device, dtype, ("grouped-graph",), lengths=lengths)}
        if text == args.text.split(",")[0].strip():
            builders = {(mha.variant_name(), "sdpa"): lambda: build_cases(
                            mha.variant_name(), mha, batch, length, tok, device, dtype, ("sdpa",), lengths),
                        (mla.variant_name(), "kernel-core"): lambda: build_cases(
                            mla.variant_name(), mla, batch, length, tok, device, dtype, ("kernel-core",), lengths),
                        **builders}
        for (variant, path), build in builders.items():
            try:
                cases.append(in_step_case(args.in_step, build))
            except torch.OutOfMemoryError as err:  # N caches of this shape do not fit: the row says so, the run goes on
                torch.cuda.empty_cache()
                rows.append({"text": text, "batch": batch, "context": length, "lengths": lengths_kind,
                             "positions_held": held, "variant": variant, "path": path + IN_STEP,
                             "skipped": f"out of memory building {args.in_step} layers: {str(err)[:100]}"})
                print(f"  {variant} {path}{IN_STEP}: skipped ({rows[-1]['skipped'][:60]})", flush=True)
    check = check_grouped(egmla, batch, length, tok, device, dtype, with_reference, lengths)
    pdl_ab = getattr(args, "pdl_ab", False) and with_variants and pdl_enabled(device)
    for case in cases:
        for pdl in (True, False) if pdl_ab and case.path not in ("sdpa", "grouped-plan") else (True,):
            row = {"text": text, "batch": batch, "context": length, "lengths": lengths_kind, "positions_held": held,
                   "variant": case.variant, "path": case.path + ("" if pdl else NO_PDL), **case.extra,
                   "pdl": pdl and pdl_enabled(device)}
            try:
                with pdl_setting(None if pdl else False):  # a graph keeps the launches of its capture
                    row.update(measure(case, device, timing) if case.path != "grouped-plan"
                               else wall_us(case.run, device))
            except torch.OutOfMemoryError as err:
                row["skipped"] = f"out of memory: {str(err)[:100]}"
            if case.path == "grouped" and pdl:
                row.update(check)
            if "layers_in_graph" in row and "median_us" in row:  # the graph ran N layers: per layer, as the others
                for key in ("median_us", "bytes", "flops", "floor_us"):
                    row[key] /= row["layers_in_graph"]
            rows.append(row)
            print(_line(row), flush=True)
    add_plan_share(rows, egmla.n_layers)
    del cases
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


IN_STEP = " in-step"  # suffix of the rows timed as N layers in one graph (--in-step)


def in_step_case(layers: int, build):
    """One case running `layers` independent copies of build()'s case (each its own module, cache and inputs, so
    none reads another's cache from L2) back to back, as the layers of a step; bytes and FLOPs of all of them."""
    from egmla.bench.decode_cases import Case

    copies = [build()[0] for _ in range(layers)]
    first = copies[0]

    def run():
        for case in copies:
            case.run()

    return Case(first.variant, first.path + IN_STEP, run, first.bytes * layers, first.flops * layers,
                {**first.extra, "layers_in_graph": layers})


def launch_settings(args) -> dict:
    """The LAUNCH_SETTINGS named by --settings (DEFAULT_SETTINGS where it is empty; 'all'; 'none'); an unknown label is
    an error naming the known ones."""
    labels = [s.strip() for s in getattr(args, "settings", "").split(",") if s.strip()]
    if labels == ["none"]:
        return {}
    if labels == ["all"]:
        return dict(LAUNCH_SETTINGS)
    labels = labels or list(DEFAULT_SETTINGS)
    unknown = [s for s in labels if s not in LAUNCH_SETTINGS]
    if unknown:
        raise SystemExit(f"--settings {','.join(unknown)}: unknown; choose from {', '.join(LAUNCH_SETTINGS)}")
    return {k: v for k, v in LAUNCH_SETTINGS.items() if k in labels}


PLAN_ROWS = ("grouped-plan", "grouped-plan-graph")
NO_PDL = " no-pdl"  # suffix of the rows timed without programmatic dependent launch (--pdl-ab)


def add_plan_share(rows: list[dict], n_layers: int) -> None:
    """One plan per step serves every layer: its share per layer belongs to each grouped row, the graph-captured
    plan's to 'grouped-graph' (as the engine runs both), the eager plan's (host sync) to the others."""
    plans = {r["path"]: r["median_us"] for r in rows if r["path"].removesuffix(NO_PDL) in PLAN_ROWS and "median_us" in r}
    for row in rows:
        path = row["path"].removesuffix(NO_PDL)
        if not path.startswith("grouped") or path in PLAN_ROWS or "median_us" not in row:
            continue
        suffix = row["path"][len(path):]  # a no-pdl row takes the no-pdl plan where there is one
        plan_path = "grouped-plan-graph" if path.removesuffix(IN_STEP) == "grouped-graph" else "grouped-plan"
        plan = plans.get(plan_path + suffix, plans.get(plan_path))
        if plan is not None:
            row["plan_us_per_layer"] = plan / n_layers
            row["median_us_with_plan"] = row["median_us"] + row["plan_us_per_layer"]


def run(args) -> list[dict]:
    import torch

    from egmla.bench.decode import copy_bandwidth_gbs
    from egmla.bench.decode_cases import kernel_paths_available
    from egmla.bench.grouped import distinct_ratios
    from egmla.config import preset

    launch_settings(args)  # an unknown label fails before any work
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"egmla bench grouped: --device {args.device}: no CUDA device here; on a CPU give "
                         f"--device cpu with TRITON_INTERPRET=1 and --preset tiny (a smoke test, small --batch and "
                         f"--context)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = int_list(args.batch, "--batch")
    contexts = int_list(args.context, "--context", example="512,4096")
    texts = [t.strip() for t in args.text.split(",")]
    base = preset(args.preset, attention="mha")
    ids = token_ids(args, texts, max(batches), max(contexts), base.vocab_size)
    rows, meta = [], {"ratios": {t: distinct_ratios(ids[t], contexts) for t in texts}}
    for text in texts:
        for r in meta["ratios"][text]:
            print(f"{text:>14} T={r['context']:>6}: distinct ids median {r['distinct_median']:.0f} "
                  f"(mean {r['distinct_mean']:.0f}), {r['positions_per_distinct']:.1f} positions per id", flush=True)
    if args.ids_only:
        return rows
    if kernel_paths_available(device):
        raise SystemExit(f"needs a CUDA GPU: {kernel_paths_available(device)}")
    meta.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                copy_gbs=copy_bandwidth_gbs(device), torch=torch.__version__, preset=args.preset,
                l2_bytes=torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else None)
    timing = argparse.Namespace(graph=True, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, hbm_gbs=3000.0, peak_tflops=782.0)
    checks = [int(b) for b in args.check.split(",") if b]
    shapes = sorted(((b, t) for t in contexts for b in batches), key=lambda s: (s != (32, 4096), s[1], s[0]))
    variant_shapes = {tuple(int(x) for x in s.split("x")) for s in args.variant_shapes.split(",") if s}
    kinds = [k.strip() for k in args.lengths.split(",") if k.strip()]
    if not kinds or set(kinds) - {"equal", "ragged"}:
        raise SystemExit(f"--lengths {args.lengths!r}: choose from equal, ragged (comma-separated)")
    for batch, length in shapes:  # the shape of the targets first
        for kind in kinds if batch > 1 else ["equal"]:
            for text in texts:
                rows += bench_shape(args, text, ids[text][:batch, :length].to(device), device, dtype, timing,
                                    (batch, length) in variant_shapes and kind == "equal", batch in checks, kind)
                _speedups(rows)
                meta["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
                if args.out:  # after every shape: a run cut short still leaves its rows
                    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(summary(rows))
    return rows


def wall_us(fn, device, repeats: int = 20) -> dict:
    """The per-step plan syncs with the host (its sizes), so it is timed as a decode step sees it: wall
    clock over back-to-back calls (no L2 flush or graph), median of 5 rounds."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    fn()
    rounds = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        rounds.append((time.perf_counter() - start) / repeats * 1e6)
    return {"median_us": sorted(rounds)[2], "timing": "wall clock, back-to-back calls"}


def _line(row) -> str:
    us = f"{row['median_us']:9.1f} µs" if "median_us" in row else row.get("skipped", "?")
    extra = f" err vs fused {row['rel_err_vs_fused']:.1e}" if "rel_err_vs_fused" in row else ""
    return (f"{row['text']:>14} B={row['batch']:>4} T={row['context']:>6} {row.get('lengths', 'equal'):>6} "
            f"{row['variant']:>12} {row['path']:<16} {us}{extra}")


def _speedups(rows) -> None:
    by = {(r["batch"], r["context"], r.get("lengths", "equal"), r["variant"], r["path"]): r.get("median_us")
          for r in rows}
    for r in rows:  # against the anchors of the same shape and the same lengths
        key = (r["batch"], r["context"], r.get("lengths", "equal"))
        if "median_us" not in r:
            continue
        step = IN_STEP if r["path"].endswith(IN_STEP) else ""  # in-step rows against the in-step anchors
        core = ("MLA kv64", "kernel-core" + step)
        mla = core if by.get(key + core) else ("MLA kv64", "kernel")  # (runs before 2026-12-03: no kernel-core)
        for name, ref in (("x_mha", ("MHA", "sdpa" + step)), ("x_mla", mla)):
            if by.get(key + ref):
                r[name] = by[key + ref] / r["median_us"]
                if "median_us_with_plan" in r:
                    r[name + "_with_plan"] = by[key + ref] / r["median_us_with_plan"]
        fused = next((x["median_us"] for x in rows if (x["batch"], x["context"], x.get("lengths", "equal"), x["text"],
                                                       x["path"]) == key + (r["text"], "kernel")
                      and x["variant"] == "EG-MLA kv64" and "median_us" in x), None)
        if fused and not step:
            r["x_fused"] = fused / r["median_us"]


def _ratio(row: dict, key: str) -> str:
    """A speedup cell: blank where the row has no such anchor (an in-step row has no fused-rebuild twin)."""
    return f"{row[key]:.2f}" if key in row else ""


def summary(rows) -> str:
    lines = [f"{'text':>14} {'B':>4} {'T':>6} {'lengths':>7} {'path':<26} {'µs':>9} {'x MHA':>7} {'x MLA':>7} "
             f"{'x fused':>8}"]
    for r in rows:
        if "median_us" in r:
            lines.append(f"{r['text']:>14} {r['batch']:>4} {r['context']:>6} {r.get('lengths', 'equal'):>7} "
                         f"{r['variant'] + ' ' + r['path']:<26} "
                         f"{r['median_us']:>9.1f} {r.get('x_mha', 0):>7.2f} {r.get('x_mla', 0):>7.2f} "
                         f"{_ratio(r, 'x_fused'):>8}")
    return "\n".join(lines)


def markdown(json_path: str, md_path: str) -> None:
    """The rows of a result file as one Markdown table (µs per layer and step, speedups in the same run)."""
    data = read_result(json_path, "--markdown")
    meta = data["meta"]
    lines = [f"<!-- generated by `egmla bench grouped --markdown {json_path} {md_path}`: edit the JSON's run, "
             f"not this table -->",
             f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}, copy bandwidth "
             f"{meta.get('copy_gbs') or 0:.0f} GB/s, run {meta.get('time', '?')}; paper-base, one layer, bf16, CUDA-graph "
             f"replays, L2 flushed. µs per layer and decode step; × = speedup over MHA SDPA / MLA kv64 (`kernel-core`, "
             f"its decode as the model runs it with W_UK / W_UV folded into the projections, where the run has "
             f"that row; `kernel` adds the two absorb einsums) / EG-MLA kv64 fused rebuild at the same (B, T).", "",
             "Grouped rows: `+ plan` adds the per-step plan's time divided by the layers it serves (the plan is "
             "built once per step for all of them): for `grouped-graph` (the kernels sized by host bounds, as "
             "generation's CUDA graphs run them) the graph-replayed plan, for the others the eager plan's wall "
             "clock with its host sync. Lengths `ragged`: sequence lengths spread from "
             "T/2 to T (MHA SDPA runs the padded batch with a key mask); speedups compare rows of the same lengths.",
             "",
             "| ids | B | T | lengths | variant and path | µs | × MHA | × MLA | × fused rebuild | µs + plan | "
             "× MHA + plan |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        if "median_us" in r and r["path"].removesuffix(NO_PDL) not in PLAN_ROWS:
            with_plan = (f"{r['median_us_with_plan']:.1f} | {r.get('x_mha_with_plan', 0):.2f}"
                         if "median_us_with_plan" in r else " | ")
            lines.append(f"| {r['text']} | {r['batch']} | {r['context']} | {r.get('lengths', 'equal')} | "
                         f"{r['variant']} {r['path']} | "
                         f"{r['median_us']:.1f} | {r.get('x_mha', 0):.2f} | {r.get('x_mla', 0):.2f} | "
                         f"{_ratio(r, 'x_fused')} | {with_plan} |")
    Path(md_path).write_text("\n".join(lines) + "\n")


def plot(json_path: str, png_path: str, batch: int = 32) -> None:
    """Decode time per layer vs context at one batch size: MHA, MLA absorbed, EG-MLA fused and grouped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_result(json_path, "--markdown")
    rows = [r for r in data["rows"] if r["batch"] == batch and "median_us" in r and r.get("lengths", "equal") == "equal"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series = [("MHA", "sdpa", "MHA SDPA"), ("MLA kv64", "kernel-core", "MLA kv64 absorbed (Triton, folded)"),
              ("EG-MLA kv64", "kernel", "EG-MLA kv64 fused rebuild (Triton)"),
              ("EG-MLA kv64", "grouped", "EG-MLA kv64 grouped (Triton)")]
    for text, style in (("python-source", "-"), ("embedded", "--")):
        for variant, path, label in series:
            pts = sorted((r["context"], r["median_us"]) for r in rows if (r["variant"], r["path"]) == (variant, path)
                         and (r["text"] == text or variant != "EG-MLA kv64"))
            if pts and (variant == "EG-MLA kv64" or text == "python-source"):
                ax.plot(*zip(*pts), style, marker="o", label=label + (f" [{text}]" if variant == "EG-MLA kv64" else ""))
    ax.set(xscale="log", yscale="log", xlabel="context T (tokens)", ylabel="µs per layer and decode step",
           title=f"paper-base, B={batch}, bf16, {data['meta'].get('device', '?')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)

