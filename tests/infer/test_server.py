"""`egmla serve` (egmla/infer/server.py): OpenAI's completions API over the continuous-batching scheduler gives what
`GenerationEngine.generate` gives each prompt alone; choices, streaming, stops, seeds, concurrency, every error status,
cancellation when a client goes away, the other endpoints and the command."""
import contextlib
import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from tests.infer.helpers import tiny_model

from egmla.cli import main as egmla_main
from egmla.infer import GenerationEngine, SamplingParams
from egmla.infer.requests import SchedulerStats
from egmla.infer.scheduler import Scheduler
from egmla.infer.server import make_server

MODEL = "tiny-eg-mla"
WEIGHTS_SEED = 21
MAX_LEN = 32  # positions per row; the model's max_seq_len is 48
PROMPT = "To be, or not"
SEA = "a sea of troubles"  # its greedy completion ends on the `eos` fixture's token after 8 tokens


@contextlib.contextmanager
def serving(tokenizer, eos_token_id: int | None = None, max_waiting: int = 64, chat_template=None):
    """A server on a free port over a 4-row scheduler, its HTTP loop in a thread."""
    engine = GenerationEngine(tiny_model("eg-mla", seed=WEIGHTS_SEED), tokenizer, decode_path="gate-table")
    scheduler = Scheduler(engine, max_batch=4, max_len=MAX_LEN, max_waiting=max_waiting, seed=0)
    server = make_server(scheduler, MODEL, port=0, eos_token_id=eos_token_id, chat_template=chat_template)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def engine(tokenizer):
    """The same weights in an engine of their own (the server's scheduler owns its engine while it runs)."""
    return GenerationEngine(tiny_model("eg-mla", seed=WEIGHTS_SEED), tokenizer, decode_path="gate-table")


@pytest.fixture(scope="module")
def eos(engine):
    """A token the random model produces (its <|endoftext|> it hardly does): completions end on it at various steps."""
    return engine.generate([SEA], max_new_tokens=8)[0].token_ids[-1]


@pytest.fixture(scope="module")
def server(tokenizer, eos):
    with serving(tokenizer, eos) as server:
        yield server


