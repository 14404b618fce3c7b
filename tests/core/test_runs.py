"""Run directories: safetensors round trip, checksums, corrupt checkpoints, version check."""
import json

import pytest
import torch

from egmla import runs
from egmla.model import Transformer
from tests.conftest import small_config


def _write_run(tmp_path, config, model):
    runs.atomic_write_json(tmp_path / "config.json", {"format_version": runs.FORMAT_VERSION, "model": config.to_dict()})
    for step in (10, 20):
        folder = tmp_path / "checkpoints" / f"step_{step:08d}"
        runs.save_weights(model, folder / "model.safetensors")
        runs.write_manifest(folder)


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_round_trip(tmp_path, tied):
    config = small_config(attention="eg-mla", tie_embeddings=tied)
    model = Transformer(config).eval()
    _write_run(tmp_path, config, model)
    loaded, meta = runs.load_model(tmp_path)
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    assert torch.equal(loaded(tokens), model(tokens))
    assert meta["model"] == config.to_dict()
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tied


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    config = small_config(attention="mla")
    model = Transformer(config)
    _write_run(tmp_path, config, model)
    newest = tmp_path / "checkpoints" / "step_00000020" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    warnings = []
    assert runs.latest_checkpoint(tmp_path, warn=warnings.append).name == "step_00000010"
    assert "checksum mismatch" in warnings[0]
    loaded, _ = runs.load_model(tmp_path)  # still loads, from step 10
    assert torch.equal(loaded.layers[0].attn.wkv_a.weight,
                       model.layers[0].attn.wkv_a.weight)


def test_incomplete_checkpoint_without_manifest_is_skipped(tmp_path):
    config = small_config(attention="mha")
    _write_run(tmp_path, config, Transformer(config))
    (tmp_path / "checkpoints" / "step_00000020" / "manifest.json").unlink()
    assert runs.latest_checkpoint(tmp_path, warn=lambda m: None).name == "step_00000010"


def test_wrong_format_version_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 99, "model": {}}))
    with pytest.raises(ValueError, match="format_version=99"):
        runs.load_model(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        runs.load_model(tmp_path / "nowhere")


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    runs.atomic_write_json(path, {"a": 1})

    class Boom(Exception):
        pass

    def fail(*args):
        raise Boom

    monkeypatch.setattr(runs.os, "replace", fail)
    with pytest.raises(Boom):
        runs.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind
