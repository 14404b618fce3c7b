"""`egmla serve`: an OpenAI-compatible HTTP server over the continuous-batching `Scheduler`.

    POST /v1/completions   OpenAI's completions API: text or token-id prompts, n, stream, stop, seed, logprobs,
                           echo, and vLLM's top_k and ignore_eos; one choice per prompt and sample, prompt-major
    POST /v1/chat/completions
                           OpenAI's chat API: the messages rendered by the chat template (egmla/infer/chat.py), then
                           generated as the completion of that prompt; the same machinery, the chat shapes
    GET  /v1/models, GET /v1/models/{id}
                           the one model served
    GET  /health           {"status": "ok", "running": n, "waiting": n}; 503 while stopping
    GET  /stats            the scheduler's counters (SchedulerStats), its decode path and device
    GET  /metrics          the same counters and latency histograms in Prometheus' text format
    GET  /tokenizer_info, POST /tokenize, POST /detokenize
                           vLLM's tokenizer endpoints (lm-evaluation-harness's local-completions tokenizes with them)

Each connection gets a handler thread (`ThreadingHTTPServer`) that checks its request, submits one scheduler request
per choice and waits on their handles; the scheduler's one thread runs the model for all of them, requests joining
and leaving the running batch between decode steps (egmla/infer/scheduler.py). Errors come in OpenAI's shape
{"error": {"message", "type", "param", "code"}}, never as a traceback. A client that goes away (mid-stream, or while
its requests wait or run unstreamed) has its requests cancelled, which frees their rows before the next step.

Only the standard library (and jinja2, which torch brings, for chat templates): the GPU machines this runs on have no
network to install a web framework.
"""
from __future__ import annotations

import json
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator
from urllib.parse import unquote, urlsplit

from egmla.infer.chat import ChatTemplate, parse_chat_request
from egmla.infer.completions import ApiError, CompletionRequest, check_text, parse_completion_request
from egmla.infer.engine import TokenEvent
from egmla.infer.requests import RequestHandle
from egmla.infer.responses import CHAT, COMPLETION, Shape, TokenText, usage
from egmla.infer.scheduler import Scheduler

MODEL_PATH = "/v1/models/{id}"  # the one route with a parameter: the rest of the path, which may hold "/"
# path -> {HTTP method: handler method}; HEAD is every GET route's, without the body
ROUTES = {"/v1/completions": {"POST": "_completions"}, "/v1/chat/completions": {"POST": "_chat_completions"},
          "/v1/models": {"GET": "_models"}, MODEL_PATH: {"GET": "_model"}, "/health": {"GET": "_health"},
          "/stats": {"GET": "_stats"}, "/metrics": {"GET": "_metrics"}, "/tokenizer_info": {"GET": "_tokenizer_info"},
          "/tokenize": {"POST": "_tokenize"}, "/detokenize": {"POST": "_detokenize"}}
ENDPOINTS = ", ".join(f"{method} {path}" for path, methods in ROUTES.items() for method in methods)
RESPONSES_WAIT_SECONDS = 10.0  # on stop: how long handler threads get to write their last responses
MAX_BODY_BYTES = 64 * 2**20  # a completions body: prompts of token ids fit many times over
IDLE_CONNECTION_SECONDS = 60  # a kept-alive connection with no new request is closed after this
# a handler waiting for its requests' tokens looks this often whether its client has closed the connection (a
# client that timed out): its requests are then cancelled, freeing their rows, rather than run for nobody
CLIENT_CHECK_SECONDS = 0.25
MAX_CHUNK_LINE = 1024  # a chunked body's size line (hex size and extensions) or trailer line, at most


