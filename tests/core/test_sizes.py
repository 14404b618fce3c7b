"""Parameter counts match the closed form; measured cache bytes match the formula (docs/design.md §3)."""
import pytest
import torch

from egmla.accounting import kv_rows, measured_cache_bytes_per_token, variant_configs
from egmla.config import preset
from egmla.model import Transformer, count_params
from tests.conftest import VARIANTS, small_config


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_count_matches_closed_form(variant):
    config = small_config(**VARIANTS[variant])
    model = Transformer(config)
    assert model.num_params() == count_params(config)
    assert model.num_params(include_gate_tables=False) == count_params(config, include_gate_tables=False)


@pytest.mark.parametrize("name", ["tiny", "paper-base", "paper-1b"])
def test_presets_param_counts(name):
    for config in variant_configs(preset(name)):
        with torch.device("meta"):
            model = Transformer(config)
        assert model.num_params() == count_params(config)
    if name == "paper-1b":
        assert count_params(preset(name), include_gate_tables=False) > 1e9


def test_paper_base_kv_figures():
    rows = {r["variant"]: r for r in kv_rows(variant_configs(preset("paper-base")))}
    expected = {"MHA": 18432, "GQA-4": 6144, "MLA kv256": 3840, "EG-MLA kv64": 1536, "EG-MLA kv16": 960}
    for variant, elements in expected.items():
        assert rows[variant]["elements_per_token"] == elements
    assert round(100 * rows["EG-MLA kv64"]["reduction_vs_mha"], 1) == 91.7
    assert round(100 * (1 - 1536 / rows["MLA kv256"]["elements_per_token"]), 1) == 60.0


def test_kv_report_measures_an_fp8_cache_too():
    """The fp8 column: K/V and latents one byte each; EG-MLA's token id (4 B) and, on the grouped layout, its fp32
    statistics (8 B a layer) and token groups (16 B) as they are."""
    rows = {r["variant"]: r for r in kv_rows(variant_configs(preset("paper-base")))}
    assert rows["MHA"]["measured_bytes_per_token_fp8"] == 18432
    assert rows["MLA kv64"]["measured_bytes_per_token_fp8"] == 1536
    assert rows["EG-MLA kv64"]["measured_bytes_per_token_fp8"] == 1536 + 4
    assert rows["EG-MLA kv64 (grouped: +2 fp32 stats/layer)"]["measured_bytes_per_token_fp8"] == 1536 + 4 + 96 + 16
    # fp8-keep-rope: the RoPE keys (MLA's d_r = 64 per layer, MHA's K) stay bf16
    assert rows["MHA"]["measured_bytes_per_token_fp8_keep_rope"] == 18432 // 2 * 3
    assert rows["MLA kv64"]["measured_bytes_per_token_fp8_keep_rope"] == 12 * (64 + 2 * 64)
    assert rows["EG-MLA kv64 (grouped: +2 fp32 stats/layer)"]["measured_bytes_per_token_fp8_keep_rope"] == (
        12 * (64 + 2 * 64) + 4 + 96 + 16)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_measured_cache_bytes_match_formula(variant, dtype):
    config = small_config(**VARIANTS[variant])
    measured, id_bytes = measured_cache_bytes_per_token(config, dtype)
    elem_size = dtype.itemsize
    expected_ids = 4 if config.is_gated and config.gate_placement == "up" else 0
    assert id_bytes == expected_ids
    assert measured == config.kv_elements_per_token() * elem_size + expected_ids


def test_cache_stores_only_the_latent_for_latent_variants():
    for variant in ("mla", "eg-mla", "eg-mla-latent"):
        model = Transformer(small_config(**VARIANTS[variant]))
        cache = model.new_cache(2, max_len=8)
        assert set(cache.layers[0].buffers) == {"latent", "k_rope"}
        assert cache.layers[0].buffers["latent"].shape == (2, 8, 10)
