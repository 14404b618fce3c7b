"""`egmla bench decode` end to end at tiny shapes on CPU: every variant and path produces a row with
consistent figures, the printed table carries no noise, the JSON/Markdown/PNG outputs are written,
and bad options fail clearly."""
import json

import pytest

from egmla.cli import main as egmla_main


def test_bench_decode_tiny_cpu(tmp_path, capfd):
    out, md, png = tmp_path / "decode.json", tmp_path / "decode.md", tmp_path / "decode.png"
    code = egmla_main(["bench", "decode", "--device", "cpu", "--preset", "tiny", "--batch", "2", "--context", "24",
                       "--rep-ms", "1", "--warmup-ms", "1", "--out", str(out), "--markdown", str(md),
                       "--plot", str(png)])
    assert code == 0
    printed = capfd.readouterr().out.splitlines()
    assert "" not in printed and "% floor" not in printed[1]  # no blank lines; no GPU floor for a CPU
    result = json.loads(out.read_text())
    rows = result["rows"]
    expected = {("MHA", "sdpa"), ("GQA-4", "sdpa")} | {(f"MLA kv{r}", p) for r in (64, 256) for p in (
        "naive", "absorbed", "kernel", "kernel-core")} | {("EG-MLA kv64", p) for p in (
        "naive", "gate-table", "kernel", "kernel+stats", "grouped", "grouped-plan", "grouped-graph",
            "grouped-plan-graph")}
    assert {(r["variant"], r["path"]) for r in rows} == expected
    timed = [r for r in rows if "median_us" in r]
    assert len(printed) == 2 + len(timed) + 3  # header, column names, timed rows (a skip is said in the header), files
    from egmla.kernels import kernel_unavailable_reason

    if kernel_unavailable_reason("cpu") is None:  # the interpreter runs the Triton paths too
        assert len(timed) == len(rows)
    for row in timed:
        assert row["median_us"] > 0 and row["floor_us"] > 0 and row["bytes"] > 0
        assert row["pct_of_floor"] == pytest.approx(100 * row["floor_us"] / row["median_us"])
    mha = next(r for r in timed if r["variant"] == "MHA")
    assert mha["speedup_vs_mha"] == pytest.approx(1.0)
    egmla_rows = [r for r in rows if r["variant"].startswith("EG-MLA")]
    assert all(r["distinct_ids_batch"] <= 2 * 24 for r in egmla_rows)
    assert result["token_ids"]["source"] == "embedded"
    assert "| MHA sdpa |" in md.read_text() and png.stat().st_size > 0


def test_text_table_says_a_shared_skip_reason_once_and_the_floor_only_when_asked():
    from egmla.bench.decode_report import text_table

    timed = {"batch": 2, "context": 24, "variant": "MHA", "path": "sdpa", "median_us": 50.0, "gbytes_per_s": 1.0,
             "tflops": 0.0, "floor_us": 0.5, "pct_of_floor": 1.0, "speedup_vs_mha": 1.0}
    skipped = [{"batch": 2, "context": 24, "variant": "MLA kv64", "path": p, "skipped": "no CUDA"}
               for p in ("kernel", "kernel-core")]
    out_of_memory = {**skipped[0], "skipped": "out of memory"}
    rows = [timed, *skipped, out_of_memory]
    assert text_table(rows).count("skipped: no CUDA") == 2 and "% floor" in text_table(rows)
    lines = text_table(rows, said="no CUDA", floor=False).splitlines()
    assert len(lines) == 3 and lines[2].endswith("skipped: out of memory")  # another reason is still shown
    assert "floor" not in lines[0] and lines[1].split()[-4:] == ["50.0", "1", "0.00", "1.00"]
    del timed["speedup_vs_mha"]  # a run without MHA: no ratio, not 0.00
    assert text_table([timed], floor=False).splitlines()[1].split()[-4:] == ["50.0", "1", "0.00", "-"]


def test_bench_decode_rejects_unknown_variant(capsys):
    assert egmla_main(["bench", "decode", "--device", "cpu", "--variants", "mla-kv32"]) == 2
    assert "--variants: variant 'mla-kv32': unknown" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["egmla-kv16", "egmla-kv64-add", "egmla-kv64-no-norm"])
