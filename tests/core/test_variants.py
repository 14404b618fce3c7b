"""egmla.variants is the one table of named variants: one entry added there reaches accounting, the
benchmarks' variant selection, `egmla compare` and the config-file check; names, display names and
decode paths come out of it consistently."""
from pathlib import Path

import pytest

from egmla import variants
from egmla.attention import decode_paths
from egmla.config import ModelConfig, preset
from egmla.variants import VARIANTS, Variant
from tests.variant_kinds import kind_fields, kind_name, kind_of, registered_kinds

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


def test_variants_that_differ_beyond_d_e_have_their_own_display_names():
    """kv-report and plan print variant_name() alone: a new attention field without a tag in ModelConfig.variant_name
    printed its variant as a second 'MLA kv64' row, no test failing (a trial on 2026-12-06). Only the d_e sweep
    shares a name (`labels` tells those apart)."""
    seen = {}
    for v in VARIANTS.values():
        config = v.config("paper-base")
        kind = {k: val for k, val in config.to_dict().items() if k != "gate_dim"}
        shown = v.display_name("paper-base")
        other = seen.setdefault(shown, (v.name, kind))
        assert other[1] == kind, (f"variants {other[0]!r} and {v.name!r} both show as {shown!r}: give the field "
                                  f"that tells them apart a tag in ModelConfig.variant_name()")


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


def test_a_shape_too_small_for_a_variant_is_a_typed_refusal_with_the_configs_message():
    """ShapeRefused is a ValueError (callers catching ValueError see no change) and carries ModelConfig's own message."""
    narrow = preset("tiny", d_model=128)
    with pytest.raises(variants.ShapeRefused, match=r"^kv_lora_rank=256: a latent wider than d_model=128"):
        variants.variant_config("mla-kv256", narrow)
    with pytest.raises(variants.ShapeRefused, match=r"^kv_lora_rank=256: "):
        variants.variant_config("egmla-kv256", "tiny", d_model=128)  # from a preset's name too
    with pytest.raises(variants.ShapeRefused, match=r"^n_kv_heads=4: n_heads=6 must be divisible by it"):
        variants.variant_config("gqa4", preset("tiny", n_heads=6, d_model=384))
    assert issubclass(variants.ShapeRefused, ValueError)
    names = [c.variant_name() for c in variants.compared_configs(narrow)]
    assert len(names) == sum(v.compared for v in VARIANTS.values()) - 2 and not {"MLA kv256", "EG-MLA kv256"} & set(names)
    # an error that is no size refusal stays a plain ValueError, even where the shape also refuses the variant
    with pytest.raises(ValueError) as raised:
        Variant("bad", dict(attention="mha", n_kv_heads=3)).config(narrow)
    assert type(raised.value) is ValueError and "MHA uses one KV head per query head" in str(raised.value)


def test_the_comparison_set_raises_what_is_no_size_refusal(monkeypatch):
    """A reader's new variant whose field was missing from ATTENTION_FIELDS: the field was copied from the model's config
    into every row, the rows it made invalid were dropped as if the shape refused them (kv-report and plan showed 2
    rows of 11, no error). Only ShapeRefused is skipped now; here gate_op stands for the forgotten field."""
    monkeypatch.setattr(variants, "ATTENTION_FIELDS", tuple(f for f in variants.ATTENTION_FIELDS if f != "gate_op"))
    base = variants.variant_config("egmla-kv64-bias", "tiny")
    with pytest.raises(ValueError, match="gate_op='bias': gate options apply only to attention='eg-mla'"):
        variants.compared_configs(base)


def test_a_variant_sets_attention_fields_only():
    with pytest.raises(ValueError, match=r"'x': d_model not in ATTENTION_FIELDS \(attention, n_kv_heads, .*\); "
                                         r"a variant sets only those.*belongs in ATTENTION_FIELDS in egmla/variants.py"):
        Variant("x", dict(attention="mla", d_model=64))
    with pytest.raises(ValueError, match="--variants: variant 'egmla-kv46': unknown.*did you mean 'egmla-kv64'"):
        variants.select("mha,egmla-kv46")


