"""Fixtures for the inference tests: a tokenizer, an EG-MLA run directory and the engine's step log-probabilities
(helpers in helpers.py)."""
from pathlib import Path

import pytest

from tests.infer.helpers import record_step_log_probs, tiny_model, train_tokenizer, write_run


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


@pytest.fixture
def step_log_probs(monkeypatch) -> list:
    """The log-probabilities (fp32, [rows, vocab]) of every set of logits GenerationEngine.generate picks tokens from
    (the prefill's, then each decode step's), in order (`record_step_log_probs`); clear it before the call to check,
    and compare with `assert_steps_match_full_forward`."""
    return record_step_log_probs(monkeypatch)
