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


def test_json_nested_too_deeply_is_a_400_not_an_internal_error(server):
    """100,000 nested arrays made json.loads raise RecursionError: a 500 "internal error" and a traceback in the log."""
    status, answer = base.call(server, "POST", "/v1/completions", raw=b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nests JSON arrays or objects too deeply" in answer["error"]["message"]
    assert base.complete(server, prompt=PROMPT, max_tokens=1)["choices"]  # and the server still serves


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


def parse_answer(answer: bytes) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one raw HTTP answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("request_bytes,status", [
    (b"HELLO\r\n\r\n", 400),  # no method, path and version
    (b"GET /health HTTP/9.9\r\n\r\n", 505),
    (b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"BREW /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 501),  # no such HTTP method
])
def test_errors_http_server_answers_itself_are_openai_json(server, request_bytes, status):
    """http.server answered these with its HTML error page; clients parse JSON."""
    got, headers, body = parse_answer(raw_exchange(server, request_bytes))
    assert got == status and headers["content-type"] == "application/json", body[:200]
    error = json.loads(body)["error"]
    assert error["message"] and set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("method,path,status,allow", [
    ("GET", "/v1/completions", 405, "POST"),
    ("PUT", "/v1/completions", 405, "POST"),
    ("DELETE", "/v1/models", 405, "GET, HEAD"),
    ("OPTIONS", "/v1/completions", 405, "POST"),
    ("PATCH", "/nowhere", 404, None),
])
def test_a_method_a_path_does_not_take_is_a_405_naming_those_it_does(server, method, path, status, allow):
    """PUT, DELETE, PATCH and OPTIONS were answered 501 with an HTML page; a known path's wrong method 404."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    connection.request(method, path)
    response = connection.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == status and response.headers.get("Allow") == allow, error
    assert (method in error["message"] and path in error["message"]) and (allow is None or allow in error["message"])
    connection.close()


def test_head_answers_a_get_endpoints_headers_without_a_body(server):
    """HEAD (load balancers' health checks) was a 501; now GET's status and headers, no body, connection kept."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    for path in ("/health", "/v1/models", "/metrics"):
        connection.request("HEAD", path)
        response = connection.getresponse()
        assert response.status == 200 and int(response.headers["Content-Length"]) > 0 and response.read() == b""
    connection.request("GET", "/health")  # the same connection: nothing of a body was left on it
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read())["status"] == "ok"
    connection.close()


def test_a_post_without_content_length_is_a_411(server):
    """A body with neither Content-Length nor chunked encoding was read as empty ("not valid JSON ... char 0"), and
    its bytes left to be parsed as the next request."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()
    status, headers, answer = parse_answer(raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n"
                                                        + body))
    assert status == 411 and headers["connection"] == "close"
    assert "Content-Length" in json.loads(answer)["error"]["message"]


def chunked(body: bytes, sizes=(7, 1, 30)) -> bytes:
    """body in chunks of these sizes (then the rest), with a chunk extension and a trailer, as RFC 9112 allows."""
    out, start = b"", 0
    for size in (*sizes, len(body)):
        piece, start = body[start: start + size], start + size
        if piece:
            out += b"%x;ext=1\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\nX-Trailer: 1\r\n\r\n"


def test_a_chunked_body_is_read(server):
    """Transfer-Encoding: chunked (httpx and requests send a generator body so, curl with -H) was refused with a 400."""
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    expected = base.complete(server, **body)["choices"]
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    data = json.dumps(body).encode()
    for _ in range(2):  # twice on one connection: the first body was read to its end, trailer included
        connection.request("POST", "/v1/completions", body=iter([data[:5], data[5:]]), encode_chunked=True,
                           headers={"Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["choices"] == expected
    connection.close()
    request = b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    status, _, answer = parse_answer(raw_exchange(server, request + chunked(json.dumps({"prompt": PROMPT}).encode())))
    assert status == 200 and json.loads(answer)["count"] > 0


@pytest.mark.parametrize("body,status,message", [
    (b"zz\r\n{}\r\n0\r\n\r\n", 400, "chunk size"),
    (b"-2\r\n{}\r\n0\r\n\r\n", 400, "chunk size"),
    (b"2\r\n{}XX0\r\n\r\n", 400, "CRLF"),
    (b"4000000\r\n", 413, "at most"),
])
def test_a_bad_or_too_large_chunked_body_is_refused(server, monkeypatch, body, status, message):
    from egmla.infer import server as server_module

    monkeypatch.setattr(server_module, "MAX_BODY_BYTES", 2**20)
    request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    got, headers, answer = parse_answer(raw_exchange(server, request + body))
    assert got == status and headers["connection"] == "close" and message in json.loads(answer)["error"]["message"]


def test_a_transfer_encoding_other_than_chunked_is_refused(server):
    request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"
    status, _, answer = parse_answer(raw_exchange(server, request))
    assert status == 400 and "Transfer-Encoding: gzip" in json.loads(answer)["error"]["message"]


def hold_steps(scheduler, monkeypatch) -> threading.Event:
    """The scheduler's steps run only while the returned event is set: a request stays where it is meanwhile."""
    go, step = threading.Event(), scheduler.step
    go.set()

    def held_step():
        go.wait()
        return step()

    monkeypatch.setattr(scheduler, "step", held_step)
    return go


@pytest.mark.parametrize("streamed", [False, True])
def test_a_client_gone_before_its_first_token_has_its_request_cancelled(tokenizer, monkeypatch, streamed):
    """A client that times out (a load generator, lm-eval's retries) and closes its connection while its request
    waits: a non-streamed request then ran to its end regardless, holding a row; a streamed one until its first token
    was written. Now the handler sees the connection closed while it waits and cancels the request."""
    with base.serving(tokenizer) as server:
        scheduler = server.scheduler
        go = hold_steps(scheduler, monkeypatch)
        go.clear()  # no step: the request waits, and cannot end of itself
        try:
            connection = socket.create_connection(server.server_address[:2], timeout=30)
            body = json.dumps({"prompt": PROMPT, "max_tokens": 24, "ignore_eos": True, "stream": streamed}).encode()
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                               + body)
            base.wait_until(lambda: scheduler.waiting == 1)
            connection.close()
            base.wait_until(lambda: not server._in_flight)  # its handler noticed, released (cancelled) it
            assert not server._in_flight
        finally:
            go.set()  # else the server's stop would wait for the held step forever
        base.wait_until(lambda: scheduler.stats.requests_finished == 1)
        assert scheduler.stats.generated_tokens == 0
        status, stats = base.call(server, "GET", "/stats")
        assert (stats["running"], stats["waiting"], stats["requests_finished"]) == (0, 0, 1)


def test_while_stopping_new_connections_are_answered_503_not_left_unaccepted(tokenizer, monkeypatch):
    """SIGTERM while a request runs: `serve` finishes it before closing. Meanwhile it no longer accepted connections,
    so a new client (a load balancer's /health, the next request) hung in the listen backlog for the whole drain and
    was then reset, where the 503 'stopping' was meant for it."""
    from egmla.infer import GenerationEngine
    from egmla.infer.scheduler import Scheduler
    from egmla.infer.server import make_server, serve
    from tests.infer.helpers import tiny_model

    engine = GenerationEngine(tiny_model("eg-mla", seed=base.WEIGHTS_SEED), tokenizer, decode_path="gate-table")
    server = make_server(Scheduler(engine, max_batch=4, max_len=base.MAX_LEN, seed=0), MODEL, port=0)
    scheduler = server.scheduler
    go = hold_steps(scheduler, monkeypatch)
    go.clear()  # the running request cannot finish until the new client has its answer
    answers, lines = {}, []

    def client():
        answers["running"] = base.call(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})

    def operator():
        try:
            base.wait_until(lambda: scheduler.waiting == 1)
            os.kill(os.getpid(), signal.SIGTERM)
            base.wait_until(lambda: server.stopping)
            connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
            connection.request("GET", "/health")
            response = connection.getresponse()
            answers["new"] = response.status, json.loads(response.read())
            connection.close()
        except OSError as error:
            answers["new"] = error
        finally:
            go.set()

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    threads = [threading.Thread(target=client), threading.Thread(target=operator)]
    try:
        for thread in threads:
            thread.start()
        serve(server, announce=lines.append)  # here, in the main thread: it takes SIGTERM
        left = {signum: signal.getsignal(signum) for signum in handlers}  # serve puts back the handlers it found
    finally:
        go.set()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for thread in threads:
            thread.join(60)
    assert answers["new"] == (503, {"status": "stopping", "running": 0, "waiting": 1}), answers["new"]
    assert answers["running"][0] == 200 and lines[-1] == "egmla serve: stopped"
    assert left == handlers


