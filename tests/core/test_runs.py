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


def test_weights_reach_the_disk_before_their_rename(tmp_path, monkeypatch):
    """A crash after the rename must not leave model.safetensors naming a file whose data never reached the disk."""
    events = []
    real_fsync, real_replace = runs.os.fsync, runs.os.replace
    monkeypatch.setattr(runs.os, "fsync", lambda fd: (events.append(("fsync", runs.os.readlink(f"/proc/self/fd/{fd}"))),
                                                     real_fsync(fd))[1])
    monkeypatch.setattr(runs.os, "replace", lambda src, dst: (events.append(("replace", str(src))), real_replace(src, dst))[1])
    config = small_config(attention="mla")
    runs.save_weights(Transformer(config), tmp_path / "model.safetensors")
    replaced = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    tmp = events[replaced[0]][1]
    assert ("fsync", tmp) in events[:replaced[0]], events


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    config = small_config(attention="mla")
    model = Transformer(config)
    _write_run(tmp_path, config, model)
    newest = tmp_path / "checkpoints" / "step_00000020" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    warnings = []
    loaded, _ = runs.load_model(tmp_path, warn=warnings.append)  # still loads, from step 10
    assert "step_00000020 is unusable (model.safetensors checksum mismatch" in warnings[0]
    assert torch.equal(loaded.layers[0].attn.wkv_a.weight,
                       model.layers[0].attn.wkv_a.weight)


def test_incomplete_checkpoint_without_manifest_is_skipped(tmp_path):
    config = small_config(attention="mha")
    _write_run(tmp_path, config, Transformer(config))
    (tmp_path / "checkpoints" / "step_00000020" / "manifest.json").unlink()
    folder, _ = runs.find_checkpoint(tmp_path, lambda folder: None, warn=lambda m: None)
    assert folder.name == "step_00000010"


def test_a_folder_that_is_no_checkpoint_says_so_not_that_a_write_failed(tmp_path):
    config = small_config(attention="mha")
    _write_run(tmp_path, config, Transformer(config))
    unfinished = tmp_path / "checkpoints" / "step_00000020"
    (unfinished / "manifest.json").unlink()
    assert runs.verify_checkpoint(unfinished) == "no manifest.json (the write did not finish)"
    problem = runs.verify_checkpoint(tmp_path)  # the run folder itself, given where a checkpoint belongs
    assert problem.startswith("not a checkpoint: no manifest.json and no weights") and "checkpoints/step_N" in problem


@pytest.mark.parametrize("text,message", [("{", "config.json is not valid JSON"),
                                          ("[1]", "config.json holds a JSON list, not the object")])
