"""TOML config files: `extends` (configs/ is one base plus small per-variant files) and its errors."""
import json
from pathlib import Path

import pytest

from egmla.configfile import load_toml
from egmla.train.config import RunConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Every configs/*.toml resolved by the loader before `extends` existed, when each file held all 35 lines.
BEFORE_EXTENDS = json.loads((Path(__file__).parent / "data" / "configs_before_extends.json").read_text())


def with_later_fields(name: str) -> dict:
    """The snapshot, plus the fields added since at their defaults (issue 18: data.split, model.gate_init),
    which keep every old config meaning what it meant."""
    from dataclasses import MISSING, fields

    expected = json.loads(json.dumps(BEFORE_EXTENDS[name]))
    run = RunConfig()
    for section in ("model", "train", "data"):
        for f in fields(getattr(run, section)):
            if f.default is not MISSING:
                expected[section].setdefault(f.name, f.default)
    return expected


@pytest.mark.parametrize("name", sorted(BEFORE_EXTENDS))
def test_every_config_loads_to_exactly_its_values_before_extends(name):
    run = RunConfig.from_dict(load_toml(CONFIGS / name))
    # json.dumps tells 1 from 1.0: the values and their types are the same
    assert json.dumps(run.to_dict(), sort_keys=True) == json.dumps(with_later_fields(name), sort_keys=True)
    assert run.data.split == "chunk" and (not run.model.is_gated or run.model.gate_init == "random")


def test_no_config_was_lost_and_the_variant_files_are_small():
    assert set(BEFORE_EXTENDS) <= {p.name for p in CONFIGS.glob("*.toml")}
    for path in CONFIGS.glob("*.toml"):
        if path.stem != "tiny":
            assert "[train]" not in path.read_text() and len(path.read_text().splitlines()) <= 12, path.name


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_merges_tables_key_by_key_and_chains(tmp_path):
    write(tmp_path, "base/root.toml", "[train]\nsteps = 5\nlr = 0.5\n[data]\ncorpus = 'embedded'\n")
    write(tmp_path, "base/mid.toml", "extends = 'root.toml'\n[train]\nlr = 0.25\n")
    leaf = write(tmp_path, "leaf.toml", "extends = ['base/mid.toml']\nname = 'leaf'\n[train]\nseed = 3\n")
    assert load_toml(leaf, ["train.steps=7"]) == {"name": "leaf", "train": {"steps": 7, "lr": 0.25, "seed": 3},
                                                  "data": {"corpus": "embedded"}}


@pytest.mark.parametrize("leaf,error", [
    ("extends = 'nowhere.toml'\n", r"extends '.*nowhere.toml' \(from .*leaf.toml\): no such file"),
    ("extends = 5\n", r"leaf.toml: extends=5: give a file path or a list of paths"),
    ("extends = ['']\n", r"extends=\[''\]: give a file path"),
    ("extends = 'leaf.toml'\n", r"extend each other in a cycle"),
    ("extends = 'base.toml'\n[train]\nsteps = 3\n", r"train=5 is a value, not a table"),
    ("extends = 'base.toml'\ntrain = 3\n", r"train=3: train is a table of keys"),
])
def test_extends_errors_name_the_file_and_the_fix(tmp_path, leaf, error):
    write(tmp_path, "base.toml", "train = 5\n" if "steps" in leaf else "[train]\nsteps = 5\n")
    with pytest.raises(ValueError, match=error):
        load_toml(write(tmp_path, "leaf.toml", leaf))


def test_a_set_below_a_value_is_a_clear_error():
    with pytest.raises(ValueError, match=r"train.steps=2000 is a value, not a table: it has no key train.steps.x"):
        load_toml(CONFIGS / "mha.toml", ["train.steps.x=5"])
    with pytest.raises(ValueError, match=r"train.steps is set to a value above"):
        load_toml(None, ["train.steps=1", "train.steps.x=5"])


@pytest.mark.parametrize("item", ["=5", "model.=5", ".x=5", "model..x=5", " =5"])
def test_a_set_with_an_empty_key_part_is_a_clear_error(item):
    with pytest.raises(ValueError, match=r"the key before '=' has an empty part; give SECTION.KEY=VALUE"):
        load_toml(None, [item])