def strict_json(data: bytes):
    """JSON as a strict parser reads it: Python's json takes NaN and Infinity, which JSON does not have."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(data, parse_constant=refuse)


def test_a_minus_infinite_logprob_is_written_as_valid_json(tokenizer, monkeypatch):
    """A token the model rules out (logit -inf) has log-probability -inf: json wrote -Infinity, which JavaScript's
    JSON.parse and other strict clients refuse. Written as -9999.0, vLLM's value, in every logprobs shape."""
    import torch

    with base.serving(tokenizer, chat_template="{{ messages[0].content }}") as server:
        model = server.scheduler.engine.model
        forward = model.forward

        def three_tokens(*args, **kwargs):  # every token but 0, 1 and 2 ruled out
            logits = forward(*args, **kwargs)
            return logits.masked_fill(torch.arange(logits.shape[-1]) >= 3, float("-inf"))

        monkeypatch.setattr(model, "forward", three_tokens)
        body = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
        answers = []
        for path, fields in (("/v1/completions", {"prompt": PROMPT, "logprobs": 5, "echo": True}),
                             ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}],
                                                       "logprobs": True, "top_logprobs": 5})):
            request = base.urllib.request.Request(server.url + path, data=json.dumps({**body, **fields}).encode())
            with base.urllib.request.urlopen(request, timeout=60) as response:
                answers.append(strict_json(response.read())["choices"][0]["logprobs"])
            request = base.urllib.request.Request(server.url + path, data=json.dumps(
                {**body, **fields, "echo": False, "stream": True}).encode())
            with base.urllib.request.urlopen(request, timeout=60) as response:
                for line in response:
                    if line.startswith(b"data: {"):
                        strict_json(line[6:])
    legacy, chat = answers
    assert sorted(legacy["top_logprobs"][-1].values())[:2] == [-9999.0, -9999.0]
    assert [t["logprob"] for t in chat["content"][-1]["top_logprobs"]][-2:] == [-9999.0, -9999.0]
    assert legacy["token_logprobs"][1] == -9999.0  # a prompt token the model ruled out (echo)