def test_corrupt_config_json_names_the_file_and_the_fix(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        runs.read_run_config(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value) and "train" in str(error.value)


@pytest.mark.parametrize("text,message", [("[1]", "config.json holds a JSON list, not the object"),
                                          ('{"format_version": 1}', "config.json has model=None, not the object"),
                                          ('{"format_version": 1, "model": "x"}', "config.json has model='x', not")])
def test_a_hand_edited_config_json_is_one_line_where_a_model_is_loaded(tmp_path, text, message):
    """load_model raised AttributeError (a list: is_hf_export called .get on it) or KeyError ('model' missing), and
    model="x" was "model.x: unknown config key"."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        runs.load_model(tmp_path)


def test_an_exported_folder_where_a_run_is_needed_is_called_an_export_not_denied_to_be_one(tmp_path):
    """`egmla train --resume` on an `egmla export --to hf` folder said it was "not an egmla run or EgmlaForCausalLM
    export"."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "egmla"}))
    with pytest.raises(ValueError, match="an EgmlaForCausalLM export") as error:
        runs.read_run_config(tmp_path)
    assert "not an egmla run or EgmlaForCausalLM export" not in str(error.value)
    assert "`egmla train`" in str(error.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama', not an egmla run"):
        runs.read_run_config(tmp_path)


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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask_not_mkstemps_private_mode(tmp_path, umask):
    """A run's files (JSON, weights) are as readable as any file the user creates: mkstemp's 0600 kept a shared
    machine's other users out of runs and exports."""
    import os
    import stat

    old = os.umask(umask)
    try:
        runs.atomic_write_json(tmp_path / "state.json", {"a": 1})
        runs.save_weights(Transformer(small_config(attention="mla")), tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    for name in ("state.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_named_checkpoint_is_verified_and_never_replaced_by_another(tmp_path):
    config = small_config(attention="mla")
    _write_run(tmp_path, config, Transformer(config))
    named = tmp_path / "checkpoints" / "step_00000010"
    weights = named / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # same size, last bytes changed
    with pytest.raises(runs.CheckpointError, match=r"^--checkpoint '.*step_00000010': model.safetensors checksum "
                                                   r"mismatch \(corrupt or truncated\)$"):
        runs.load_model(tmp_path, checkpoint=named)
    with pytest.raises(runs.CheckpointError, match=r"--checkpoint '.*nowhere': no such folder"):
        runs.load_model(tmp_path, checkpoint=tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["../../config.json", "/etc/hostname", "sub/model.safetensors", "outside"])
def test_manifest_names_outside_the_checkpoint_folder_are_refused(tmp_path, name):
    config = small_config(attention="mha")
    _write_run(tmp_path, config, Transformer(config))
    folder = tmp_path / "checkpoints" / "step_00000020"
    if name == "outside":  # a link inside the folder that leads out of it
        (folder / name).symlink_to(tmp_path / "config.json")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = runs.sha256_file(tmp_path / "config.json")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert runs.verify_checkpoint(folder) == f"manifest.json names {name!r}, which is not a file of this folder"
    warnings = []
    runs.load_model(tmp_path, warn=warnings.append)  # falls back to step 10
    assert "step_00000020 is unusable" in warnings[0]


def test_weights_outside_the_manifest_are_not_read(tmp_path):
    config = small_config(attention="mha")
    _write_run(tmp_path, config, Transformer(config))
    for folder in runs.list_checkpoints(tmp_path):
        (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "files": {}}))
    with pytest.raises(runs.CheckpointError, match="model.safetensors is not in manifest.json, so it cannot be verified"):
        runs.load_model(tmp_path)


def test_config_json_that_differs_from_the_weights_is_refused(tmp_path):
    """gate_op changes no shape: only the config recorded in the weights' metadata can tell."""
    config = small_config(attention="eg-mla")
    _write_run(tmp_path, config, Transformer(config))
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["gate_op"] = "add"
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(runs.CheckpointError, match=r"gate_op='add' \(the weights were trained with 'mul'\)"):
        runs.load_model(tmp_path)


def test_a_wrong_shaped_newest_checkpoint_falls_back_as_resume_does(tmp_path):
    from safetensors.torch import save_file

    config = small_config(attention="mla")
    model = Transformer(config)
    _write_run(tmp_path, config, model)
    newest = tmp_path / "checkpoints" / "step_00000020"
    other = Transformer(small_config(attention="mla", d_model=32))
    save_file({k: v.contiguous() for k, v in other.state_dict().items() if k != "output.weight"},
              str(newest / "model.safetensors"))  # no recorded config: only loading can tell
    runs.write_manifest(newest)
    warnings = []
    loaded, _ = runs.load_model(tmp_path, warn=warnings.append)
    assert "step_00000020 is unusable (does not load: " in warnings[0]
    assert torch.equal(loaded.layers[0].attn.wkv_a.weight, model.layers[0].attn.wkv_a.weight)


def test_another_runs_tokenizer_is_refused(tmp_path):
    from tests.infer.helpers import train_tokenizer

    config = small_config(attention="mla", vocab_size=300)
    _write_run(tmp_path, config, Transformer(config))
    train_tokenizer().save(str(tmp_path / "tokenizer.json"))
    for folder in runs.list_checkpoints(tmp_path):  # as the trainer records it
        runs.atomic_write_json(folder / "state.json", {"tokenizer_sha256": "0" * 64})
        runs.write_manifest(folder)
    with pytest.raises(runs.CheckpointError, match="tokenizer.json differs from the tokenizer it was trained with"):
        runs.load_model(tmp_path)


def test_a_missing_tokenizer_is_called_missing_not_another_one(tmp_path):
    config = small_config(attention="mla", vocab_size=300)
    _write_run(tmp_path, config, Transformer(config))
    for folder in runs.list_checkpoints(tmp_path):  # as the trainer records it; no tokenizer.json in the run
        runs.atomic_write_json(folder / "state.json", {"tokenizer_sha256": "0" * 64})
        runs.write_manifest(folder)
    with pytest.raises(runs.CheckpointError, match="tokenizer.json is missing; restore the run's own tokenizer.json"):
        runs.load_model(tmp_path)


@pytest.mark.parametrize("state", ["[1]", "not json"])
def test_a_state_json_that_is_not_an_object_is_an_unusable_checkpoint_not_a_traceback(tmp_path, state):
    config = small_config(attention="mha")
    model = Transformer(config)
    _write_run(tmp_path, config, model)
    newest = runs.list_checkpoints(tmp_path)[-1]
    (newest / "state.json").write_text(state)
    runs.write_manifest(newest)  # its checksum matches: only its content is wrong
    warnings = []
    folder, _ = runs.find_checkpoint(tmp_path, lambda folder: None, warn=warnings.append)
    assert folder.name == "step_00000010"
    assert "state.json is not the JSON object the trainer writes" in warnings[0]


def test_a_checkpoint_named_by_its_weights_file_says_to_give_the_folder(tmp_path):
    config = small_config(attention="mha")
    _write_run(tmp_path, config, Transformer(config))
    weights = tmp_path / "checkpoints" / "step_00000010" / "model.safetensors"
    with pytest.raises(runs.CheckpointError, match=r"--checkpoint '.*model.safetensors': a file, not a checkpoint "
                                                   r"folder; give the folder that holds it \(.*step_00000010\)"):
        runs.load_model(tmp_path, checkpoint=weights)


def test_final_weights_need_their_manifest(tmp_path):
    config = small_config(attention="mha")
    model = Transformer(config)
    runs.atomic_write_json(tmp_path / "config.json", {"format_version": runs.FORMAT_VERSION, "model": config.to_dict()})
    runs.save_weights(model, tmp_path / "model.safetensors")  # writes RUN/manifest.json too
    assert torch.equal(runs.load_model(tmp_path)[0].output.weight, model.output.weight)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(runs.CheckpointError, match=r"no usable weights \(.*: no manifest.json"):
        runs.load_model(tmp_path)
