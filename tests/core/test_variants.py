"""egmla.variants is the one table of named variants: one entry added there reaches accounting, the
benchmarks' variant selection, `egmla compare` and the config-file check; names, display names and
decode paths come out of it consistently."""
from pathlib import Path

import pytest

from egmla import variants
from egmla.attention import decode_paths
from egmla.config import preset
from egmla.variants import VARIANTS, Variant

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def added(monkeypatch):
    """A variant that exists nowhere but in the table."""
    new = Variant("mla-kv32", dict(attention="mla", kv_lora_rank=32))
    monkeypatch.setitem(VARIANTS, new.name, new)
    return new


def test_one_entry_adds_a_variant_everywhere(added):
    from egmla.accounting import kv_rows, variant_configs
    from egmla.bench.decode_cases import bench_paths
    from egmla.train.compare import load_runs

    base = preset("tiny")
    rows = {r["variant"]: r for r in kv_rows(variant_configs(base))}
    assert rows["MLA kv32"]["elements_per_token"] == (32 + base.qk_rope_head_dim) * base.n_layers
    assert rows["MLA kv32"]["decode_paths"] == ["naive", "absorbed", "kernel"]
    # `egmla bench decode|train --variants NAME` (and 'all')
    assert variants.select("mla-kv32") == [added] and added in variants.select("all")
    assert bench_paths(added.config("tiny")) == ("naive", "absorbed", "kernel", "kernel-core")
    # `egmla compare NAME`
    (label, run), = load_runs(["mla-kv32"], "tiny", [])
    assert (label, run.model.attention, run.model.kv_lora_rank) == ("mla-kv32", "mla", 32)
    # the config files must follow: the check names the missing one
    assert variants.check_configs(CONFIGS) == [f"variant 'mla-kv32' has no config file {CONFIGS / 'mla-kv32.toml'}"]


def test_config_check_finds_a_file_that_disagrees(tmp_path):
    (tmp_path / "mla-kv64.toml").write_text('[model]\npreset = "paper-base"\nattention = "mla"\nkv_lora_rank = 48\n')
    (tmp_path / "mla-kv48.toml").write_text('[model]\nattention = "mla"\n')
    problems = variants.check_configs(tmp_path)
    assert f"{tmp_path / 'mla-kv48.toml'}: no variant named 'mla-kv48' in egmla.variants.VARIANTS" in problems
    assert any(p.startswith(f"{tmp_path / 'mla-kv64.toml'}: [model] differs") and "'kv_lora_rank': (48, 64)" in p
               for p in problems)
    assert len(problems) == len(VARIANTS) - 1 + 2  # every other variant lacks its file


def test_display_names_and_decode_paths_come_from_the_model():
    for v in VARIANTS.values():
        config = v.config("paper-base")
        assert v.display_name("paper-base") == config.variant_name()
        assert v.decode_paths("paper-base") == decode_paths(config)
    assert VARIANTS["gqa4"].display_name() == "GQA-4" and VARIANTS["mla-kv64"].decode_paths() == (
        "naive", "absorbed", "kernel")


def test_labels_tell_apart_variants_with_one_display_name():
    chosen = variants.select("mha,egmla-kv64,egmla-kv64-de128")
    assert variants.labels(chosen) == {"mha": "MHA", "egmla-kv64": "egmla-kv64", "egmla-kv64-de128": "egmla-kv64-de128"}


def test_a_variant_at_the_shape_of_another_config():
    base = preset("paper-1b", gate_dim=256)
    mla = variants.variant_config("mla-kv64", base)
    assert (mla.d_model, mla.n_heads, mla.attention, mla.kv_lora_rank, mla.gate_dim) == (2048, 16, "mla", 64, 512)
    assert variants.variant_config("egmla-kv16", base).gate_dim == 256  # d_e is part of the gate's shape
    assert variants.variant_config("egmla-kv64-de64", base).gate_dim == 64  # unless the variant sets it
    # a variant that cannot take a shape is left out of the comparison set, not bent into another one
    six_heads = preset("tiny", n_heads=6, d_model=384)
    assert "GQA-4" not in [c.variant_name() for c in variants.compared_configs(six_heads)]


def test_a_variant_sets_attention_fields_only():
    with pytest.raises(ValueError, match="'x': d_model are shape fields"):
        Variant("x", dict(attention="mla", d_model=64))
    with pytest.raises(ValueError, match="--variants: variant 'egmla-kv46': unknown.*did you mean 'egmla-kv64'"):
        variants.select("mha,egmla-kv46")


def test_every_kind_of_variant_is_in_the_exactness_tests_table():
    """tests/conftest.VARIANTS (cached decode = full forward on every decode path, the kernels' table) is kept by hand
    at small shapes: every registered variant's kind (attention, gate op, norm, placement, start) must be there, or
    a new variant is never checked for exactness. (The V table alone was missing until 2026-12-06.)"""
    from tests.conftest import VARIANTS as TESTED, small_config

    kinds = ("attention", "gate_op", "gate_norm", "gate_placement", "gate_init")
    tested = {tuple(getattr(small_config(**kw), k) for k in kinds) for kw in TESTED.values()}
    missing = {v.name: v.overrides for v in VARIANTS.values()
               if tuple(getattr(v.config("tiny"), k) for k in kinds) not in tested}
    assert not missing, f"add these kinds of variant to tests/conftest.VARIANTS: {missing}"