def test_a_model_is_retrieved_by_its_id(server):
    """GET /v1/models/{id} (the openai client's models.retrieve) was a 404 for every id."""
    status, model = base.call(server, "GET", f"/v1/models/{MODEL}")
    _, models = base.call(server, "GET", "/v1/models")
    assert status == 200 and model == models["data"][0] and model["object"] == "model"
    status, answer = base.call(server, "GET", "/v1/models/gpt-4o")
    assert status == 404 and answer["error"]["code"] == "model_not_found" and answer["error"]["param"] == "model"
    assert f"'gpt-4o' does not exist: this server serves '{MODEL}' only" in answer["error"]["message"]
    status, answer = base.call(server, "POST", f"/v1/models/{MODEL}", {})
    assert status == 405 and "takes GET, HEAD" in answer["error"]["message"]


def test_stream_options_without_stream_is_a_400(server):
    """stream_options on a request that does not stream were ignored; vLLM refuses them (the client meant a stream)."""
    status, answer = base.call(server, "POST", "/v1/completions",
                               {"prompt": PROMPT, "max_tokens": 2, "stream_options": {"include_usage": True}})
    assert status == 400 and answer["error"]["param"] == "stream_options"
    assert "without stream: true" in answer["error"]["message"]
    assert base.complete(server, prompt=PROMPT, max_tokens=2, stream_options=None)["usage"]["completion_tokens"] == 2


def test_a_tokens_own_logprob_is_always_among_its_alternatives(server):
    """OpenAI's legacy logprobs (and vLLM's): "the API will always return the logprob of the sampled token, so there
    may be up to logprobs+1 elements". A sampled or echoed token outside the k most likely was missing from its
    top_logprobs, and logprobs=0 gave {} where OpenAI gives the token itself."""
    body = dict(prompt=PROMPT, max_tokens=8, temperature=1.5, seed=3, ignore_eos=True, echo=True)
    for k in (0, 1, 3):
        logprobs = base.complete(server, logprobs=k, **body)["choices"][0]["logprobs"]
        assert logprobs["top_logprobs"][0] is None  # the prompt's first token: nothing predicts it
        beyond_k = 0
        for token, value, top in zip(logprobs["tokens"][1:], logprobs["token_logprobs"][1:],
                                     logprobs["top_logprobs"][1:]):
            assert top[token] >= value and k <= len(top) <= k + 1  # >=: a likelier id that decodes alike keeps its
            beyond_k += len(top) == k + 1
        assert beyond_k  # the echoed prompt of a random model: some of its tokens lie outside the top k
    chunks = [c for c in base.stream(server, prompt=PROMPT, max_tokens=8, temperature=1.5, seed=3, ignore_eos=True,
                                     logprobs=0) if c != "[DONE]" and c["choices"][0]["logprobs"]]
    for chunk in chunks:  # streamed alike
        streamed = chunk["choices"][0]["logprobs"]
        assert streamed["top_logprobs"] == [{t: v} for t, v in zip(streamed["tokens"], streamed["token_logprobs"])]


def test_many_prompts_beyond_the_room_name_the_prompt_not_n(server):
    """A list of prompts with n=1 that can never be queued was refused with param "n" and "send a smaller n"."""
    status, answer = base.call(server, "POST", "/v1/completions", {"prompt": [PROMPT] * (4 + 64 + 1), "max_tokens": 2})
    assert status == 400 and answer["error"]["param"] == "prompt"
    assert "69 prompts x n=1 = 69 choices" in answer["error"]["message"] and "fewer prompts" in answer["error"]["message"]
    status, answer = base.call(server, "POST", "/v1/completions", {"prompt": [PROMPT] * 35, "n": 2, "max_tokens": 2})
    assert status == 400 and "35 prompts x n=2 = 70 choices" in answer["error"]["message"]
    assert len(base.complete(server, prompt=[PROMPT] * 34, n=2, max_tokens=1)["choices"]) == 68  # fits: served


def test_include_usage_must_be_a_boolean(server):
    """stream_options.include_usage was read as truthy: "false" (a string) added the usage chunk."""
    status, answer = base.call(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "stream": True,
                                                                    "stream_options": {"include_usage": "false"}})
    assert status == 400 and answer["error"]["param"] == "stream_options"
    assert "stream_options.include_usage='false': must be true or false" in answer["error"]["message"]
    events = base.stream(server, prompt=PROMPT, max_tokens=2, stream_options={"include_usage": False})
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