class CompletionServer(ThreadingHTTPServer):
    """The HTTP server: one `Scheduler` serves every handler thread (make it with `make_server`)."""

    request_queue_size = 1024  # the listen backlog (default 5): a burst of clients connecting at once is not refused
    block_on_close = False  # server_close waits for the requests in flight (stop), not for idle kept-alive connections

    def __init__(self, address: tuple[str, int], scheduler: Scheduler, model_name: str, eos_token_id: int | None,
                 chat_template: ChatTemplate | None = None):
        self.scheduler, self.model_name, self.eos_token_id = scheduler, model_name, eos_token_id
        self.chat_template = chat_template
        self.tokens = TokenText(scheduler.engine.tokenizer)
        self.created = int(time.time())
        self.stopping = False
        self._in_flight: set[RequestHandle] = set()
        self._changed = threading.Condition()
        super().__init__(address, CompletionHandler)  # last: a port it cannot bind calls server_close, i.e. stop

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def describe(self) -> str:
        """One line: where, what model, how it decodes."""
        scheduler = self.scheduler
        engine = scheduler.engine
        graphs = ", CUDA graphs" if engine.cuda_graphs else ""
        if engine.offload is not None:  # the tables' size: the rows of the ids in use stay on the device
            graphs += f", gate tables in host memory ({engine.offload.host_bytes() / 1e6:,.1f} MB)"
        chat = f"chat template {self.chat_template.origin}" if self.chat_template else "no chat template"
        return (f"egmla serve: {self.url}/v1 - model {self.model_name!r} ({engine.config.variant_name()}), decode path "
                f"{engine.decode_path}{graphs}, {engine.device}, max batch {scheduler.max_batch}, max len "
                f"{scheduler.max_len}, {chat}")

    @property
    def max_choices(self) -> int:
        """The most choices one call can ever have queued: a larger n is refused before its samples are made."""
        return self.scheduler.max_batch + self.scheduler.max_waiting

    def model_object(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "egmla"}

    def submit(self, request: CompletionRequest) -> list[RequestHandle]:
        """One scheduler request per choice, in choice order, queued all together or none (`Scheduler.submit_all`)."""
        if self.stopping:
            raise ApiError(503, "the server is stopping: no new requests", code="stopping")
        eos_token_id = None if request.ignore_eos else self.eos_token_id
        choices = [dict(prompt=prompt_ids, max_new_tokens=request.max_tokens, sampling=sampling,
                        eos_token_id=eos_token_id, stop_strings=request.stop, logprobs=request.logprobs,
                        prompt_logprobs=request.echo and request.logprobs is not None, stream=request.stream)
                   for prompt_ids in request.prompts for sampling in request.sampling]
        try:
            handles = self.scheduler.submit_all(choices)
        except OverflowError as error:
            raise ApiError(429, str(error), code="queue_full") from error
        except RuntimeError as error:
            raise ApiError(503, str(error), code="stopping") from error
        except ValueError as error:  # every other field was checked by the parser: the prompt against max_len, n
            raise ApiError(400, str(error), "n" if "at once" in str(error) else "prompt") from error
        with self._changed:
            self._in_flight.update(handles)
        return handles

    def release(self, handles: list[RequestHandle]) -> None:
        """The handler is done with these: cancel any still generating (its client is gone), forget them."""
        for handle in handles:
            handle.cancel()  # no effect on a finished one
        with self._changed:
            self._in_flight.difference_update(handles)
            self._changed.notify_all()

    def stop(self, cancel_running: bool = False) -> None:
        """Refuse new requests (503), finish the submitted ones (or cancel them), stop the scheduler, and give the
        handler threads time to write their responses."""
        self.stopping = True
        if cancel_running:
            with self._changed:
                in_flight = list(self._in_flight)
            for handle in in_flight:
                handle.cancel()
        self.scheduler.stop()
        with self._changed:
            self._changed.wait_for(lambda: not self._in_flight, RESPONSES_WAIT_SECONDS)

    def server_close(self) -> None:
        self.stop(cancel_running=True)
        super().server_close()

    def handle_error(self, request, client_address) -> None:
        # an error outside a request's handling (a connection reset while reading it): one line, no traceback
        print(f"{client_address[0]} connection error: {sys.exc_info()[1]!r}", file=sys.stderr, flush=True)


