"""TOML config files with `--set key=value` overrides (torchtitan style).

A file has sections, e.g. [model] (ModelConfig fields, plus `preset = "paper-base"`) and [train];
`--set model.kv_lora_rank=16` or `--set train.steps=100` overrides a field. Values parse as TOML
literals (numbers, booleans, quoted strings); anything that does not parse is taken as a string.
"""
from __future__ import annotations

import tomllib
from pathlib import Path


def parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str], section: str | None = None) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; with `section`, bare keys and that section's keys
    are returned flat (other sections are an error)."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.kv_lora_rank=64")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if section is not None:
            if len(parts) == 2 and parts[0] == section:
                parts = parts[1:]
            if len(parts) != 1:
                raise ValueError(f"--set {item!r}: only {section}.KEY=VALUE overrides apply here")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parse_value(value.strip())
    return nested


def merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def load_toml(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """Read a TOML file (or nothing) and apply --set overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--config {str(path)!r}: no such file; see configs/ for examples")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"--config {str(path)!r}: not valid TOML: {err}") from None
    return merge(data, parse_overrides(list(overrides)))
