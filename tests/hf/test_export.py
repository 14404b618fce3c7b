"""`egmla export --to hf|deepseek`: folders that load in transformers and give our logits."""
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

import egmla.hf  # noqa: F401
from egmla.cli import main as egmla_main
from egmla.hf import EgmlaForCausalLM
from egmla.hf.export import deepseek_state_dict
from egmla.runs import load_model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("variant", ["gqa", "eg-mla", "eg-mla-latent"])
def test_export_hf_any_variant(variant, make_run, tmp_path, no_unpickling):
    run, out = make_run(variant), tmp_path / "hf"
    assert egmla_main(["export", "--run", str(run), "--to", "hf", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "configuration_egmla.py", "generation_config.json",
                                                       "model.safetensors", "modeling_egmla.py", "tokenizer.json",
                                                       "tokenizer_config.json"]
    model, _ = load_model(run)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, EgmlaForCausalLM)
    tokens = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens))


def test_export_hf_loads_with_trust_remote_code_without_importing_egmla_hf(make_run, tmp_path):
    """A fresh process that never imports egmla.hf itself (stock lm_eval, a transformers script) loads the folder
    through config.json's auto_map, gets our class and our logits."""
    run, out = make_run("eg-mla"), tmp_path / "hf"
    assert egmla_main(["export", "--run", str(run), "--to", "hf", str(out)]) == 0
    tokens = torch.randint(0, 300, (2, 16))
    torch.save(tokens, tmp_path / "tokens.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
assert not any(name.startswith("egmla") for name in sys.modules)
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
assert type(model).__module__ == "egmla.hf.modeling_egmla", type(model)
tokens = torch.load({str(tmp_path / "tokens.pt")!r}, weights_only=True)
with torch.no_grad():
    torch.save(model(tokens).logits, {str(tmp_path / "logits.pt")!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    model, _ = load_model(run)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), model(tokens))


def test_export_hf_without_trust_remote_code_or_import_is_refused_clearly(make_run, tmp_path):
    run, out = make_run("mla"), tmp_path / "hf"
    assert egmla_main(["export", "--run", str(run), "--to", "hf", str(out)]) == 0
    script = f"""
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=False)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "trust_remote_code" in done.stderr


@pytest.mark.parametrize("variant", ["mla", "mla-qlora-untied"])
def test_export_deepseek_loads_in_transformers_with_our_logits(variant, make_run, tmp_path, no_unpickling):
    run, out = make_run(variant), tmp_path / "ds"
    assert egmla_main(["export", "--run", str(run), "--to", "deepseek", str(out)]) == 0
    deepseek = AutoModelForCausalLM.from_pretrained(out)  # transformers' own class: no egmla code involved
    assert type(deepseek) is DeepseekV3ForCausalLM
    # DeepSeek's own conventions, which vLLM and SGLang assume whatever the config says: interleaved RoPE pairs
    # and an lm_head of its own
    assert deepseek.config.rope_interleave is True and deepseek.config.tie_word_embeddings is False
    layers = deepseek.model.layers
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in layers)  # dense, no MoE
    model, _ = load_model(run)
    # every tensor of the export landed in the DeepSeek model unchanged
    state = deepseek.state_dict()
    for name, tensor in deepseek_state_dict(model).items():
        assert torch.equal(state[name], tensor), name
    tokens = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        theirs, ours = deepseek(tokens).logits, model(tokens)
    assert relative_error(theirs, ours) < 1e-4
    # the same weights read with half-split RoPE (as exported before) differ: the test sees the convention
    half_split = AutoModelForCausalLM.from_pretrained(out, rope_interleave=False)
    with torch.no_grad():
        assert relative_error(half_split(tokens).logits, ours) > 1e-2
    # and they continue text the same way, through their own cache
    prompt = tokens[:1, :8]
    theirs = deepseek.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    hf_ours = EgmlaForCausalLM.from_egmla(model).generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(theirs, hf_ours)


def test_export_deepseek_refuses_egmla_and_nonempty_out(make_run, tmp_path, capsys):
    assert egmla_main(["export", "--run", str(make_run("eg-mla")), "--to", "deepseek", str(tmp_path / "x")]) == 2
    assert "attention='eg-mla'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert egmla_main(["export", "--run", str(make_run("mla")), "--to", "hf", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


class FakeHub:
    """The Hub as transformers' push sees it: create_repo answers, and each upload keeps a copy of what it would send
    (the files transformers picks: new since the save began, or changed)."""

    def __init__(self, root):
        self.root, self.uploads = root, []

    def create_repo(self, repo_id, **kwargs):
        return type("Repo", (), {"repo_id": repo_id})()

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):  # set on the class as a bound method
        import os
        import shutil

        sent = self.root / f"upload{len(self.uploads)}"
        sent.mkdir()
        for name in os.listdir(working_dir):
            path = os.path.join(working_dir, name)
            if name not in files_timestamps or os.path.getmtime(path) > files_timestamps[name]:
                shutil.copy(path, sent / name)
        self.uploads.append(sent)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import transformers.modeling_utils
    import transformers.utils.hub

    hub = FakeHub(tmp_path)
    card = type("Card", (), {"save": lambda self, path: None})()
    for module in (transformers.modeling_utils, transformers.utils.hub):
        monkeypatch.setattr(module, "hf_api", lambda: hub, raising=False)
        monkeypatch.setattr(module, "create_and_tag_model_card", lambda *args, **kwargs: card, raising=False)
    monkeypatch.setattr(transformers.utils.hub.PushToHubMixin, "_upload_modified_files", hub.upload)
    return hub


def test_pushing_to_the_hub_uploads_the_remote_code_and_the_weights_record(make_run, tmp_path, fake_hub):
    """save_pretrained(push_to_hub=True) uploads from inside transformers' save: the modules, the auto_map and the
    weights' config record must be in the folder by then (they were added after the upload), as with push_to_hub()."""
    import json

    from safetensors import safe_open

    from egmla.runs import WEIGHTS_CONFIG_KEY

    model, _ = load_model(make_run("eg-mla"))
    hf_model = EgmlaForCausalLM.from_egmla(model)
    hf_model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/egmla")
    hf_model.push_to_hub("someone/egmla")
    assert len(fake_hub.uploads) == 2
    for sent in fake_hub.uploads:
        assert {"configuration_egmla.py", "modeling_egmla.py", "model.safetensors"} <= {p.name for p in sent.iterdir()}
        assert json.loads((sent / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
            "modeling_egmla.EgmlaForCausalLM")
        with safe_open(str(sent / "model.safetensors"), "pt") as f:
            assert json.loads(f.metadata()[WEIGHTS_CONFIG_KEY]) == model.config.to_dict()
        tokens = torch.randint(0, 300, (2, 16))
        with torch.no_grad():
            assert torch.equal(AutoModelForCausalLM.from_pretrained(sent)(tokens).logits, model(tokens))


def test_a_save_on_another_process_leaves_the_folder_to_the_main_one(make_run, tmp_path):
    """save_pretrained(is_main_process=False) writes nothing (transformers' contract for distributed saves): it must
    not rewrite the weights the main process writes, nor stamp its config on a file another model left there."""
    first, _ = load_model(make_run("eg-mla"))
    EgmlaForCausalLM.from_egmla(first).save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = EgmlaForCausalLM.from_egmla(load_model(make_run("mla"))[0])
    other.save_pretrained(tmp_path, is_main_process=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    tokens = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(tokens).logits, first(tokens))


def test_an_adapter_only_folder_is_left_as_transformers_wrote_it(make_run, tmp_path):
    """transformers' PEFT integration (model.add_adapter, then save_pretrained) writes adapter_config.json and
    adapter_model.safetensors and no config.json: completing the folder must neither fail on the missing config nor
    stamp the whole model's config into the adapter's weights."""
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    save_file({"base_model.model.layers.0.attn.wq.lora_A.weight": torch.zeros(4, 64)},
              str(tmp_path / "adapter_model.safetensors"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    EgmlaForCausalLM.from_egmla(load_model(make_run("mla"))[0])._complete_folder(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