class CompletionHandler(BaseHTTPRequestHandler):
    """One connection's requests (HTTP/1.1 keep-alive; a stream closes its connection at its end)."""

    server: CompletionServer
    protocol_version = "HTTP/1.1"
    # what an answer to a request line it cannot parse speaks: http.server's default, HTTP/0.9, has no status line
    # or headers, so a client saw a bare body instead of the 400
    default_request_version = "HTTP/1.0"
    server_version = "egmla"
    timeout = IDLE_CONNECTION_SECONDS

    def log_message(self, format, *args) -> None:
        pass  # http.server's own lines: replaced by one line per request (_log)

    def _dispatch(self) -> None:
        """Every method's handler: the route of the path and method, or a 404 / 405 naming what there is."""
        started = time.perf_counter()
        self.status, self.token_counts, self.note = None, (0, 0), ""  # for the log line
        try:
            self.body = self._read_body()  # read before any answer, or a kept-alive connection would parse it next
            self.route_path = path = urlsplit(self.path).path.rstrip("/") or "/"
            route = _route(path)
            if route is None:
                raise ApiError(404, f"no endpoint {self.command} {path}: this server has {ENDPOINTS}")
            methods = ROUTES[route]
            handler = methods.get("GET" if self.command == "HEAD" else self.command)
            if handler is None:
                allow = ", ".join([*methods, *(["HEAD"] if "GET" in methods else [])])
                raise ApiError(405, f"{self.command} {path} is not allowed: {path} takes {allow}",
                               code="method_not_allowed", headers={"Allow": allow})
            getattr(self, handler)()
        except ApiError as error:
            self._send_error(error)
        except OSError as error:  # the client went away (reset, closed) or stopped reading
            self.note = f" client gone: {error!r}"
            self.close_connection = True
        except Exception as error:  # noqa: BLE001 - a bug: the operator gets the traceback, the client none
            traceback.print_exc()
            self._send_error(ApiError(500, f"internal error: {error!r}"))
        self._log(time.perf_counter() - started)

    # http.server calls do_<METHOD>; a method without one is its 501. These answer 405 where the path exists.
    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own error answers (a malformed request line, an over-long URL or header line, an HTTP
        version or method it does not know) in OpenAI's JSON shape rather than its HTML page; the connection closes,
        as there (the request may not have been read to its end)."""
        text = message or self.responses.get(code, ("error",))[0]
        self.close_connection = True
        self.status = None
        self._send_json(code, ApiError(code, text).body())
        print(f'{self.client_address[0]} "{self.requestline}" {code} error: {text}', file=sys.stderr, flush=True)

    def _read_body(self) -> bytes:
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None:  # RFC 9112: it overrides any Content-Length
            if encoding.strip().lower() != "chunked":
                self.close_connection = True  # where the body ends is unknown
                raise ApiError(400, f"Transfer-Encoding: {encoding} is not supported: send the body with a "
                                    f"Content-Length, or chunked")
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            if self.command != "POST":
                return b""
            self.close_connection = True  # whatever body follows must not be parsed as the next request
            raise ApiError(411, "a POST needs its body's size: send a Content-Length header (or Transfer-Encoding: "
                                "chunked)", code="length_required")
        if not length.isdigit():
            self.close_connection = True  # where the body ends is unknown
            raise ApiError(400, f"Content-Length={length!r}: must be the body's size in bytes")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # not read
            raise ApiError(413, f"Content-Length={length}: a request body is at most {MAX_BODY_BYTES:,} bytes here")
        return self.rfile.read(int(length))

    def _read_chunked(self) -> bytes:
        """A body sent in chunks (RFC 9112 §7.1: httpx and requests send a generator so): each a hex size line
        (extensions after ';' ignored), its bytes and a CRLF, up to a chunk of size 0 and the trailer lines (ignored)
        that end with an empty one. A malformed one closes the connection: where the body ends is unknown."""
        body = bytearray()
        while True:
            line = self.rfile.readline(MAX_CHUNK_LINE)
            size = line.split(b";", 1)[0].strip()
            if not size or size.strip(b"0123456789abcdefABCDEF"):
                self.close_connection = True
                raise ApiError(400, f"a chunked body's chunk size line {line[:40]!r} is not a hex number: send each "
                                    f"chunk as its size in hex, CRLF, its bytes, CRLF, and a 0 chunk last")
            size = int(size, 16)
            if len(body) + size > MAX_BODY_BYTES:
                self.close_connection = True  # not read
                raise ApiError(413, f"a chunked request body of at least {len(body) + size:,} bytes: a request "
                                    f"body is at most {MAX_BODY_BYTES:,} bytes here")
            if size == 0:
                break
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise ConnectionResetError("the client closed the connection inside a chunk")
            body += chunk
            if self.rfile.readline(MAX_CHUNK_LINE) not in (b"\r\n", b"\n"):
                self.close_connection = True
                raise ApiError(400, f"a chunked body's chunk of {size} bytes is not followed by CRLF: the size line "
                                    f"must give the chunk's exact size in hex")
        while self.rfile.readline(MAX_CHUNK_LINE) not in (b"\r\n", b"\n", b""):  # the trailer lines, if any
            pass
        return bytes(body)

    def _json_body(self):
        try:
            return json.loads(self.body)
        except ValueError as error:  # UnicodeDecodeError included
            raise ApiError(400, f"the request body is not valid JSON ({error}): send a JSON object") from error
        except RecursionError:  # arrays or objects nested thousands deep: the client's body, not a server fault
            raise ApiError(400, "the request body nests JSON arrays or objects too deeply to parse: send a JSON "
                                "object such as {\"prompt\": \"Hello\", \"max_tokens\": 16}") from None

    # ---- endpoints -------------------------------------------------------------------------------
    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [self.server.model_object()]})

    def _model(self) -> None:
        """GET /v1/models/{id} (the openai client's models.retrieve): the model object, if it is ours."""
        wanted = unquote(self.route_path.removeprefix(MODEL_PATH.removesuffix("{id}")))
        if wanted != self.server.model_name:
            raise ApiError(404, f"model {wanted!r} does not exist: this server serves {self.server.model_name!r} only "
                                f"(GET /v1/models)", "model", "model_not_found")
        self._send_json(200, self.server.model_object())

    def _health(self) -> None:
        scheduler = self.server.scheduler
        status = "stopping" if self.server.stopping else "ok"
        self._send_json(503 if self.server.stopping else 200,
                        {"status": status, "running": scheduler.running, "waiting": scheduler.waiting})

    def _stats(self) -> None:
        scheduler = self.server.scheduler
        engine = scheduler.engine
        self._send_json(200, {**scheduler.stats.as_dict(), "running": scheduler.running, "waiting": scheduler.waiting,
                              "max_batch": scheduler.max_batch, "max_len": scheduler.max_len,
                              "max_waiting": scheduler.max_waiting, "model": self.server.model_name,
                              "variant": engine.config.variant_name(), "decode_path": engine.decode_path,
                              "cuda_graphs": engine.cuda_graphs, "device": str(engine.device)})

    def _metrics(self) -> None:
        """Prometheus' text format: the scheduler's counters, running and waiting requests, latency histograms."""
        scheduler = self.server.scheduler
        data = prometheus_text(scheduler.stats, scheduler.running, scheduler.waiting, self.server.model_name).encode()
        self._send(200, "text/plain; version=0.0.4; charset=utf-8", data)

    # vLLM's tokenizer endpoints: lm-evaluation-harness's local-completions tokenizes through them
    # (tokenizer_backend=remote), so it needs no copy of the run's tokenizer
    def _tokenizer_info(self) -> None:
        server = self.server
        tokenizer = server.scheduler.engine.tokenizer
        eos = None if server.eos_token_id is None else tokenizer.id_to_token(server.eos_token_id)
        self._send_json(200, {"eos_token": eos, "bos_token": None, "pad_token": None,
                              "model_max_length": server.scheduler.max_len,
                              "vocab_size": tokenizer.get_vocab_size(), "tokenizer_class": "tokenizers byte-level BPE"})

    def _tokenize(self) -> None:
        body = self._json_body()
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            raise ApiError(400, f"prompt={prompt!r}: /tokenize takes {{\"prompt\": \"some text\"}}", "prompt")
        check_text(prompt, "prompt", "prompt")
        ids = self.server.scheduler.engine.tokenizer.encode(prompt).ids  # the run's tokenizer adds no special tokens
        self._send_json(200, {"tokens": ids, "count": len(ids), "max_model_len": self.server.scheduler.max_len})

    def _detokenize(self) -> None:
        body = self._json_body()
        tokens = body.get("tokens") if isinstance(body, dict) else None
        vocab = self.server.scheduler.engine.config.vocab_size
        if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                 for t in tokens)):
            raise ApiError(400, f"tokens={tokens!r}: /detokenize takes {{\"tokens\": [ids in [0, {vocab})]}}", "tokens")
        self._send_json(200, {"prompt": self.server.scheduler.engine.tokenizer.decode(tokens)})

    def _completions(self) -> None:
        server = self.server
        self._generate(parse_completion_request(self._json_body(), server.model_name, self._encode,
                                                server.max_choices), COMPLETION)

    def _chat_completions(self) -> None:
        server = self.server
        self._generate(parse_chat_request(self._json_body(), server.model_name, self._encode,
                                          server.chat_template, server.scheduler.max_len, server.max_choices), CHAT)

    def _encode(self, prompt, index: int) -> list[int]:
        """A prompt's ids, checked against the row's positions (--max-len) where fewer than the model's context: a
        prompt over both is told the limit that binds, not one it would still exceed after trimming to it."""
        scheduler = self.server.scheduler
        return scheduler.engine.encode(prompt, index, max_len=scheduler.max_len)

    def _generate(self, request: CompletionRequest, shape: Shape) -> None:
        """Both generation endpoints: submit the checked request's choices, answer (streamed or whole) in the
        endpoint's shape, and release the handles (cancelling what still runs: the client is gone)."""
        server = self.server
        handles = server.submit(request)
        self.token_counts = (request.prompt_tokens, 0)
        self.response_fields = {"id": f"{shape.id_prefix}{uuid.uuid4().hex}", "object": shape.object,
                                "created": int(time.time()), "model": server.model_name}
        try:
            (self._stream if request.stream else self._complete)(request, handles, shape)
        finally:
            server.release(handles)

    def _complete(self, request: CompletionRequest, handles: list[RequestHandle], shape: Shape) -> None:
        results = []
        for handle in handles:
            try:
                results.append(self._result(handle))
            except RuntimeError as error:  # the model raised; the scheduler goes on with the next requests
                raise ApiError(500, str(error), code="generation_failed") from error
        if any(result.finish_reason == "cancelled" for result in results):
            raise ApiError(503, "the server stopped before this request finished", code="stopping")
        completion_tokens = sum(len(result.token_ids) for result in results)
        self.token_counts = (request.prompt_tokens, completion_tokens)
        tokens = self.server.tokens
        choices = []
        for index, result in enumerate(results):
            prompt = index // len(request.sampling)
            prefix = ""
            if request.echo:
                prefix = request.prompt_texts[prompt]
                prefix = tokens.decode(request.prompts[prompt]) if prefix is None else prefix
            logprobs = None
            if request.logprobs is not None:
                ids, values, tops = result.token_ids, result.logprobs, result.top_logprobs
                if request.echo:
                    ids = request.prompts[prompt] + ids
                    values, tops = result.prompt_logprobs + values, result.prompt_top_logprobs + tops
                logprobs = shape.logprobs(tokens, ids, values, tops, 0)
            choices.append(shape.choice(index, prefix + result.text, result.finish_reason, logprobs))
        self._send_json(200, {**self.response_fields, "choices": choices, "usage": usage(*self.token_counts)})

    def _result(self, handle: RequestHandle):
        """handle.result(), or ConnectionResetError as soon as the client is seen gone (the handles are then
        released, i.e. cancelled)."""
        while True:
            try:
                return handle.result(timeout=CLIENT_CHECK_SECONDS)
            except TimeoutError:
                if self._client_gone():
                    raise ConnectionResetError("the client closed its connection before its answer") from None

    def _client_gone(self) -> bool:
        """Whether the client has closed or reset the connection: readable with nothing to read. (poll, not select:
        select fails on descriptors beyond 1,024, and many clients make that many. A client that half-closes after
        sending its request reads as gone, as under uvicorn, vLLM's server.)"""
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        if not poller.poll(0):
            return False
        try:
            return not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:  # reset
            return True

    def _stream(self, request: CompletionRequest, handles: list[RequestHandle], shape: Shape) -> None:
        """Server-sent events: each choice's opening chunk where the shape has one (chat's role), a chunk per token
        event with text (and each choice's last, with its finish_reason), a usage chunk if asked (the others then
        carry "usage": null, as OpenAI's), then [DONE]. The connection closes at the end (its length is not known
        ahead)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.status, self.close_connection = 200, True
        completion_tokens = 0
        tokens = self.server.tokens
        fields = {**self.response_fields, "object": shape.chunk_object,
                  **({"usage": None} if request.include_usage else {})}
        for index in range(len(handles) if shape.opening else 0):
            self._send_event({**fields, "choices": [shape.opening(index)]})
        offsets: dict[int, int] = {}  # each choice's tokens decoded alone so far, for their text_offset
        for index, event in _merged_events(handles, self._client_gone):
            if isinstance(event, BaseException) or event.finish_reason == "cancelled":
                error = (ApiError(500, str(event), code="generation_failed") if isinstance(event, BaseException)
                         else ApiError(503, "the server stopped before this request finished", code="stopping"))
                self._send_event(error.body())
                self.note = f" stream ended by: {error}"
                break
            completion_tokens += 1
            self.token_counts = (request.prompt_tokens, completion_tokens)
            logprobs = None
            if event.logprob is not None:
                start = offsets.get(index, 0)
                logprobs = shape.logprobs(tokens, [event.token_id], [event.logprob], [event.top_logprobs], start)
                offsets[index] = start + len(tokens.decode([event.token_id]))  # each alone, as without streaming
            if event.text or event.finish_reason is not None or logprobs is not None:
                self._send_event({**fields, "choices": [shape.delta(index, event.text, event.finish_reason, logprobs)]})
        else:
            if request.include_usage:
                self._send_event({**fields, "choices": [], "usage": usage(*self.token_counts)})
        self.wfile.write(b"data: [DONE]\n\n")

    # ---- writing -------------------------------------------------------------------------------
    def _send_event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        self._send(status, "application/json", json.dumps(payload).encode(), headers)

    def _send(self, status: int, content_type: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection and "Connection" not in (headers or {}):
            self.send_header("Connection", "close")  # a kept-alive client must not send its next request on it
        self.end_headers()
        self.status = status
        if self.command != "HEAD":  # HEAD: GET's status and headers, no body
            self.wfile.write(data)

    def _send_error(self, error: ApiError) -> None:
        self.note = f" error: {error}"
        if self.status is not None:  # a stream's headers went out already: nothing more can be said
            self.close_connection = True
            return
        try:
            self._send_json(error.status, error.body(), error.headers)
        except OSError:
            self.close_connection = True

    def _log(self, seconds: float) -> None:
        prompt_tokens, completion_tokens = self.token_counts
        print(f'{self.client_address[0]} "{self.command} {self.path}" {self.status} prompt_tokens={prompt_tokens} '
              f"completion_tokens={completion_tokens} {seconds:.3f}s{self.note}", file=sys.stderr, flush=True)


METRICS = [  # (name, Prometheus type, SchedulerStats field, help); the two gauges are written apart
    ("egmla_requests_finished_total", "counter", "requests_finished", "Requests finished (any reason)."),
    ("egmla_prompt_tokens_total", "counter", "prompt_tokens", "Prompt tokens of the finished requests."),
    ("egmla_generation_tokens_total", "counter", "generated_tokens", "Tokens generated for the finished requests."),
    ("egmla_decode_steps_total", "counter", "decode_steps", "Decode steps run."),
    ("egmla_prefill_calls_total", "counter", "prefill_calls", "Prefill forwards run."),
    ("egmla_prefill_graph_calls_total", "counter", "prefill_graph_calls",
     "Of which fixed-shape prefill steps (CUDA graphs on a GPU)."),
    ("egmla_late_graph_captures_total", "counter", "late_captures",
     "CUDA graphs captured when first met while serving (each holds every request up; see --capture-prefill-tokens)."),
    ("egmla_prefills_shared_total", "counter", "prefills_shared", "Prompts served by copying an identical one's row."),
    ("egmla_prefix_cache_hits_total", "counter", "prefix_hits", "Requests started from a cached prompt prefix."),
    ("egmla_prefix_cache_tokens_total", "counter", "prefix_tokens_reused", "Prompt tokens not prefilled: cached."),
    ("egmla_busy_seconds_total", "counter", "busy_seconds", "Seconds the scheduler spent working."),
    ("egmla_time_to_first_token_seconds", "histogram", "time_to_first_token", "Submission to first token."),
    ("egmla_time_per_output_token_seconds", "histogram", "time_per_output_token", "Per token after the first."),
    ("egmla_e2e_request_latency_seconds", "histogram", "request_latency", "Submission to last token."),
]


def prometheus_text(stats, running: int, waiting: int, model_name: str) -> str:
    """The scheduler's metrics in Prometheus' text exposition format, labelled with the model's name."""
    escaped = model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # label value rules
    label = f'model_name="{escaped}"'
    lines = []
    for name, kind, attribute, help_text in METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        value = getattr(stats, attribute)
        if kind == "histogram":
            value = value.snapshot()
            for bound, count in zip(value.bounds, value.counts):
                lines.append(f'{name}_bucket{{{label},le="{bound:g}"}} {count}')
            lines += [f'{name}_bucket{{{label},le="+Inf"}} {value.count}', f"{name}_sum{{{label}}} {value.total!r}",
                      f"{name}_count{{{label}}} {value.count}"]
        else:
            lines.append(f"{name}{{{label}}} {value!r}")
    for name, value, help_text in (("egmla_requests_running", running, "Requests generating now."),
                                   ("egmla_requests_waiting", waiting, "Requests waiting for a row.")):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{{{label}}} {value}"]
    return "\n".join(lines) + "\n"


