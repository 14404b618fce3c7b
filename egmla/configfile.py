"""TOML config files with `extends` and `--set key=value` overrides (torchtitan style).

A file has sections, e.g. [model] (ModelConfig fields, plus `preset = "paper-base"`) and [train];
`--set model.kv_lora_rank=16` or `--set train.steps=100` overrides a field. Values parse as TOML
literals (numbers, booleans, quoted strings; True/False too); anything else is taken as a string.

A top-level `extends = "base/paper-base.toml"` (a path relative to the file, or a list of them) reads
those files first and merges this file's values over them, table by table; bases may extend others.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

EXTENDS = "extends"


def parse_value(text: str):
    if text in ("True", "False"):  # Python's spelling of TOML's true / false
        return text == "True"
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
        if not all(part.strip() for part in parts):  # '=5', 'model.=5', 'model..x=5'
            raise ValueError(f"--set {item!r}: the key before '=' has an empty part; give SECTION.KEY=VALUE, "
                             f"e.g. --set model.kv_lora_rank=64")
        if section is not None:
            if len(parts) == 2 and parts[0] == section:
                parts = parts[1:]
            if len(parts) != 1:
                raise ValueError(f"--set {item!r}: only {section}.KEY=VALUE overrides apply here")
        node = nested
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is set to a value above, "
                                 f"so it has no keys")
        node[parts[-1]] = parse_value(value.strip())
    return nested


def model_overrides(items: list[str]) -> dict:
    """{field: value} of the --set KEY=VALUE (or model.KEY=VALUE) options of a command that takes model fields alone
    (kv-report, plan, the benchmarks). An unknown field is named as typed, with the closest one or the list (checked
    later, by ModelConfig, it was named `model.KEY` whichever the user typed)."""
    import dataclasses

    from egmla.config import ModelConfig, known_keys_hint

    values = parse_overrides(items, section="model")
    known = [f.name for f in dataclasses.fields(ModelConfig)]
    for item in items:
        key = item.split("=", 1)[0].strip()
        name = key.split(".")[-1]
        if name not in known:
            raise ValueError(f"--set {item!r}: {key}: unknown model field{known_keys_hint(name, known)}")
    return values


def merge(base: dict, overrides: dict, where: str = "") -> dict:
    """`overrides` over `base`, tables merged key by key. A table over a plain value (or the reverse)
    is an error naming the dotted key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and key in out and not isinstance(out[key], dict):
            raise ValueError(f"{where}{key}={out[key]!r} is a value, not a table: it has no key "
                             f"{where}{key}.{next(iter(value), '')}")
        if isinstance(value, dict):
            out[key] = merge(out.get(key, {}), value, f"{where}{key}.")
        elif isinstance(out.get(key), dict):
            raise ValueError(f"{where}{key}={value!r}: {where}{key} is a table of keys; set one of them, "
                             f"e.g. {where}{key}.{next(iter(out[key]), 'KEY')}=...")
        else:
            out[key] = value
    return out


def read_toml(path: str | Path, extended_by: tuple[Path, ...] = ()) -> dict:
    """One TOML file with its `extends` chain resolved (bases first, this file's values over them)."""
    path = Path(path)
    chain = " <- ".join(str(p) for p in (path, *reversed(extended_by)))
    if path.resolve() in extended_by:
        raise ValueError(f"--config: {chain}: the files extend each other in a cycle; remove one `extends`")
    if not path.is_file():
        where = f"extends {str(path)!r} (from {extended_by[-1]})" if extended_by else f"--config {str(path)!r}"
        raise ValueError(f"{where}: no such file; see configs/ for examples")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {str(path)!r}: not valid TOML: {err}") from None
    declared = data.pop(EXTENDS, [])
    bases = [declared] if isinstance(declared, str) else declared
    if not isinstance(bases, list) or not all(isinstance(base, str) and base for base in bases):
        raise ValueError(f"{path}: extends={declared!r}: give a file path or a list of paths, "
                         f"relative to this file, e.g. extends = \"base/paper-base.toml\"")
    merged: dict = {}
    for base in bases:
        merged = merge(merged, read_toml(path.parent / base, (*extended_by, path.resolve())))
    return merge(merged, data)


def load_toml(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """Read a TOML file (or nothing), resolving `extends`, and apply --set overrides."""
    data = read_toml(path) if path is not None else {}
    return merge(data, parse_overrides(list(overrides)))


def int_list(text: str, flag: str, minimum: int = 1, distinct: bool = False, example: str = "1,32,128") -> list[int]:
    """The comma-separated integers of command-line option `flag` (each >= minimum; with distinct, each at most
    once), or a ValueError naming the option and the fix."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{flag} {text!r}: give comma-separated integers, e.g. {example}")
    if min(values) < minimum:
        raise ValueError(f"{flag} {text!r}: every value must be >= {minimum}")
    if distinct and len(set(values)) < len(values):
        raise ValueError(f"{flag} {text!r}: give each value at most once, e.g. {example}")
    return values
