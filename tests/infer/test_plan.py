"""Memory planner: the paper-base figures the issue asks for, and the CLI around it."""
import json
import re

import pytest

from egmla.cli import main as egmla_main
from egmla.config import preset
from egmla.infer.plan import plan_row, plan_rows
from egmla.model import count_params


def by_variant(rows):
    return {r["variant"]: r for r in rows}


def test_paper_base_4096_tokens_60_gb_ratios():
    rows = by_variant(plan_rows(preset("paper-base"), context=4096, memory_gb=60))
    egmla = rows["EG-MLA kv64"]
    assert egmla["is_model"] and not rows["MHA"]["is_model"]
    for column in ("sequences", "sequences_gate_tables_offloaded"):  # tables on the GPU and offloaded
        assert egmla[column] >= 11.5 * rows["MHA"][column]
        assert egmla[column] >= 2.4 * rows["MLA kv256"][column]
    assert egmla["sequences_vs_mha"] == egmla["sequences"] / rows["MHA"]["sequences"]
    # The gate tables (12 layers x 32768 x 512, bf16) are what separates the two columns.
    assert egmla["gate_table_bytes"] == 12 * 32768 * 512 * 2
    assert rows["MHA"]["gate_table_bytes"] == 0


def test_an_fp8_cache_halves_the_bytes_of_the_variants_that_take_one():
    rows = by_variant(plan_rows(preset("paper-base"), context=4096, memory_gb=60))
    fp8 = by_variant(plan_rows(preset("paper-base"), context=4096, memory_gb=60, cache_dtype="fp8"))
    for name in ("MHA", "GQA-4", "MLA kv64"):
        assert fp8[name]["cache_bytes_per_token"] * 2 == rows[name]["cache_bytes_per_token"]
        assert fp8[name]["cache_dtype"] == "fp8" and fp8[name]["sequences"] >= 2 * rows[name]["sequences"] - 1
    # EG-MLA: its latents and RoPE keys in fp8, its token ids and (on the grouped layout) fp32 norm statistics not
    egmla, wide = fp8["EG-MLA kv64"], rows["EG-MLA kv64"]
    assert egmla["cache_dtype"] == "fp8" and egmla["cache_bytes_per_token"] < 0.6 * wide["cache_bytes_per_token"]
    assert egmla["sequences"] > 1.6 * wide["sequences"]
    with pytest.raises(ValueError, match="cache_dtype='fp16'"):
        plan_rows(preset("paper-base"), context=4096, memory_gb=60, cache_dtype="fp16")
    # fp8-keep-rope: MLA kv64's RoPE keys (64 a layer) stay bf16, 192 of its 256 bytes a layer; MHA's K too
    keep = by_variant(plan_rows(preset("paper-base"), context=4096, memory_gb=60, cache_dtype="fp8-keep-rope"))
    assert keep["MLA kv64"]["cache_bytes_per_token"] * 4 == rows["MLA kv64"]["cache_bytes_per_token"] * 3
    assert keep["MHA"]["cache_bytes_per_token"] * 4 == rows["MHA"]["cache_bytes_per_token"] * 3
    assert keep["MLA kv64"]["cache_dtype"] == "fp8-keep-rope"
    assert fp8["MLA kv64"]["sequences"] > keep["MLA kv64"]["sequences"] > rows["MLA kv64"]["sequences"]