def _route(path: str) -> str | None:
    """The ROUTES key a path takes, if any."""
    if path in ROUTES:
        return path
    prefix = MODEL_PATH.removesuffix("{id}")
    return MODEL_PATH if path.startswith(prefix) and len(path) > len(prefix) else None


def _merged_events(handles: list[RequestHandle], client_gone: Callable[[], bool] = lambda: False
                   ) -> Iterator[tuple[int, TokenEvent | BaseException]]:
    """(choice index, event) for every handle's events as they come, in each handle's order; the error instead of
    the rest where generation failed. A reader thread per handle, as a handle's events() blocks. Raises
    ConnectionResetError once `client_gone()` while no event comes: a stream whose requests wait for rows writes
    nothing that would fail."""
    merged: queue.SimpleQueue = queue.SimpleQueue()

    def read(index: int, handle: RequestHandle) -> None:
        try:
            for event in handle.events():
                merged.put((index, event))
        except RuntimeError as error:
            merged.put((index, error))

    for index, handle in enumerate(handles):
        threading.Thread(target=read, args=(index, handle), name="egmla-stream", daemon=True).start()
    unfinished = len(handles)
    while unfinished:
        try:
            index, event = merged.get(timeout=CLIENT_CHECK_SECONDS)
        except queue.Empty:
            if client_gone():
                raise ConnectionResetError("the client closed its connection before its stream ended") from None
            continue
        if isinstance(event, BaseException) or event.finish_reason is not None:
            unfinished -= 1
        yield index, event