def call(server, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of one request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def complete(server, **body) -> dict:
    status, answer = call(server, "POST", "/v1/completions", body)
    assert status == 200, answer
    return answer


def stream(server, path: str = "/v1/completions", **body) -> list:
    """The data of every server-sent event, parsed (the last is the string '[DONE]')."""
    request = urllib.request.Request(server.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        events = [line.decode().removeprefix("data: ").strip() for line in response if line.startswith(b"data: ")]
    return [json.loads(e) if e != "[DONE]" else e for e in events]


def test_a_greedy_completion_is_the_engines_text_and_token_count(server, engine, eos, tokenizer, capfd):
    for ignore_eos, finish_reason in ((False, "stop"), (True, "length")):
        expected = engine.generate([SEA], max_new_tokens=12, eos_token_id=None if ignore_eos else eos)[0]
        answer = complete(server, model=MODEL, prompt=SEA, max_tokens=12, temperature=0, ignore_eos=ignore_eos)
        assert answer["object"] == "text_completion" and answer["model"] == MODEL and answer["id"].startswith("cmpl-")
        assert answer["choices"] == [{"text": expected.text, "index": 0, "logprobs": None,
                                      "finish_reason": finish_reason}]
        prompt_tokens = len(tokenizer.encode(SEA).ids)
        assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(expected.token_ids),
                                   "total_tokens": prompt_tokens + len(expected.token_ids)}
    assert len(expected.token_ids) == 12
    # the same prompt as token ids, and the log line of each request
    assert complete(server, prompt=tokenizer.encode(SEA).ids, max_tokens=12, temperature=0,
                    ignore_eos=True)["choices"] == answer["choices"]
    line = f'"POST /v1/completions" 200 prompt_tokens={prompt_tokens} completion_tokens=12 '
    log, deadline = "", time.monotonic() + 10
    while log.count(line) < 2 and time.monotonic() < deadline:  # a handler logs just after its client has the answer
        log += capfd.readouterr().err
        time.sleep(0.01)
    assert log.count(line) == 2


def test_prompts_and_n_give_seeded_choices_prompt_major(server, engine):
    prompts = [PROMPT, "whether 'tis nobler"]
    answer = complete(server, prompt=prompts, n=2, seed=5, max_tokens=8, ignore_eos=True)
    texts = [choice["text"] for choice in answer["choices"]]
    assert [choice["index"] for choice in answer["choices"]] == [0, 1, 2, 3]
    # choice (prompt p, sample j) is prompt p alone with seed 5 + j
    alone = [engine.generate([p], max_new_tokens=8, sampling=SamplingParams(1.0, 0, 1.0, seed=5 + j))[0].text
             for p in prompts for j in range(2)]
    assert texts == alone and len(set(texts)) == 4
    assert complete(server, prompt=prompts[0], seed=5, max_tokens=8, ignore_eos=True)["choices"][0]["text"] == texts[0]
    assert complete(server, prompt=prompts[0], seed=6, max_tokens=8, ignore_eos=True)["choices"][0]["text"] == texts[1]
    assert answer["usage"]["completion_tokens"] == 4 * 8


def test_streamed_chunks_add_up_to_the_completion(server):
    body = dict(prompt=[SEA, "Café"], max_tokens=10, temperature=0)  # ending on eos and by length
    whole = complete(server, **body)
    events = stream(server, **body, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert {chunk["id"] for chunk in chunks} == {usage["id"]} and all(c["object"] == "text_completion" for c in chunks)
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks)  # OpenAI's shape: null until the last
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [choice["finish_reason"]]
    plain = stream(server, **body)
    assert plain[-2]["choices"][0]["finish_reason"] is not None  # no usage chunk unless asked
    assert not any("usage" in chunk for chunk in plain[:-1])  # nor a usage field


def test_stop_strings_end_the_completion(server, engine, eos):
    free = engine.generate(["Café"], max_new_tokens=12, eos_token_id=eos)[0].text
    stop = free[3:6]
    expected = engine.generate(["Café"], max_new_tokens=12, eos_token_id=eos, stop_strings=[stop])[0]
    assert expected.finish_reason == "stop"
    for stops in (stop, ["never said", stop]):
        choice = complete(server, prompt="Café", max_tokens=12, temperature=0, stop=stops)["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (expected.text, "stop")


def test_concurrent_clients_each_get_their_own_completion(server, engine, eos):
    prompts = [PROMPT, "the slings and arrows", "Café naïve", SEA, "whether 'tis nobler", "To be"]
    lengths = [9, 4, 12, 10, 3, 10]
    expected = [engine.generate([p], max_new_tokens=n, eos_token_id=eos)[0].text for p, n in zip(prompts, lengths)]
    got = {}

    def client(i):
        got[i] = complete(server, prompt=prompts[i], max_tokens=lengths[i], temperature=0)["choices"][0]["text"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]  # 6 clients, 4 rows
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [got.get(i) for i in range(len(prompts))] == expected


@pytest.mark.parametrize("body,status,param,message", [
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", "max_tokens=0 generates nothing"),
    ({"prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens", "max_tokens=-1: must be an integer >= 0"),
    ({"prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens", "max_tokens='many'"),
    ({"prompt": PROMPT, "logprobs": 21}, 400, "logprobs", "logprobs=21: at most 20"),
    ({"prompt": PROMPT, "echo": True, "stream": True}, 400, "echo", "echo with stream is not supported"),
    ({"prompt": PROMPT, "best_of": 3}, 400, "best_of", "best_of=3 is not supported"),
    ({"prompt": PROMPT, "presence_penalty": 0.5}, 400, "presence_penalty", "presence_penalty=0.5 is not supported"),
    ({"prompt": list(range(1, 41))}, 400, "prompt", "40 tokens, more than the max_len=32 positions per row"),
    # over the model's context too: told the row's limit, which binds, not max_seq_len (trimmed to 47, refused again)
    ({"prompt": list(range(1, 60))}, 400, "prompt", "59 tokens, more than the max_len=32 positions per row: shorten "
                                                    "it (or serve with a larger max_len, at most max_seq_len=48)"),
    ({"prompt": [PROMPT, ""]}, 400, "prompt", "prompts[1] is empty"),
    ({"prompt": [[1, 2], "x", {"a": 1}]}, 400, "prompt", "prompt[2]={'a': 1}"),
    ({"max_tokens": 4}, 400, "prompt", "prompt is missing"),
    ({"prompt": PROMPT, "temperature": -1}, 400, "temperature", "temperature=-1.0: must be >= 0"),
    ({"prompt": PROMPT, "stop": ["ok", ""]}, 400, "stop", "stop=['ok', '']"),
    ({"prompt": PROMPT, "seed": 2**64}, 400, "seed", "seed=18446744073709551616"),
    ({"prompt": PROMPT, "stream": "yes"}, 400, "stream", "stream='yes': must be true or false"),
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "model", "model='gpt-4': this server serves 'tiny-eg-mla' only"),
])
def test_bad_requests_are_refused_naming_the_field(server, body, status, param, message):
    got, answer = call(server, "POST", "/v1/completions", {"user": "an unknown field is ignored", **body})
    assert got == status and set(answer) == {"error"}
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert message in answer["error"]["message"]


def test_a_body_too_large_is_refused_unread(server):
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Length", str(10**12))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "at most" in json.loads(response.read())["error"]["message"]
    connection.close()


def test_invalid_json_and_unknown_paths(server):
    status, answer = call(server, "POST", "/v1/completions", raw=b'{"prompt": "x",')
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, answer = call(server, "POST", "/v1/completions", raw=b'["x"]')
    assert status == 400 and "JSON list" in answer["error"]["message"]
    for method, path in (("GET", "/v1/embeddings"), ("POST", "/v1/responses")):
        status, answer = call(server, method, path, {} if method == "POST" else None)
        assert status == 404 and f"no endpoint {method} {path}" in answer["error"]["message"]
    status, answer = call(server, "GET", "/v1/completions")  # a path there is, by another method
    assert status == 405 and "GET /v1/completions is not allowed: /v1/completions takes POST" in answer["error"]["message"]


def test_a_full_queue_answers_429(tokenizer, monkeypatch):
    """Room is the free rows plus max_waiting: an idle server with 4 rows and max_waiting=0 takes n=4; with 3 rows
    busy, n=2 must wait and is answered 429 (retry later); n=5 can never fit: 400."""
    with serving(tokenizer, max_waiting=0) as server:
        status, answer = call(server, "POST", "/v1/completions", {"prompt": PROMPT, "n": 4, "max_tokens": 2})
        assert status == 200 and len(answer["choices"]) == 4
        slow_down(server.scheduler, monkeypatch)
        busy = [server.scheduler.submit([5, 6, 7], max_new_tokens=20) for _ in range(3)]
        wait_until(lambda: server.scheduler.running == 3)
        status, answer = call(server, "POST", "/v1/completions", {"prompt": PROMPT, "n": 2, "max_tokens": 2})
        assert status == 429 and answer["error"]["code"] == "queue_full" and answer["error"]["type"] == "rate_limit_error"
        assert "max_waiting=0" in answer["error"]["message"]
        status, answer = call(server, "POST", "/v1/completions", {"prompt": PROMPT, "n": 1, "max_tokens": 2})
        assert status == 200
        for handle in busy:
            handle.cancel()
        status, answer = call(server, "POST", "/v1/completions", {"prompt": PROMPT, "n": 5, "max_tokens": 2})
    assert status == 400 and answer["error"]["param"] == "n"


def test_a_failing_generation_answers_500_and_the_next_request_runs(tokenizer, monkeypatch):
    with serving(tokenizer) as server:
        model = server.scheduler.engine.model

        def broken(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError("out of memory (simulated)")

        monkeypatch.setattr(model, "forward", broken)
        status, answer = call(server, "POST", "/v1/completions", {"prompt": PROMPT})
        assert status == 500 and "simulated" in answer["error"]["message"]
        assert answer["error"]["type"] == "server_error" and "Traceback" not in answer["error"]["message"]
        events = stream(server, prompt=PROMPT)
        assert "simulated" in events[0]["error"]["message"] and events[-1] == "[DONE]"
        monkeypatch.undo()
        assert complete(server, prompt=PROMPT, max_tokens=3)["usage"]["completion_tokens"] == 3


def slow_down(scheduler, monkeypatch) -> None:
    """20 ms a step: long enough for a client to act while its request runs."""
    step = scheduler.step

    def slow_step():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(scheduler, "step", slow_step)


def wait_until(condition) -> None:
    deadline = time.monotonic() + 20
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("cancel_running", [False, True])
def test_a_stopping_server_finishes_or_cancels_what_runs_and_refuses_the_rest(tokenizer, monkeypatch, cancel_running):
    with serving(tokenizer) as server:
        slow_down(server.scheduler, monkeypatch)
        answers = {}
        body = {"prompt": PROMPT, "max_tokens": 24, "ignore_eos": True}
        client = threading.Thread(target=lambda: answers.update(running=call(server, "POST", "/v1/completions", body)))
        client.start()
        wait_until(lambda: server.scheduler.running == 1)
        server.stop(cancel_running=cancel_running)
        client.join(30)
        status, answer = answers["running"]
        if cancel_running:
            assert status == 503 and "stopped before this request finished" in answer["error"]["message"]
        else:
            assert status == 200 and answer["usage"]["completion_tokens"] == 24
        status, answer = call(server, "POST", "/v1/completions", {"prompt": PROMPT})
        assert status == 503 and answer["error"]["code"] == "stopping"
        status, health = call(server, "GET", "/health")
        assert status == 503 and health["status"] == "stopping"


def test_a_client_gone_mid_stream_has_its_request_cancelled(tokenizer, monkeypatch):
    with serving(tokenizer) as server:
        scheduler = server.scheduler
        slow_down(scheduler, monkeypatch)  # the client leaves long before its 24 tokens are done
        host, port = server.server_address[:2]
        connection = http.client.HTTPConnection(host, port, timeout=60)
        connection.request("POST", "/v1/completions", json.dumps(
            {"prompt": PROMPT, "max_tokens": 24, "stream": True, "ignore_eos": True, "temperature": 0}))
        response = connection.getresponse()
        assert response.readline().startswith(b"data: ")
        response.close()
        connection.close()
        wait_until(lambda: scheduler.stats.requests_finished == 1)
        assert scheduler.stats.requests_finished == 1 and scheduler.running == 0
        assert scheduler.stats.generated_tokens < 12  # cancelled, not run to its end


def test_models_health_and_stats(server):
    status, models = call(server, "GET", "/v1/models")
    assert status == 200 and models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    status, health = call(server, "GET", "/health")
    assert status == 200 and health == {"status": "ok", "running": 0, "waiting": 0}
    complete(server, prompt=PROMPT, max_tokens=2)
    status, stats = call(server, "GET", "/stats")
    assert status == 200 and set(SchedulerStats.__dataclass_fields__) <= set(stats)
    assert stats["requests_finished"] >= 1 and stats["decode_path"] == "gate-table" and stats["device"] == "cpu"
    assert (stats["max_batch"], stats["max_len"], stats["model"]) == (4, MAX_LEN, MODEL)


def test_the_command_explains_itself_and_refuses_a_bad_port(capsys, run_dir, server):
    with pytest.raises(SystemExit) as exit_info:
        egmla_main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--max-batch" in out and "--model-name" in out and "OpenAI" in out
    taken = str(server.server_address[1])
    assert egmla_main(["serve", "--run", str(run_dir), "--port", taken]) == 2
    assert f"--port {taken}: cannot listen there" in capsys.readouterr().err
    assert egmla_main(["serve", "--run", str(run_dir), "--port", "70000"]) == 2
    assert "--port 70000: must lie in [0, 65535]" in capsys.readouterr().err
    assert egmla_main(["serve", "--run", str(run_dir), "--max-batch", "4", "--memory-fraction", "2"]) == 2
    assert "--memory-fraction 2.0: must lie in (0, 1]" in capsys.readouterr().err
    assert egmla_main(["serve", "--run", str(run_dir), "--port", "0", "--max-batch", "many"]) == 2
    assert "--max-batch 'many': give a whole number of rows, or auto" in capsys.readouterr().err
    assert egmla_main(["serve", "--run", str(run_dir), "--port", "0", "--max-batch", "auto"]) == 2
    assert "--max-batch auto sizes the cache from free CUDA memory; the device is cpu" in capsys.readouterr().err


def test_max_batch_auto_fits_the_rows_in_the_free_memory():
    """--max-batch auto's plan: rows x bytes per row + a prefill's activations within the share of free memory, the
    next row over it; the grouped layout and working memory for EG-MLA under auto; a clear error when none fits."""
    import torch

    from egmla.accounting import measured_cache_bytes_per_token
    from egmla.attention.cache import Fp8KeepRope
    from egmla.config import preset
    from egmla.infer.plan import serving_max_batch
    from egmla.variants import variant_config

    base = preset("paper-base", max_seq_len=2048)
    for name, layout in (("mla-kv64", "kernel"), ("egmla-kv64", "grouped")):
        config = variant_config(name, base)
        plan = serving_max_batch(config, 2048, 8 * 10**9, torch.bfloat16, "auto", 8192, memory_fraction=0.5)
        assert plan["cache_layout"] == layout and plan["max_batch"] == plan["fits"] > 1
        budget = 0.5 * 8 * 10**9 - plan["activation_bytes"]
        assert plan["fits"] * plan["bytes_per_row"] <= budget < (plan["fits"] + 1) * plan["bytes_per_row"]
        per_token, _ = measured_cache_bytes_per_token(config, torch.bfloat16, layout)
        assert plan["bytes_per_row"] == per_token * 2048 + plan["decode_workspace_bytes_per_row"]
        assert (plan["decode_workspace_bytes_per_row"] > 0) == (layout == "grouped")
        assert serving_max_batch(config, 2048, 8 * 10**9, torch.bfloat16, "auto", 8192, limit=16)["max_batch"] == 16
        graphs = serving_max_batch(config, 2048, 8 * 10**9, torch.bfloat16, "auto", 8192, memory_fraction=0.5,
                                   prefill_steps=True)  # + the prefill steps' scratch (8,192 positions) and graphs
        assert graphs["activation_bytes"] - plan["activation_bytes"] > 8192 * per_token
        # the logits every captured graph keeps are reserved too: the most rows whose cache and those logits fit
        kept = serving_max_batch(config, 2048, 8 * 10**9, torch.bfloat16, "auto", 8192, memory_fraction=0.5,
                                 graph_logits_rows=lambda rows: 40 * rows)  # a steep stand-in, to move the answer
        logits = 40 * config.vocab_size * 2
        rows = kept["max_batch"]
        assert plan["max_batch"] > rows >= 1 and kept["graph_logits_bytes"] == rows * logits
        assert rows * (plan["bytes_per_row"] + logits) <= budget < (rows + 1) * (plan["bytes_per_row"] + logits)
    # offloaded gate tables: the row cache at its bound (every position's id distinct) is kept too; at 2,048 positions
    # a row reaches a sixteenth of the vocabulary and two the whole tables' size
    per_id = 12 * 512 * 2
    offloaded = serving_max_batch(config, 2048, 8 * 10**9, torch.bfloat16, "auto", 8192, memory_fraction=0.5,
                                  gate_row_bytes=per_id)
    rows = offloaded["max_batch"]
    assert offloaded["gate_row_cache_bytes"] == min(32768, 2 * rows * 2048) * per_id + 12 * 32768
    assert rows * plan["bytes_per_row"] + offloaded["gate_row_cache_bytes"] <= budget
    assert plan["max_batch"] >= rows >= plan["max_batch"] - 1 - 32768 * per_id // plan["bytes_per_row"]
    assert plan["gate_row_cache_bytes"] == 0
    # the cache's own dtype where it is not the model's (what `egmla serve --cache-dtype` passes): its bytes per row,
    # the working memory still in the model's dtype
    for cache_dtype, stored in ((torch.float8_e4m3fn,) * 2, ("fp8-keep-rope", Fp8KeepRope(torch.bfloat16))):
        small = serving_max_batch(config, 2048, 8 * 10**9, torch.bfloat16, "auto", 8192, memory_fraction=0.5,
                                  cache_dtype=cache_dtype)
        per_token, _ = measured_cache_bytes_per_token(config, stored, "grouped")
        assert small["bytes_per_row"] == per_token * 2048 + plan["decode_workspace_bytes_per_row"]
        assert small["max_batch"] > plan["max_batch"]
    with pytest.raises(ValueError, match="offloaded gate tables' rows up to 0.05 GB"):  # 4,096 rows at one row's bound
        serving_max_batch(config, 2048, 8 * 10**8, torch.bfloat16, "auto", 8192, gate_row_bytes=per_id)
    # what `egmla serve` passes: every decode bucket's logits up to the top one, and the start's prefill steps'
    from types import SimpleNamespace

    from egmla.infer.prefill_step import prefill_buckets
    from egmla.infer.serve_cli import graph_logits_rows

    engine = SimpleNamespace(batch_buckets=(1, 2, 4, 8, 16, 32), cuda_graphs=True, prefill_graphs=True)
    prefill = sum(r for r, _ in prefill_buckets(20, 1024, 8192, 256))
    assert prefill > 20 and graph_logits_rows(engine, 20, 1024, 8192, 256) == 63 + prefill  # 1 + 2 + ... + 32
    assert graph_logits_rows(engine, 20, 1024, 8192, 0) == 63
    engine.cuda_graphs = engine.prefill_graphs = False
    assert graph_logits_rows(engine, 20, 1024, 8192, 256) == 0
    with pytest.raises(ValueError, match="lower --max-len or --prefill-chunk"):
        serving_max_batch(config, 2048, 10**8, torch.bfloat16, "auto", 32768)
    with pytest.raises(ValueError, match="memory_fraction=1.5"):
        serving_max_batch(config, 2048, 10**9, torch.bfloat16, "auto", 8192, memory_fraction=1.5)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_the_command_serves_a_run_and_stops_on_ctrl_c(run_dir, tokenizer, stop_signal):
    expected = GenerationEngine(tiny_model("eg-mla"), tokenizer, decode_path="gate-table").generate(
        [PROMPT], max_new_tokens=6, eos_token_id=0)[0].text  # the run_dir fixture's model and <|endoftext|>
    command = [sys.executable, "-m", "egmla", "serve", "--run", str(run_dir.parent / "latest"), "--port", "0",
               "--max-batch", "2", "--decode-path", "gate-table"]
    # started with SIGINT ignored, as a shell starts a background job: the server must stop all the same
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        first = process.stdout.readline()
        url = re.search(r"(http://[\d.]+:\d+)/v1 ", first)
        if not (url and "model 'egmla-tiny' (EG-MLA" in first and "max batch 2" in first):
            process.kill()  # before reading its stderr, which a live server never ends
            pytest.fail(first + process.communicate(timeout=30)[1])

        class Remote:  # what call() needs of a server
            pass

        remote = Remote()
        remote.url = url.group(1)
        assert complete(remote, prompt=PROMPT, max_tokens=6, temperature=0)["choices"][0]["text"] == expected
        assert call(remote, "GET", "/v1/models")[1]["data"][0]["id"] == "egmla-tiny"
        process.send_signal(stop_signal)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "stopping" in out and out.rstrip().endswith("egmla serve: stopped")
    assert '"POST /v1/completions" 200' in err and "Traceback" not in err


def test_logprobs_and_echo_are_the_models_own(server, engine, tokenizer, eos):
    """logprobs=k: each completion token's text, log-probability (the model's, before temperature) and its k most
    likely alternatives; echo: the prompt in front, its tokens' log-probabilities too (None for the first) — what
    lm-evaluation-harness's local-completions scores with; streamed chunks carry their tokens' log-probabilities."""
    prompt_ids = tokenizer.encode(PROMPT).ids
    answer = complete(server, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, echo=True)
    choice = answer["choices"][0]
    generated = engine.generate([PROMPT], max_new_tokens=5, eos_token_id=eos)[0]
    assert choice["text"] == PROMPT + generated.text
    logprobs = choice["logprobs"]
    ids = prompt_ids + generated.token_ids
    assert logprobs["tokens"] == [tokenizer.decode([i]) for i in ids]
    with torch.no_grad():
        full = engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    want = [None] + [float(full[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert max(abs(a - b) for a, b in zip(logprobs["token_logprobs"][1:], want[1:])) < 1e-4
    assert all(len(top) <= 2 + 1 and max(top.values()) >= value - 1e-6  # + 1: the token itself, where not among them
               for top, value in zip(logprobs["top_logprobs"][1:], logprobs["token_logprobs"][1:]))
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    plain = complete(server, prompt=PROMPT, max_tokens=5, temperature=0)["choices"][0]
    assert plain["logprobs"] is None and plain["text"] == generated.text
    sampled = complete(server, prompt=PROMPT, max_tokens=4, temperature=1.3, seed=5, logprobs=0,
                       ignore_eos=True)["choices"][0]
    sampled = sampled["logprobs"]  # logprobs=0: each token's own value alone among its alternatives, as OpenAI's
    assert sampled["top_logprobs"] == [{token: value} for token, value in zip(sampled["tokens"],
                                                                                sampled["token_logprobs"])]
    chunks = [e for e in stream(server, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1) if e != "[DONE]"]
    streamed = [lp for c in chunks if c["choices"][0]["logprobs"] for lp in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert len(streamed) == len(generated.token_ids)  # every generated token reported once
    assert max(abs(a - b) for a, b in zip(streamed, logprobs["token_logprobs"][len(prompt_ids):])) < 1e-4


def test_tokenizer_endpoints_speak_vllms_shapes(server, tokenizer):
    status, info = call(server, "GET", "/tokenizer_info")
    assert status == 200 and set(info) >= {"eos_token", "bos_token", "pad_token", "model_max_length"}
    assert tokenizer.token_to_id(info["eos_token"]) == server.eos_token_id
    status, tokens = call(server, "POST", "/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    assert status == 200 and tokens["tokens"] == tokenizer.encode(PROMPT).ids and tokens["count"] == len(tokens["tokens"])
    status, text = call(server, "POST", "/detokenize", {"tokens": tokens["tokens"]})
    assert status == 200 and text["prompt"] == PROMPT
    status, error = call(server, "POST", "/detokenize", {"tokens": [1, 10**6]})
    assert status == 400 and error["error"]["param"] == "tokens"
    status, error = call(server, "POST", "/tokenize", {"text": PROMPT})
    assert status == 400 and error["error"]["param"] == "prompt"


LM_EVAL_CLIENT = """
import json, sys
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI
url, model, max_length, pairs, prompt = json.loads(sys.argv[1])
lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model=model, tokenizer_backend="remote",
                         num_concurrent=1, max_retries=1, max_length=max_length)
scores = lm.loglikelihood([Instance("loglikelihood", {}, tuple(p), i) for i, p in enumerate(pairs)], disable_tqdm=True)
texts = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["\\n\\n"], "max_gen_toks": 10}), 0)],
                          disable_tqdm=True)
print(json.dumps({"scores": scores, "texts": texts}))
"""


def test_lm_eval_local_completions_scores_through_the_server(server, engine, tokenizer, eos):
    """lm-evaluation-harness's own `local-completions` model, in a process of its own as a client would be, against
    the server (tokenizing remotely through /tokenize): loglikelihoods equal a direct forward of the model, and
    generate_until gives the engine's text."""
    pairs = [("To be, or not", " to be"), ("whether 'tis nobler", " in the mind")]
    argument = json.dumps([server.url, MODEL, MAX_LEN, pairs, SEA])
    client = subprocess.run([sys.executable, "-c", LM_EVAL_CLIENT, argument], capture_output=True, text=True,
                            timeout=300)
    assert client.returncode == 0, client.stderr[-2000:]
    answer = json.loads(client.stdout.strip().splitlines()[-1])
    for (context, continuation), (score, greedy) in zip(pairs, answer["scores"]):
        context_ids, continuation_ids = tokenizer.encode(context).ids, tokenizer.encode(continuation).ids
        ids = context_ids + continuation_ids
        with torch.no_grad():
            full = engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)
        want = sum(float(full[t - 1, ids[t]]) for t in range(len(context_ids), len(ids)))
        want_greedy = all(int(full[t - 1].argmax()) == ids[t] for t in range(len(context_ids), len(ids)))
        assert score == pytest.approx(want, abs=1e-3) and greedy == want_greedy
    # lm-eval stops at the end-of-text token's text too (here a plain token: see the `eos` fixture)
    stops = ["\n\n", tokenizer.decode([eos])]
    [text] = answer["texts"]
    assert text == engine.generate([SEA], max_new_tokens=10, stop_strings=stops, eos_token_id=eos)[0].text and text


def test_metrics_in_prometheus_text_follow_the_scheduler(server):
    complete(server, prompt=PROMPT, max_tokens=3, temperature=0, ignore_eos=True)
    request = urllib.request.Request(server.url + "/metrics")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    _, stats = call(server, "GET", "/stats")
    samples = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    label = f'model_name="{MODEL}"'
    assert samples[f"egmla_requests_finished_total{{{label}}}"] == stats["requests_finished"] >= 1
    assert samples[f"egmla_generation_tokens_total{{{label}}}"] == stats["generated_tokens"]
    assert samples[f"egmla_requests_running{{{label}}}"] == 0
    count = samples[f"egmla_e2e_request_latency_seconds_count{{{label}}}"]
    assert count == stats["requests_finished"] == samples[f'egmla_e2e_request_latency_seconds_bucket{{{label},le="+Inf"}}']
    buckets = [v for k, v in samples.items() if k.startswith("egmla_time_to_first_token_seconds_bucket")]
    assert buckets == sorted(buckets) and 0 < samples[f"egmla_e2e_request_latency_seconds_sum{{{label}}}"]
    assert all(line.startswith("# HELP ") or line.startswith("# TYPE ") or line.startswith("egmla_")
               for line in text.splitlines())


def test_logprob_alternatives_that_decode_alike_keep_the_most_likely_value():
    from egmla.infer.responses import _logprobs

    def decode(ids):
        return {5: "a", 6: "\ufffd", 7: "\ufffd"}[ids[0]]

    out = _logprobs(decode, [5], [-0.1], [{6: -0.5, 7: -3.0, 5: -0.1}])
    assert out["top_logprobs"] == [{"\ufffd": -0.5, "a": -0.1}]


def test_offsets_agree_with_and_without_streaming_and_n_beyond_the_room_is_a_400(server):
    body = dict(prompt="Café naïve", max_tokens=6, temperature=0, logprobs=1, ignore_eos=True)
    whole = complete(server, **body)["choices"][0]["logprobs"]["text_offset"]
    chunks = [e for e in stream(server, **body) if e != "[DONE]" and e["choices"][0]["logprobs"]]
    assert [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]] == whole
    status, answer = call(server, "POST", "/v1/completions", {"prompt": PROMPT, "n": 4 + 64 + 1})
    assert status == 400 and answer["error"]["param"] == "n" and "never be queued" in answer["error"]["message"]


def test_max_tokens_0_with_echo_scores_the_prompt(server, engine, tokenizer):
    """OpenAI's way to score a text: echo + logprobs + max_tokens 0 returns the prompt and its tokens' log-probabilities,
    nothing generated."""
    choice = complete(server, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)["choices"][0]
    ids = tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        full = engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    values = choice["logprobs"]["token_logprobs"]
    assert values[0] is None and len(values) == len(ids)
    assert max(abs(v - float(full[t - 1, ids[t]])) for t, v in enumerate(values) if t) < 1e-4


def test_a_histogram_read_while_observed_is_always_consistent():
    """/metrics reads the latency histograms from a server thread while the scheduler's thread observes: every
    snapshot has its cumulative buckets non-decreasing and none above its count."""
    from egmla.infer.requests import SECONDS, Histogram

    histogram, stop = Histogram(SECONDS), threading.Event()

    def observe():
        value = 0
        while not stop.is_set():
            histogram.observe((value % 97) * 0.01)
            value += 1

    writer = threading.Thread(target=observe)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: mid-observation, too
    writer.start()
    try:
        for _ in range(2000):
            seen = histogram.snapshot()
            assert all(a <= b for a, b in zip(seen.counts, seen.counts[1:])) and seen.counts[-1] <= seen.count
    finally:
        stop.set()
        writer.join()
        sys.setswitchinterval(interval)
    assert histogram.snapshot().count == histogram.count > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_max_batch_auto_on_a_gpu_reserves_the_graphs_logits(capsys):
    """--max-batch auto on CUDA: rows from free memory, the start-time graphs' logits reserved and printed."""
    from argparse import Namespace

    from egmla.infer.serve_cli import _max_batch, graph_logits_rows

    engine = GenerationEngine(tiny_model("mla", seed=1).cuda())
    args = Namespace(max_batch="auto", max_len=None, prefill_chunk=None, memory_fraction=0.01,
                     capture_prefill_tokens=256)
    rows = _max_batch(args, engine)
    out = capsys.readouterr().out
    assert 512 >= rows >= 1 and f"--max-batch auto = {rows} rows" in out and "for the CUDA graphs' logits" in out
    reserved = float(re.search(r"and ([0-9.]+) GB for the CUDA graphs' logits", out).group(1))
    config = engine.config
    expected = graph_logits_rows(engine, rows, config.max_seq_len, engine.prefill_token_budget, 256)
    assert expected > 0 and abs(reserved - expected * config.vocab_size * 4 / 1e9) < 0.01  # fp32 tiny weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_max_batch_auto_keeps_room_for_offloaded_gate_rows(capsys):
    """--max-batch auto with --offload-gate-tables on CUDA: the row cache at its bound is kept and printed, and the
    rows that fit are no more than without it would be once the tables' own size is counted back."""
    from argparse import Namespace

    from egmla.infer.serve_cli import _max_batch

    engine = GenerationEngine(tiny_model("eg-mla", seed=1).cuda(), offload_gate_tables=True)
    args = Namespace(max_batch="auto", max_len=None, prefill_chunk=None, memory_fraction=0.01,
                     capture_prefill_tokens=256)
    rows = _max_batch(args, engine)
    out = capsys.readouterr().out
    kept = float(re.search(r", ([0-9.]+) GB kept for the offloaded gate tables' rows", out).group(1))
    assert rows >= 1 and kept == pytest.approx(engine.offload.host_bytes() / 1e9 + 12 * engine.config.vocab_size / 1e9,
                                               abs=0.01)  # tiny: every row's ids can reach the whole vocabulary
