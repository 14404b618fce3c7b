"""Tables, JSON and the plot of `egmla bench decode` (rows are dicts, see egmla/bench/decode.py)."""
from __future__ import annotations

from pathlib import Path

BASELINE = ("MHA", "sdpa")
FOCUS = (32, 4096)  # the shape of docs/design.md §4 and of the targets


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_mha = MHA SDPA time / this time, for rows of the same (batch, context) in this run."""
    mha = {(r["batch"], r["context"]): r["median_us"] for r in rows
           if (r["variant"], r["path"]) == BASELINE and "median_us" in r}
    for row in rows:
        base = mha.get((row["batch"], row["context"]))
        if base and "median_us" in row:
            row["speedup_vs_mha"] = base / row["median_us"]


def _label(row: dict) -> str:
    return f"{row['variant']} {row['path']}"


def text_table(rows: list[dict], said: str | None = None, floor: bool = True) -> str:
    """The printed table. Rows skipped for the reason `said` (already printed once) are left out;
    floor=False leaves out the floor columns (a GPU's HBM and peak would put every CPU row at 0%)."""
    floor_head = f" {'floor µs':>9} {'% floor':>7}" if floor else ""
    width = max([26] + [len(_label(row)) for row in rows])  # ablations have longer names
    lines = [f"{'B':>4} {'T':>6}  {'variant / path':<{width}} {'µs':>9} {'GB/s':>7} {'TFLOP/s':>8}{floor_head} "
             f"{'x MHA':>6}"]
    for row in rows:
        head = f"{row['batch']:>4} {row['context']:>6}  {_label(row):<{width}}"
        if "median_us" not in row:
            if said is None or row.get("skipped") != said:
                lines.append(f"{head} skipped: {row.get('skipped', '?')}")
            continue
        floor_cells = f" {row['floor_us']:>9.1f} {row['pct_of_floor']:>6.0f}%" if floor else ""
        speedup = f"{row['speedup_vs_mha']:>6.2f}" if "speedup_vs_mha" in row else f"{'-':>6}"  # MHA not run
        lines.append(f"{head} {row['median_us']:>9.1f} {row['gbytes_per_s']:>7.0f} {row['tflops']:>8.2f}{floor_cells} "
                     f"{speedup}")
    return "\n".join(lines)


def _not_timed(row: dict) -> str:
    """A cell for a row without a time: an error or out of memory says so (the reason is in the JSON), anything
    else (e.g. the kernels unavailable on the device) is 'skipped'."""
    reason = row.get("skipped", "")
    return "error" if reason.startswith("error") else "out of memory" if "out of memory" in reason else "skipped"


def _speedup(row: dict, unit: str = "") -> str:
    """× MHA SDPA of the same run, or '–' where MHA SDPA was not timed at that shape (never a 0.00)."""
    return f"{row['speedup_vs_mha']:.2f}{unit}" if "speedup_vs_mha" in row else "–"


def _eager_mark(row: dict, meta: dict) -> str:
    """'†' on a row timed eagerly in a run of CUDA-graph replays (its capture failed: the reason is in its 'timing'
    field), whose time then includes the host's launches and syncs that the other rows' times exclude."""
    graphs = "CUDA-graph replays" in meta.get("timing", "")
    return "†" if graphs and str(row.get("timing", "cuda graph")).startswith("eager") else ""


def markdown(rows: list[dict], meta: dict) -> str:
    """One table per context (µs and speedup over MHA per batch), then the detail of the focus shape."""
    copy = meta.get("measured_copy_gbs")
    out = [f"Device: {meta['device']}, {meta['dtype']}, preset {meta['preset']}, torch {meta['torch']}, "
           f"triton {meta['triton']}; token ids: {meta['token_ids']['source']} text; {meta['timing']}; "
           f"floor = max(bytes / {meta['hbm_gbs_for_floor']:.0f} GB/s, FLOPs / {meta['peak_tflops_for_floor']:.0f} "
           f"TFLOP/s); " + (f"measured copy bandwidth {copy:.0f} GB/s." if copy else "copy bandwidth not measured."),
           ""]
    batches = sorted({r["batch"] for r in rows})
    labels = list(dict.fromkeys(_label(r) for r in rows))
    for context in sorted({r["context"] for r in rows}):
        out += [f"T = {context}: median µs per layer (speedup over MHA SDPA)", "",
                "| variant / path | " + " | ".join(f"B={b}" for b in batches) + " |",
                "|---|" + "---:|" * len(batches)]
        for label in labels:
            cells = []
            for batch in batches:
                row = next((r for r in rows if _label(r) == label and r["batch"] == batch and r["context"] == context), None)
                cells.append("—" if row is None else _not_timed(row) if "median_us" not in row else
                             f"{row['median_us']:.1f}{_eager_mark(row, meta)} ({_speedup(row, '×')})")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    focus = [r for r in rows if (r["batch"], r["context"]) == FOCUS and "median_us" in r]
    if focus:
        out += [f"B = {FOCUS[0]}, T = {FOCUS[1]}: against the floor", "",
                "| variant / path | µs | GB/s | TFLOP/s | floor µs | % of floor | × MHA |", "|---|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {_label(r)} | {r['median_us']:.1f}{_eager_mark(r, meta)} | {r['gbytes_per_s']:.0f} | "
                f"{r['tflops']:.2f} | {r['floor_us']:.1f} | {r['pct_of_floor']:.0f}% | {_speedup(r)} |" for r in focus]
    if any(_eager_mark(r, meta) for r in rows if "median_us" in r):
        out += ["", "† timed eagerly, not as a CUDA-graph replay (the row's capture failed; its JSON 'timing' says "
                "why): its time includes the host's launches and syncs, which the other rows' times exclude."]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], meta: dict, path: str) -> None:
    """Left: µs vs context at the focus batch; right: µs vs batch at the focus context (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "median_us" in r]
    batches, contexts = sorted({r["batch"] for r in timed}), sorted({r["context"] for r in timed})
    batch = FOCUS[0] if FOCUS[0] in batches else batches[-1]
    context = FOCUS[1] if FOCUS[1] in contexts else contexts[-1]
    # colour = variant, line and marker = path, so 16 lines stay readable
    variants = list(dict.fromkeys(r["variant"] for r in timed))
    paths = list(dict.fromkeys(r["path"] for r in timed))
    colours = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    styles = {p: (["-", "--", ":", "-."][i % 4], "osD^vx*"[i % 7]) for i, p in enumerate(paths)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, (key, fixed_key, fixed) in zip(axes, [("context", "batch", batch), ("batch", "context", context)]):
        for variant, bench_path in dict.fromkeys((r["variant"], r["path"]) for r in timed):
            points = sorted((r[key], r["median_us"]) for r in timed
                            if (r["variant"], r["path"]) == (variant, bench_path) and r[fixed_key] == fixed)
            if points:
                line, marker = styles[bench_path]
                ax.plot(*zip(*points), line, marker=marker, color=colours[variant], label=f"{variant} {bench_path}")
        ax.set(xscale="log", yscale="log", xlabel=key, ylabel="µs per layer (median)",
               title=f"decode attention, {fixed_key} = {fixed}")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"egmla bench decode: {meta['device']}, {meta['dtype']}, {meta['preset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[dict], meta: dict, json_path: str | None, png_path: str | None,
                  md_path: str | None, quiet: bool = False) -> None:
    from egmla.runs import atomic_write_bytes, atomic_write_json

    for path in (json_path, png_path, md_path):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if json_path:
        atomic_write_json(json_path, {**meta, "rows": rows})
        if not quiet:
            print(f"wrote {json_path}")
    if md_path:
        atomic_write_bytes(md_path, markdown(rows, meta).encode())
        print(f"wrote {md_path}")
    if png_path and any("median_us" in r for r in rows):
        plot(rows, meta, png_path)
        print(f"wrote {png_path}")