def test_kinds_are_the_attention_fields_with_a_choice_of_values():
    kinds = set(kind_fields())
    assert {"attention", "gate_op", "gate_norm", "gate_placement", "gate_init"} <= kinds
    assert not kinds & {"n_kv_heads", "kv_lora_rank", "gate_dim"}  # sizes: the tables hold small shapes


def _exactness_table(where: str) -> list:
    """The configs of one of the exactness tests' variant tables, each at its own small shape."""
    if where == "tests/conftest.VARIANTS":  # decode paths against the full forward, the kernels
        from tests.conftest import VARIANTS as table, small_config

        return [small_config(**kw) for kw in table.values()]
    if where == "tests/hf/conftest.VARIANTS":  # the HF model, its cache, generate(), export and loading
        from tests.hf.conftest import VARIANTS as table, SHAPE

        return [ModelConfig(**SHAPE, **kw) for kw in table.values()]
    from tests.infer.helpers import VARIANTS as table, tiny_config  # the engine: every decode path, CUDA graphs

    return [tiny_config(name) for name in table]


@pytest.mark.parametrize("where", ["tests/conftest.VARIANTS", "tests/hf/conftest.VARIANTS",
                                   "tests/infer/helpers.VARIANTS"])
def test_every_kind_of_variant_is_in_each_exactness_tests_table(where):
    """The exactness tests' three tables are built from the registry's kinds (tests/variant_kinds.py), each at its own
    small shape: every registered variant's kind (attention, gate op, norm, placement, start) must be in each, or a new
    variant is never checked there. (Until 2026-12-06 the tables were kept by hand: tests/conftest lacked the V table,
    and the HF and engine tables the add, no-norm and identity ablations.)"""
    tested = {kind_of(config) for config in _exactness_table(where)}
    missing = {v.name: v.overrides for v in VARIANTS.values() if kind_of(v.config("tiny")) not in tested}
    assert not missing, f"add these kinds of variant to {where}: {missing}"


def test_a_new_kind_in_the_registry_reaches_the_exactness_tables_by_its_name(monkeypatch):
    """One registry entry of a new kind is a new entry of the tables (no edit in tests/), named after it less its
    sizes, so that `pytest tests -k NAME` runs every test parametrized over them; one more of a known kind is not."""
    monkeypatch.setitem(VARIANTS, "mla-kv32", Variant("mla-kv32", dict(attention="mla", kv_lora_rank=32)))
    monkeypatch.setitem(VARIANTS, "egmla-kv32-rmsnorm", Variant("egmla-kv32-rmsnorm", dict(
        attention="eg-mla", kv_lora_rank=32, gate_norm="rmsnorm")))
    kinds = registered_kinds()
    assert kinds["eg-mla-rmsnorm"] == dict(attention="eg-mla", gate_norm="rmsnorm")  # no sizes: each table has its own
    assert len(kinds) == len({kind_of(v.config("tiny")) for v in VARIANTS.values()})
    assert kinds["gqa"] == dict(attention="gqa", n_kv_heads=2)  # 2 query heads per KV head at the tables' 4 heads
    assert [kind_name(n, a) for n, a in (("gqa4", "gqa"), ("egmla-kv64-bias-v", "eg-mla"), ("mla-kv64-de512", "mla"))] \
        == ["gqa", "eg-mla-bias-v", "mla"]


def test_two_kinds_one_name_in_the_exactness_tables_is_refused(monkeypatch):
    """A name less its sizes is the tables' name: two kinds that would share one are refused, naming both."""
    monkeypatch.setitem(VARIANTS, "egmla-kv16-add", Variant("egmla-kv16-add", dict(
        attention="eg-mla", kv_lora_rank=16, gate_op="add", gate_norm="none")))
    with pytest.raises(ValueError, match="variants 'egmla-kv64-add' and 'egmla-kv16-add' are different kinds both "
                                         "named 'eg-mla-add'"):
        registered_kinds()