def make_server(scheduler: Scheduler, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                eos_token_id: int | None = None, capture_prefill_tokens: int = 0,
                chat_template: ChatTemplate | str | None = None) -> CompletionServer:
    """A server bound to host:port (port 0: any free one; `server.url` says which) with the scheduler started. Run it
    with `serve(server)` or `server.serve_forever()`; end with `server.shutdown()` and `server.server_close()`.

    scheduler: not started yet: its cache is allocated here first, so one that does not fit fails now rather than at
        the first request. Its engine needs the tokenizer (completions are text).
    eos_token_id: where requests end unless they ask for ignore_eos (None: only at max_tokens or a stop string).
    capture_prefill_tokens: also capture now the prefill graphs of fresh prompts of up to this many tokens
        (`Scheduler.capture_prefill_graphs`; 0: none, each is captured when first met; `egmla serve` passes
        --capture-prefill-tokens). Every decode bucket's graph is captured whatever it is.
    chat_template: what /v1/chat/completions renders messages with (`egmla.infer.chat.ChatTemplate`, or a template's
        text, given no bos_token and the eos token's text); None: chat requests are answered 400."""
    engine = scheduler.engine
    if engine.tokenizer is None:
        raise ValueError("the server answers with text: make the GenerationEngine with tokenizer=...")
    if eos_token_id is not None and not 0 <= eos_token_id < engine.config.vocab_size:
        raise ValueError(f"eos_token_id={eos_token_id}: outside [0, vocab_size={engine.config.vocab_size})")
    if isinstance(chat_template, str):
        eos = None if eos_token_id is None else engine.tokenizer.id_to_token(eos_token_id)
        chat_template = ChatTemplate(chat_template, eos_token=eos)
    server = CompletionServer((host, port), scheduler, model_name, eos_token_id, chat_template)
    scheduler.step()  # nothing to run: it allocates the cache and, under decode_path="auto", chooses the path
    _capture_graphs(scheduler, capture_prefill_tokens)
    scheduler.start()
    return server


