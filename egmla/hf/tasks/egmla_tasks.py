"""Loaders for the two local lm-eval tasks: JSONL files next to this module, so the tasks work from any
working directory and with no network (lm-eval's `custom_dataset` hook calls these)."""
import json
from pathlib import Path


def _jsonl_split(name: str):
    import datasets

    with open(Path(__file__).with_name(name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def mc_dataset(**kwargs):
    return _jsonl_split("egmla_mc.jsonl")


def ppl_dataset(**kwargs):
    return _jsonl_split("egmla_ppl.jsonl")
