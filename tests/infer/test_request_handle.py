"""RequestHandle: the scheduler's thread pushes tokens, other threads stream them (events()) or wait for the end
(result()). Since 2026-12-05 a C queue and an Event carry them instead of one Condition (cheaper per token, and a
thread waiting in result() is no longer woken by every token)."""
import threading

import pytest

from egmla.infer.engine import Generation, TokenEvent
from egmla.infer.requests import RequestHandle


def _event(handle, token, reason=None):
    return TokenEvent(handle.id, token, f"t{token}", reason)


def test_events_in_order_then_the_end_and_a_second_reader_ends_at_once():
    handle = RequestHandle(7, [1, 2])
    for token in range(3):
        handle._push(_event(handle, token))
    assert handle.pending_events() == 3 and not handle.done
    handle._push(_event(handle, 3, "length"))
    handle._finish(Generation(7, [1, 2]))
    assert handle.done and handle.pending_events() == 4
    assert [e.token_id for e in handle.events()] == [0, 1, 2, 3]
    assert list(handle.events(timeout=0.01)) == []  # ended: no wait, no timeout
    assert handle.result(timeout=0.01).index == 7


def test_an_error_ends_the_stream_after_its_events_and_result_raises():
    handle = RequestHandle(1, [1])
    handle._push(_event(handle, 5))
    handle._finish(None, RuntimeError("generation failed: boom"))
    stream = handle.events()
    assert next(stream).token_id == 5
    with pytest.raises(RuntimeError, match="boom"):
        next(stream)
    with pytest.raises(RuntimeError, match="boom"):
        handle.result()
    with pytest.raises(RuntimeError, match="boom"):  # again: the end marker stays
        list(handle.events())


def test_timeouts_name_the_request():
    handle = RequestHandle(3, [1])
    with pytest.raises(TimeoutError, match="request 3: no token"):
        next(handle.events(timeout=0.01))
    with pytest.raises(TimeoutError, match="request 3: not finished"):
        handle.result(timeout=0.01)


def test_readers_on_other_threads_get_every_token_in_order():
    """One thread streams, another waits for the result, while this one pushes 5,000 tokens."""
    handle, count = RequestHandle(0, [1]), 5000
    streamed, results = [], []
    reader = threading.Thread(target=lambda: streamed.extend(e.token_id for e in handle.events(timeout=30)))
    waiter = threading.Thread(target=lambda: results.append(handle.result(timeout=30)))
    reader.start(), waiter.start()
    for token in range(count - 1):
        handle._push(_event(handle, token))
    handle._push(_event(handle, count - 1, "stop"))
    assert waiter.is_alive()  # result() waits for the end, not for tokens
    handle._finish(Generation(0, [1]))
    reader.join(30), waiter.join(30)
    assert streamed == list(range(count)) and len(results) == 1
