"""Fixtures for the inference tests: a tokenizer and an EG-MLA run directory (helpers in helpers.py)."""
from pathlib import Path

import pytest

from tests.infer.helpers import tiny_model, train_tokenizer, write_run


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tokenizer) -> Path:
    """An EG-MLA run directory with a tiny random model, plus runs/latest pointing at it."""
    root = tmp_path_factory.mktemp("runs")
    run = write_run(root / "egmla-tiny", tiny_model("eg-mla"), tokenizer)
    (root / "latest").symlink_to(run.name)
    return run