def _capture_graphs(scheduler: Scheduler, prefill_tokens: int) -> None:
    """Every decode bucket's CUDA graph, and the prefill buckets of prompts up to `prefill_tokens` tokens, now rather
    than while the first requests wait; one line on stderr says how many and how long (none on a CPU or eager: no
    line)."""
    start = time.perf_counter()
    decode = scheduler.capture_graphs()
    decoded = time.perf_counter()
    prefill = scheduler.capture_prefill_graphs(prefill_tokens) if prefill_tokens else 0
    done = time.perf_counter()
    if decode or prefill:
        print(f"egmla serve: captured {decode} decode-step CUDA graphs in {decoded - start:.1f} s and {prefill} "
              f"prefill graphs (fresh prompts of up to {prefill_tokens} tokens) in {done - decoded:.1f} s",
              file=sys.stderr, flush=True)


def _print_now(line: str) -> None:
    print(line, flush=True)  # at once, for whoever reads the URL from a pipe


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def serve(server: CompletionServer, announce: Callable[[str], None] = _print_now) -> None:
    """Serve until Ctrl-C or SIGTERM (what `kill`, systemd and docker stop send), then stop cleanly: new requests get
    503, the submitted ones finish (a second signal cancels them), the scheduler stops and the socket closes.
    `announce` gets one line at start and at stop."""
    announce(server.describe())
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        # set explicitly: a process started in the background by a shell inherits SIGINT ignored, and Python leaves
        # it so; SIGTERM would otherwise end the process without stopping anything
        for signum in (signal.SIGINT, signal.SIGTERM):
            handlers[signum] = signal.signal(signum, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        scheduler = server.scheduler
        announce(f"egmla serve: stopping: finishing {scheduler.running + scheduler.waiting} requests "
                 f"(Ctrl-C again cancels them)")
        # go on accepting while they finish: a new client (a load balancer's /health, the next request) gets its 503
        # now, rather than waiting in the listen backlog for the whole drain and then being reset
        accepting = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                     name="egmla-stopping", daemon=True)
        accepting.start()
        try:
            server.stop()
        except KeyboardInterrupt:
            announce("egmla serve: cancelling the requests still running")
            server.stop(cancel_running=True)
        finally:
            server.shutdown()  # that loop (returns at once if it has not started: it then ends at its first check)
    finally:
        server.server_close()
        for signum, handler in handlers.items():  # as they were: serve may be called from a larger program
            signal.signal(signum, handler)
    announce("egmla serve: stopped")