def test_bench_norm_stats_are_the_reference_statistics(name):
    """The statistics a 'kernel' or 'grouped' cache holds, as the benchmark fills it (Triton pass on CUDA)."""
    import torch

    from egmla.bench.decode_cases import one_layer
    from egmla.bench.grouped import norm_stats
    from egmla.kernels.egmla_decode_ref import layernorm_stats
    from egmla.variants import variant_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = variant_config(name, "tiny", max_seq_len=24)
    attn = one_layer(config, "kernel", device, torch.float32)
    torch.manual_seed(2)
    latent = torch.randn(2, 24, config.kv_lora_rank, device=device)
    token_ids = torch.randint(0, config.vocab_size, (2, 24), device=device, dtype=torch.int32)
    expected = layernorm_stats(latent, attn.gate(token_ids), attn.wkv_b.weight, getattr(attn.gate_norm, "eps", 0.0),
                               attn.gate_op, attn.norm_kind)
    torch.testing.assert_close(norm_stats(attn, latent, token_ids), expected, rtol=1e-4, atol=1e-5)


def test_grouped_cases_are_built_on_the_model_path_and_named_by_their_variant():
    import torch

    from egmla.bench.grouped import grouped_cases, grouped_inputs
    from egmla.variants import variant_config

    config = variant_config("egmla-kv16", "tiny", max_seq_len=24)
    token_ids = torch.randint(0, config.vocab_size, (2, 24), dtype=torch.int32)
    attn, _, _ = grouped_inputs(config, 2, 24, token_ids, "cpu", torch.float32)
    assert attn.decode_path == "grouped" and attn.gate_table is not None
    cases = grouped_cases(config, 2, 24, token_ids, "cpu", torch.float32, paths=("grouped",))
    assert [(case.variant, case.path) for case in cases] == [("EG-MLA kv16", "grouped")]


def test_ragged_lengths_spread_from_half_to_full_and_are_checked():
    import torch

    from egmla.bench.decode_cases import last_positions, ragged_lengths

    assert ragged_lengths(5, 100).tolist() == [50, 62, 75, 87, 100]
    assert ragged_lengths(1, 100).tolist() == [100] and ragged_lengths(2, 7).tolist() == [3, 7]
    with pytest.raises(ValueError, match=r"lengths=\[0, 4\]: expected 2 lengths in \[1, 4\]"):
        last_positions(2, 4, torch.tensor([0, 4]), "cpu")


def test_ragged_cases_read_only_the_positions_each_sequence_holds():
    """A ragged batch (egmla bench grouped --lengths ragged): the grouped and fused kernels' output for sequence b
    depends only on its first lengths[b] positions (the padding past them is poisoned with NaN), equals the same
    sequence run alone at its own length, and the bytes count the positions held, not the padding."""
    import torch

    from egmla.bench.decode_cases import build_cases, ragged_lengths
    from egmla.bench.grouped import grouped_inputs
    from egmla.variants import variant_config

    config = variant_config("egmla-kv16", "tiny", max_seq_len=24)
    torch.manual_seed(3)
    token_ids = torch.randint(0, 40, (3, 24), dtype=torch.int32)  # few ids: repeated, as the grouping needs
    lengths = ragged_lengths(3, 24)
    attn, args, groups = grouped_inputs(config, 3, 24, token_ids, "cpu", torch.float32, lengths)
    assert groups.lengths.tolist() == lengths.tolist()
    attn.grouped_backend = "kernel"  # on the CPU: Triton's interpreter (the PyTorch equations mask the padding)
    q_nope, q_pe, latent, k_pe, ids, ctx = args
    for b, length in enumerate(lengths.tolist()):  # poison the padding: a path that reads it returns NaN
        latent[b, length:], k_pe[b, length:] = float("nan"), float("nan")
        ctx.kv_ln_stats[b, length:] = float("nan")
    ragged = attn.attend_grouped(*args)
    assert ragged.isfinite().all()
    torch.testing.assert_close(attn.attend_kernel(*args), ragged, rtol=1e-4, atol=1e-5)  # the fused rebuild kernel
    for b, length in enumerate(lengths.tolist()):
        _, alone, _ = grouped_inputs(config, 1, length, token_ids[b:b + 1, :length], "cpu", torch.float32)
        alone = (q_nope[b:b + 1], q_pe[b:b + 1], latent[b:b + 1, :length].contiguous(),
                 k_pe[b:b + 1, :length].contiguous(), alone[4], alone[5])
        alone[5].kv_ln_stats.copy_(ctx.kv_ln_stats[b:b + 1, :length])
        torch.testing.assert_close(attn.attend_grouped(*alone), ragged[b:b + 1], rtol=1e-4, atol=1e-5)

    equal = {c.path: c for c in build_cases("X", config, 3, 24, token_ids, "cpu", torch.float32, ("kernel", "naive"))}
    cases = build_cases("X", config, 3, 24, token_ids, "cpu", torch.float32, ("kernel", "naive"), lengths)
    for case in cases:
        assert case.run().isfinite().all()
        assert case.bytes < equal[case.path].bytes and case.flops < equal[case.path].flops
    mha = variant_config("mha", "tiny", max_seq_len=24)
    sdpa, = build_cases("MHA", mha, 3, 24, token_ids, "cpu", torch.float32, ("sdpa",), lengths)
    full, = build_cases("MHA", mha, 3, 24, token_ids, "cpu", torch.float32, ("sdpa",))
    assert sdpa.bytes == full.bytes * int(lengths.sum()) / (3 * 24) and sdpa.run().isfinite().all()