def test_offloaded_column_counts_the_row_cache():
    """Offloaded, the device keeps the rows of the ids the cache holds: by default the most there can be (4,703
    sequences x 4,096 positions reach every id, so the row cache is the tables' size and the offload frees nothing
    here), with --resident-ids the row cache at twice those ids; and the id -> slot map and flags, 12 B per id."""
    base = preset("paper-base", max_seq_len=4096)
    worst = by_variant(plan_rows(base, context=4096, memory_gb=60))["EG-MLA kv64"]
    assert worst["gate_row_cache_bytes"] == worst["gate_table_bytes"] + 12 * 32768
    assert worst["sequences_gate_tables_offloaded"] <= worst["sequences"]
    shared = by_variant(plan_rows(base, context=4096, memory_gb=60, resident_ids=4096))["EG-MLA kv64"]
    assert shared["gate_row_cache_bytes"] == 2 * 4096 * 12 * 512 * 2 + 12 * 32768
    budget = 60e9 - shared["weight_bytes"] - shared["gate_row_cache_bytes"]
    assert shared["sequences_gate_tables_offloaded"] == int(budget // shared["cache_bytes_per_sequence"])
    assert shared["sequences_gate_tables_offloaded"] > shared["sequences"]
    # few ids: a sixteenth of the vocabulary's rows at least (the room the engine keeps ahead)
    few = by_variant(plan_rows(base, context=16, memory_gb=1, resident_ids=10))["EG-MLA kv64"]
    assert few["gate_row_cache_bytes"] == 2048 * 12 * 512 * 2 + 12 * 32768
    with pytest.raises(ValueError, match="resident_ids=0: must be positive"):
        plan_rows(base, context=16, memory_gb=1, resident_ids=0)


def test_plan_row_arithmetic():
    config = preset("paper-base", attention="mha")
    row = plan_row(config, context=1000, memory_gb=10, dtype="fp32")
    assert row["cache_bytes_per_token"] == 2 * 12 * 768 * 4
    # the weights and the copies of SwiGLU's [w1 ; w3] and attention's [wq ; wk ; wv] the GPU decode step's merged
    # products read
    assert row["derived_weight_bytes"] == 12 * (2 * 2048 + 3 * 768) * 768 * 4
    assert row["weight_bytes"] == count_params(config) * 4 + row["derived_weight_bytes"]
    assert row["sequences"] == int((10e9 - row["weight_bytes"]) // (row["cache_bytes_per_token"] * 1000))
    assert plan_row(config, context=1000, memory_gb=0.1)["sequences"] == 0  # weights alone do not fit


def test_plan_cli_table_json_and_run(capsys, run_dir):
    assert egmla_main(["plan", "--preset", "paper-base", "--context", "4096", "--memory-gb", "60"]) == 0
    table = capsys.readouterr().out
    assert "* EG-MLA kv64" in table and "MLA kv256" in table and "MHA" in table
    assert egmla_main(["plan", "--run", str(run_dir), "--context", "32", "--memory-gb", "1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    model_rows = [r for r in plan["rows"] if r["is_model"]]
    assert len(model_rows) == 1 and model_rows[0]["variant"] == "EG-MLA kv16"
    assert egmla_main(["plan", "--preset", "paper-base", "--context", "0", "--memory-gb", "60"]) == 2
    assert "context=0" in capsys.readouterr().err
    assert egmla_main(["plan", "--preset", "paper-base", "--context", "4096", "--memory-gb", "60", "--resident-ids",
                       "4096", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    egmla = next(r for r in plan["rows"] if r["is_model"])
    assert plan["resident_ids"] == 4096 and egmla["gate_row_cache_bytes"] == 2 * 4096 * 12 * 512 * 2 + 12 * 32768


def test_plan_takes_an_exported_folder_as_generate_and_serve_do(capsys, run_dir, tmp_path):
    """`plan --run` on an `egmla export --to hf` folder read its config.json as a run's and said the folder was
    "not an egmla run or EgmlaForCausalLM export"."""
    pytest.importorskip("transformers")
    from egmla.hf.export import export_hf

    exported = export_hf(run_dir, tmp_path / "hf")
    plans = []
    for run in (run_dir, exported):
        assert egmla_main(["plan", "--run", str(run), "--context", "32", "--memory-gb", "1", "--json"]) == 0
        plans.append(json.loads(capsys.readouterr().out)["rows"])
    assert plans[0] == plans[1]


def test_plan_rejects_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        plan_rows(preset("tiny"), 128, 1, dtype="int8")


def test_plan_counts_the_decode_paths_cache_layout():
    """'grouped' stores LayerNorm statistics and token groups: fewer sequences fit, for EG-MLA only."""
    from egmla.config import preset
    from egmla.infer.plan import plan_rows

    default = {r["variant"]: r for r in plan_rows(preset("paper-base"), 4096, 60.0)}
    grouped = {r["variant"]: r for r in plan_rows(preset("paper-base"), 4096, 60.0, decode_path="grouped")}
    assert grouped["EG-MLA kv64"]["decode_path"] == "grouped"
    assert grouped["EG-MLA kv64"]["cache_bytes_per_token"] == 1536 * 2 + 4 + 12 * 8 + 16
    assert grouped["EG-MLA kv64"]["sequences"] < default["EG-MLA kv64"]["sequences"]
    assert grouped["MLA kv256"] == default["MLA kv256"]  # no such path: default layout
    with pytest.raises(ValueError, match="decode_path='fast'"):
        plan_rows(preset("paper-base"), 4096, 60.0, decode_path="fast")


def test_table_paths_count_both_tables_and_grouped_counts_its_workspace(capsys):
    """The paths that build G_l = E_l W_UE^T keep E_l too; the grouped path's per-step buffers are counted per
    sequence at the distinct ids asked for (default: as many as positions)."""
    from egmla.kernels import grouped_workspace_bytes

    base = preset("paper-base")
    naive = by_variant(plan_rows(base, 4096, 60.0))["EG-MLA kv64"]
    kernel = by_variant(plan_rows(base, 4096, 60.0, decode_path="kernel"))["EG-MLA kv64"]
    embeddings, table = 12 * 32768 * 512 * 2, 12 * 32768 * 1536 * 2
    assert naive["gate_table_bytes"] == embeddings and kernel["gate_table_bytes"] == embeddings + table
    assert naive["decode_workspace_bytes_per_sequence"] == kernel["decode_workspace_bytes_per_sequence"] == 0
    assert kernel["sequences_with_decode_workspace"] == kernel["sequences"]
    worst = by_variant(plan_rows(base, 4096, 60.0, decode_path="grouped"))["EG-MLA kv64"]
    text = by_variant(plan_rows(base, 4096, 60.0, decode_path="grouped", distinct_ids=1500))["EG-MLA kv64"]
    assert worst["decode_workspace_bytes_per_sequence"] == grouped_workspace_bytes(12, 64, 64, 4096, 4096, 2)
    assert text["decode_workspace_bytes_per_sequence"] == grouped_workspace_bytes(12, 64, 64, 4096, 1500, 2)
    assert worst["sequences_with_decode_workspace"] < text["sequences_with_decode_workspace"] < text["sequences"]
    assert egmla_main(["plan", "--preset", "paper-base", "--context", "4096", "--memory-gb", "60",
                       "--decode-path", "grouped", "--distinct-ids", "1500"]) == 0
    assert "a decode step also allocates" in capsys.readouterr().out
    with pytest.raises(ValueError, match="distinct_ids=0"):
        plan_rows(base, 4096, 60.0, decode_path="grouped", distinct_ids=0)


def test_auto_plans_the_path_generation_takes_on_a_gpu_at_the_batch_that_fits():
    """--decode-path auto: each variant's CUDA default (MLA kv64 'kernel', the control 'absorbed'); EG-MLA 'grouped'
    with its working memory once the batch that fits reaches GROUPED_MIN_POSITIONS positions, else 'kernel' at a
    batch below that threshold (where generation would still take 'kernel')."""
    from egmla.attention import GROUPED_MIN_POSITIONS

    base = preset("paper-base")
    auto = by_variant(plan_rows(base, 4096, 60.0, decode_path="auto"))
    grouped = by_variant(plan_rows(base, 4096, 60.0, decode_path="grouped"))
    assert {name: auto[name]["decode_path"] for name in ("MHA", "MLA kv64", "EG-MLA kv64", "EG-MLA kv64 gate-bias",
                                                         "EG-MLA kv64 latent-gate")} == {
        "MHA": "kernel", "MLA kv64": "kernel", "EG-MLA kv64": "grouped", "EG-MLA kv64 gate-bias": "absorbed",
        "EG-MLA kv64 latent-gate": "kernel"}
    assert auto["EG-MLA kv64"] == grouped["EG-MLA kv64"]
    # 2.0 GB: 'kernel' would fit 4 sequences, 16,384 positions, where generation takes 'grouped', which fits 2 with
    # its working memory: the plan says 3 on 'kernel'
    small = by_variant(plan_rows(base, 4096, 2.0, decode_path="auto"))["EG-MLA kv64"]
    assert by_variant(plan_rows(base, 4096, 2.0, decode_path="kernel"))["EG-MLA kv64"]["sequences"] == 4
    assert small["decode_path"] == "kernel" and small["sequences"] == 3 < GROUPED_MIN_POSITIONS / 4096
    # on 'kernel' too, the cache has the grouped layout the engine allocates under auto (its token groups)
    assert small["cache_bytes_per_token"] == grouped["EG-MLA kv64"]["cache_bytes_per_token"] > \
        by_variant(plan_rows(base, 4096, 2.0, decode_path="kernel"))["EG-MLA kv64"]["cache_bytes_per_token"]


def test_plan_counts_what_the_decode_path_derives_from_the_weights(capsys):
    """MLA kv64 on `kernel` keeps, per layer, SwiGLU's [w1 ; w3], [wkv_a ; folded query] and the folded output
    projection beside its weights; on `naive` nothing is folded and the query's first projection is wq."""
    from egmla.infer.plan import derived_weight_params

    config = preset("paper-base", attention="mla")
    d, heads, d_c, d_r, d_n = 768, 12, 64, 64, 64
    swiglu = 2 * 2048 * d
    folded = heads * (d_c + d_r) * d + d * heads * d_c
    assert derived_weight_params(config, "kernel") == 12 * (swiglu + (d_c + d_r + heads * (d_c + d_r)) * d + folded)
    assert derived_weight_params(config, "naive") == 12 * (swiglu + (d_c + d_r + heads * (d_n + d_r)) * d)
    gated = preset("paper-base", attention="eg-mla")  # the gate tables are counted apart, not here
    assert derived_weight_params(gated, "kernel") == derived_weight_params(config, "naive")
    # planned without the merged products (GenerationEngine(merged_products=False)): the folded absorption only
    folded_only = 12 * (heads * (d_c + d_r) * d + d * heads * d_c)
    assert derived_weight_params(config, "kernel", merged_products=False) == folded_only
    assert derived_weight_params(config, "naive", merged_products=False) == 0
    assert egmla_main(["plan", "--preset", "paper-base", "--context", "4096", "--memory-gb", "60", "--decode-path",
                       "kernel", "--no-merged-products", "--json"]) == 0
    rows = {r["variant"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["MLA kv64"]["derived_weight_bytes"] == folded_only * 2  # bf16


def test_every_egmla_path_plans_an_offloaded_batch():
    """An offload serves every EG-MLA decode path (egmla.infer.offload; the Triton 'kernel' and 'grouped' read the
    resident rows through the slot map), so the 'gates off GPU' column has a batch on each, 'auto' included."""
    base = preset("paper-base", max_seq_len=4096)
    for path in ("grouped", "kernel", "auto", "gate-table", None):
        rows = {r["variant"]: r for r in plan_rows(base, 4096, 60, decode_path=path, resident_ids=2048)}
        egmla = rows["EG-MLA kv64"]
        assert egmla["sequences_gate_tables_offloaded"] is not None, path
        assert egmla["sequences_gate_tables_offloaded"] >= egmla["sequences"], path
        assert rows["MLA kv64"]["sequences_gate_tables_offloaded"] == rows["MLA kv64"]["sequences"]  # no tables


@pytest.mark.parametrize("kwargs, error", [(dict(reserve_gb=-10), "reserve_gb=-10: must be >= 0"),
                                           (dict(memory_gb=float("inf")), "memory_gb=inf: both must be positive"),
                                           (dict(memory_gb=float("nan")), "memory_gb=nan: both must be positive")])
def test_plan_refuses_memory_it_cannot_plan(kwargs, error):
    args = dict(context=4096, memory_gb=60.0) | kwargs
    with pytest.raises(ValueError, match=error):
        plan_rows(preset("paper-base"), **args)


def test_distinct_ids_beyond_the_vocabulary_count_the_vocabulary():
    config = preset("paper-base", max_seq_len=65536)
    most = plan_row(config, 65536, 60, decode_path="grouped")
    assert plan_row(config, 65536, 60, decode_path="grouped", distinct_ids=10**6) == most


def test_plan_plot(tmp_path, capsys):
    """`egmla plan --plot PNG`: a PNG of sequences against contexts (powers of two to 4 x T, and T itself)."""
    from egmla.infer.plan_cli import plot_contexts

    assert plot_contexts(1000) == [256, 512, 1000, 1024, 2048]
    assert plot_contexts(64) == [64, 256]
    png = tmp_path / "plan.png"
    assert egmla_main(["plan", "--preset", "tiny", "--context", "512", "--memory-gb", "1", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in capsys.readouterr().out
    assert egmla_main(["plan", "--preset", "tiny", "--context", "512", "--memory-gb", "1", "--json", "--plot",
                       str(tmp_path / "b.png")]) == 0
    json.loads(capsys.readouterr().out)  # stdout stays JSON: the plot's line goes to stderr


@pytest.mark.parametrize("name,error", [("missing/plan.png", "the folder .* does not exist"),
                                        ("plan.txt", "matplotlib cannot write .txt files; end the name with .png")])
def test_a_plot_path_that_cannot_be_written_is_refused_before_the_plan(tmp_path, capsys, name, error):
    """A missing folder was a traceback, and .txt matplotlib's words, both after the table was printed."""
    path = tmp_path / name
    assert egmla_main(["plan", "--preset", "tiny", "--context", "512", "--memory-gb", "1", "--plot", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and re.search(rf"egmla plan: error: --plot '.*{name}': {error}", err)
    assert not path.exists()
