"""Loading is verified on the transformers side too: config.json is checked against the config the weights
record (and against their names and shapes), and export / lm-eval read runs through egmla's verified loader."""
import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import egmla.hf  # noqa: F401
from egmla.hf import EgmlaForCausalLM
from egmla.hf.export import export_hf
from egmla.runs import WEIGHTS_CONFIG_KEY, CheckpointError, load_model

TAMPERED = [("gate_op", "add"), ("rope_theta", 500.0), ("gate_norm", "rmsnorm"), ("num_hidden_layers", 1),
            ("rms_norm_eps", 1e-3)]


@pytest.fixture(scope="module")
def saved(make_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "eg-mla"
    model, _ = load_model(make_run("eg-mla"))
    EgmlaForCausalLM.from_egmla(model).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("field,value", TAMPERED, ids=[field for field, _ in TAMPERED])
def test_a_tampered_config_json_is_refused_before_loading(saved, tmp_path, field, value):
    folder = shutil.copytree(saved, tmp_path / "tampered")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=rf"config differs from the weights': {field}={value!r} \(the weights were "
                                         rf"trained with .+\); use the config.json saved with these weights"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_subfolder_or_a_config_path_is_checked_and_loads(saved, tmp_path):
    """from_pretrained(REPO, subfolder=...) checked the folder above the weights (none there: a tampered config.json
    loaded, wrong RoPE and all), and config=PATH, which transformers takes, raised an AttributeError."""
    folder = shutil.copytree(saved, tmp_path / "repo" / "step-1")
    assert type(EgmlaForCausalLM.from_pretrained(tmp_path / "repo", subfolder="step-1")) is EgmlaForCausalLM
    assert type(EgmlaForCausalLM.from_pretrained(folder, config=str(folder))) is EgmlaForCausalLM
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_theta": 500.0}))
    for load in (AutoModelForCausalLM.from_pretrained, EgmlaForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=r"config differs from the weights': rope_theta=500.0"):
            load(tmp_path / "repo", subfolder="step-1")
    with pytest.raises(ValueError, match=r"config differs from the weights': rope_theta=500.0"):
        EgmlaForCausalLM.from_pretrained(saved, config=str(folder))


def test_the_weights_record_their_config_and_load_as_saved(saved):
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[WEIGHTS_CONFIG_KEY])["gate_op"] == "mul"
    model, info = AutoModelForCausalLM.from_pretrained(saved, output_loading_info=True)
    assert isinstance(model, EgmlaForCausalLM) and not any(info[key] for key in ("missing_keys", "unexpected_keys"))


def test_weights_without_a_recorded_config_are_still_checked_by_name_and_shape(saved, tmp_path):
    folder = shutil.copytree(saved, tmp_path / "legacy")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})  # as saved before the record
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"the weights do not match its config.json \(unexpected: model.layers.1"):
        AutoModelForCausalLM.from_pretrained(folder)


def corrupted_copy(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "corrupt-run")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # one weight changed: it would load, and generate "a a a a"
    weights.write_bytes(bytes(data))
    return copy


def test_export_and_lm_eval_refuse_a_corrupted_weight(make_run, tmp_path):
    from egmla.hf.lm_eval_model import EgmlaLM

    run = corrupted_copy(make_run("mla"), tmp_path)
    with pytest.raises(CheckpointError, match=r"no usable weights \(corrupt-run: model.safetensors checksum mismatch"):
        export_hf(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="model.safetensors checksum mismatch"):
        EgmlaLM(run=str(run), device="cpu")


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(make_run, tmp_path, monkeypatch):
    import argparse
    import errno

    from egmla.commands import export

    def full(self, folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(EgmlaForCausalLM, "save_pretrained", full)
    args = argparse.Namespace(run=str(make_run("mla")), to="hf", out=str(tmp_path / "out"), checkpoint=None,
                              dtype=None)
    with pytest.raises(ValueError, match=r"^No space left on device: .* \(exporting to .*out\); nothing was "
                                         r"written there$"):
        export.main(args)
    assert list(tmp_path.iterdir()) == []  # no half-written folder, no .out.*.tmp


@pytest.mark.parametrize("variant", ["mla", "eg-mla"])
def test_generate_and_serve_take_an_exported_folder_as_a_run(variant, make_run, tmp_path, capsys, no_unpickling):
    """`egmla generate --run` (and `egmla serve`, which loads the same way) on an `egmla export --to hf` folder: the
    same model, tokenizer and end-of-text token as the run it came from, the same greedy text."""
    from egmla.cli import main
    from egmla.hf.export import export_hf
    from egmla.runs import load_model

    run = make_run(variant)
    exported = export_hf(run, tmp_path / "exported")
    texts = []
    for folder in (run, exported):
        assert main(["generate", "--run", str(folder), "--prompt", "The bees", "--temperature", "0",
                     "--max-new-tokens", "8", "--json"]) == 0
        texts.append(json.loads(capsys.readouterr().out)[0]["text"])
    assert texts[0] == texts[1]
    model, meta = load_model(exported)
    assert model.config == load_model(run)[0].config and meta["data"]["eos_token"] == "<|endoftext|>"
    with pytest.raises(ValueError, match="no checkpoints"):
        load_model(exported, checkpoint="checkpoints/step_1")


def test_another_hugging_face_folder_is_named_for_what_it_is(tmp_path):
    from egmla.runs import load_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama', not an egmla run"):
        load_model(tmp_path)


def test_weights_recording_a_field_this_egmla_lacks_name_it_and_the_version(saved, tmp_path):
    """As a newer egmla's save would be read here: the error names the file, the field and what to do (it was
    `model.gate_scale: unknown config key; known keys: ...`, no file, no fix)."""
    folder = shutil.copytree(saved, tmp_path / "newer")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    recorded = json.loads(metadata[WEIGHTS_CONFIG_KEY])
    metadata[WEIGHTS_CONFIG_KEY] = json.dumps({**recorded, "gate_scale": 2.0})
    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"newer/model.safetensors: the config its weights record does not fit this "
                                         r"egmla \(model.gate_scale: unknown config key\): saved by another egmla "
                                         r"version; load it with the version that saved it$"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_an_export_with_truncated_or_missing_weights_is_one_line(saved, tmp_path):
    """`egmla generate --run EXPORT` printed safetensors' SafetensorError (truncated) or transformers' OSError (missing)
    as a traceback."""
    from egmla.runs import load_model

    truncated = shutil.copytree(saved, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"truncated/model.safetensors: not a readable safetensors file \(.+\): corrupt "
                                         r"or truncated; copy it again or export the run again"):
        load_model(truncated)
    missing = shutil.copytree(saved, tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"an EgmlaForCausalLM folder without its weights \(no \*.safetensors\)"):
        load_model(missing)
