"""Windows, the seeded per-epoch order, resuming at a position, and slicing over processes."""
import numpy as np
import pytest

from egmla.data.loader import TrainBatches, WindowedTokens, local_micro_batches, validation_window_ids

TOKENS = np.arange(1001, dtype=np.uint16)  # 1001 tokens -> 100 windows of 10 (+1)


def test_windows_are_inputs_and_next_token_targets():
    windows = WindowedTokens(TOKENS, 10, "training")
    assert windows.num_windows == 100
    inputs, targets = windows.batch([0, 99])
    assert inputs.tolist()[1] == list(range(990, 1000)) and targets.tolist()[1] == list(range(991, 1001))
    assert inputs.dtype.is_floating_point is False and inputs.shape == (2, 10)
    with pytest.raises(ValueError, match="train.seq_len=2000: the training split holds only 1001 tokens"):
        WindowedTokens(TOKENS, 2000, "training")


def test_each_epoch_visits_every_window_once_in_a_seeded_order():
    windows = WindowedTokens(TOKENS, 10, "training")
    batches = TrainBatches(windows, batch_size=30, seed=7)
    seen = np.concatenate([batches.next_window_ids() for _ in range(10)])  # 300 = 3 epochs
    for epoch in range(3):
        assert sorted(seen[epoch * 100:(epoch + 1) * 100]) == list(range(100))
    assert not np.array_equal(seen[:100], seen[100:200])
    other_seed = TrainBatches(windows, batch_size=30, seed=8).next_window_ids()
    assert not np.array_equal(other_seed, seen[:30])
    with pytest.raises(ValueError, match="train.batch_size=101: the training split has only 100 sequences"):
        TrainBatches(windows, batch_size=101, seed=0)


def test_resuming_at_a_position_continues_the_same_stream():
    windows = WindowedTokens(TOKENS, 10, "training")
    straight = TrainBatches(windows, 16, seed=3)
    stream = [straight.next_window_ids() for _ in range(12)]
    resumed = TrainBatches(windows, 16, seed=3, position=7 * 16)
    assert all(np.array_equal(resumed.next_window_ids(), stream[i]) for i in range(7, 12))


def test_processes_split_the_global_batch():
    ids = np.arange(16)
    parts = [local_micro_batches(ids, rank, 2, 4) for rank in range(2)]
    assert [len(p) for p in parts] == [2, 2]
    assert np.concatenate([np.concatenate(p) for p in parts]).tolist() == list(range(16))
    windows = WindowedTokens(TOKENS, 10, "validation")
    val = [validation_window_ids(windows, 7, rank, 2) for rank in range(2)]
    assert sorted(np.concatenate(val).tolist()) == list(range(7))
    assert len(validation_window_ids(windows, 0, 0, 1)) == 100