def test_bias_control_absorbed_case_reads_its_cache_and_equals_naive():
    """`egmla bench decode --variants egmla-kv64-bias`: the 'absorbed' case gets the statistics and token groups
    its cache would hold (equal and ragged lengths), and computes what 'naive' computes."""
    import torch

    from egmla.bench.decode_cases import build_cases, ragged_lengths
    from egmla.variants import variant_config

    config = variant_config("egmla-kv64-bias", "tiny", max_seq_len=24)
    token_ids = torch.randint(0, 30, (3, 24), dtype=torch.int32)
    for lengths in (None, ragged_lengths(3, 24)):
        cases = {c.path: c for c in build_cases("X", config, 3, 24, token_ids, "cpu", torch.float32,
                                                ("naive", "absorbed"), lengths)}
        torch.testing.assert_close(cases["absorbed"].run(), cases["naive"].run(), rtol=1e-4, atol=1e-5)
        assert cases["absorbed"].flops < cases["naive"].flops


def test_markdown_says_a_missing_anchor_an_error_and_an_eager_row_never_a_zero():
    """The Markdown table (docs/bench/decode_*.md) showed '(0.00×)' for every row of a shape whose MHA SDPA errored
    or was not run (the printed table said '-'), 'skipped' for an error, a copy bandwidth of '0 GB/s' where none was
    measured, and nothing on a row timed eagerly in a run whose header says CUDA-graph replays."""
    from egmla.bench.decode_report import add_ratios, markdown

    meta = {"device": "NVIDIA H100", "dtype": "bfloat16", "preset": "paper-base", "torch": "x", "triton": "y",
            "token_ids": {"source": "python-source"}, "hbm_gbs_for_floor": 3000.0, "peak_tflops_for_floor": 782.0,
            "measured_copy_gbs": None,
            "timing": "median of repetitions, CUDA-graph replays, CUDA events, L2 flushed (read-only) before each"}

    def timed(variant, path, us, timing="cuda graph"):
        return {"variant": variant, "path": path, "batch": 32, "context": 4096, "median_us": us, "gbytes_per_s": 1.0,
                "tflops": 1.0, "floor_us": 1.0, "pct_of_floor": 1.0, "timing": timing}

    rows = [{"variant": "MHA", "path": "sdpa", "batch": 32, "context": 4096, "skipped": "error: RuntimeError: boom"},
            timed("MLA kv64", "kernel", 30.0),
            timed("EG-MLA kv64", "grouped-plan", 150.0, "eager (graph capture failed: host sync)"),
            {"variant": "EG-MLA kv64", "path": "naive", "batch": 32, "context": 4096,
             "skipped": "out of memory: CUDA out of memory"}]
    add_ratios(rows)
    md = markdown(rows, meta)
    assert "0.00" not in md and "bandwidth 0 GB/s" not in md and "copy bandwidth not measured" in md
    assert "| MHA sdpa | error |" in md and "| EG-MLA kv64 naive | out of memory |" in md
    assert "| MLA kv64 kernel | 30.0 (–) |" in md and "| EG-MLA kv64 grouped-plan | 150.0† (–) |" in md
    assert "| MLA kv64 kernel | 30.0 | 1 | 1.00 | 1.0 | 1% | – |" in md  # the focus table
    assert "† timed eagerly" in md
    rows.insert(0, timed("MHA", "sdpa", 150.0))  # with the anchor: ratios, and no mark on graph rows
    del rows[1]
    add_ratios(rows)
    md = markdown(rows, meta)
    assert "| MLA kv64 kernel | 30.0 (5.00×) |" in md and "| MHA sdpa | 150.0 (1.00×) |" in md
