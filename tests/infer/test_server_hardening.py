"""`egmla serve` (egmla/infer/server.py) against what demanding clients send: values at the edges of every field, HTTP
the standard library answers itself (methods, malformed requests, bodies without a Content-Length or in chunks),
clients that leave before their answer, and a stop while requests run. Each test here failed before its fix."""
import contextlib
import http.client
import json
import os
import signal
import socket
import threading

import pytest

import tests.infer.test_server as base  # its helpers (not `from ... import`: pytest would collect its tests again)
from egmla.infer import completions

MODEL, PROMPT = base.MODEL, base.PROMPT


@pytest.fixture(scope="module")
def server(tokenizer):
    with base.serving(tokenizer) as server:
        yield server


def raw_exchange(server, data: bytes) -> bytes:
    """What the server answers to these bytes, read until it closes the connection."""
    with socket.create_connection(server.server_address[:2], timeout=30) as connection:
        connection.sendall(data)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def test_a_tiny_temperature_is_greedy_not_a_failed_step(server):
    """temperature=1e-45 (a float32 subnormal) or 1e-300 (0 in float32) made the logits infinite and the probabilities
    NaN: the decode step raised and every request running with it failed (500). Below 1e-5 it is greedy (vLLM's rule)."""
    greedy = base.complete(server, prompt=PROMPT, max_tokens=4, temperature=0, ignore_eos=True)["choices"][0]["text"]
    for temperature in (1e-45, 1e-300, 5e-6):
        answer = base.complete(server, prompt=PROMPT, max_tokens=4, temperature=temperature, ignore_eos=True)
        assert answer["choices"][0]["text"] == greedy


def test_a_huge_n_is_refused_before_any_work(server, monkeypatch):
    """n=10**9 made the handler build a billion SamplingParams (minutes of CPU, gigabytes) before the scheduler's
    room check refused it: now refused by the parser, before one is made."""
    made = []

    class Counted(completions.SamplingParams):
        def __post_init__(self):
            made.append(1)
            assert len(made) < 1000, "the parser builds the samples of a request that cannot be queued"
            super().__post_init__()

    monkeypatch.setattr(completions, "SamplingParams", Counted)
    status, answer = base.call(server, "POST", "/v1/completions", {"prompt": PROMPT, "n": 10**9})
    assert status == 400 and answer["error"]["param"] == "n" and "n=1000000000" in answer["error"]["message"]
    assert "at most" in answer["error"]["message"] and not made


@pytest.mark.parametrize("path,body", [("/v1/completions", '{"prompt": "To be \\ud800"}'),
                                       ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}'),
                                       ("/tokenize", '{"prompt": "\\ud800"}')])
def test_a_lone_surrogate_in_a_prompt_is_a_400_not_a_500(server, path, body):
    """JSON may escape half of a UTF-16 surrogate pair alone; the tokenizer raised TypeError on it: a 500."""
    status, answer = base.call(server, "POST", path, raw=body.encode())
    assert status == 400 and answer["error"]["param"] == "prompt", answer
    assert "surrogate" in answer["error"]["message"]


@pytest.mark.parametrize("body,param,message", [
    ({"temperature": -1}, "temperature", "temperature=-1.0: must be >= 0"),
    ({"top_p": 0}, "top_p", "top_p=0.0: must lie in (0, 1]"),
    ({"top_p": 1.5}, "top_p", "top_p=1.5: must lie in (0, 1]"),
])
def test_sampling_errors_name_their_field(server, body, param, message):
    """OpenAI's `param` names the bad field; SamplingParams' errors came with param null."""
    status, answer = base.call(server, "POST", "/v1/completions", {"prompt": PROMPT, **body})
    assert status == 400 and answer["error"]["param"] == param and message in answer["error"]["message"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1" + "0" * 400])
def test_non_finite_numbers_are_refused(server, value):
    """Python's json reads NaN and Infinity (not JSON): temperature=Infinity sampled uniformly, NaN gave param null;
    an integer beyond any float raised OverflowError (a 500)."""
    body = f'{{"prompt": "To be", "temperature": {value}}}'.encode()
    status, answer = base.call(server, "POST", "/v1/completions", raw=body)
    assert status == 400 and answer["error"]["param"] == "temperature" and "finite" in answer["error"]["message"]
