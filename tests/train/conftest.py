"""Shared fixtures for the training tests: one data cache (tokenizer + shards of the tiny corpus)."""
import pytest

from egmla.data import prepare_data
from tests.train.helpers import run_config


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A cache with the tiny config's tokenizer and shards already built (built once per session)."""
    path = tmp_path_factory.mktemp("egmla-cache")
    config = run_config(path)
    prepare_data(config.data, config.model.vocab_size, progress=False, log=lambda *_: None)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process training on one thread, like the subprocess runs (OMP_NUM_THREADS=1): the same
    rounding everywhere, and no OpenMP spin-waiting when other processes share the two cores. Module
    scope, so that it is set before a module's run fixtures train (a function-scoped fixture came after
    them: such a run used 2 threads and its losses differed from a rerun's in the last bit)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
