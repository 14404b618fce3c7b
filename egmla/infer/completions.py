"""OpenAI's completions request (POST /v1/completions) for `egmla serve`: every field checked, an `ApiError` naming
the first bad one (its value and the fix), the prompts encoded and one `SamplingParams` per sample. The checks of the
fields chat completions share (egmla/infer/chat.py) are here too: `check_body`, `generation_fields`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from egmla.infer.sampling import SamplingParams
from egmla.infer.scheduler import MAX_TOP_LOGPROBS

# OpenAI fields this server does not implement: the values that mean "not used", and why.
UNSUPPORTED = {
    "presence_penalty": ((None, 0), "sampling has temperature, top_p and top_k only (egmla.infer.sampling)"),
    "frequency_penalty": ((None, 0), "sampling has temperature, top_p and top_k only (egmla.infer.sampling)"),
    "logit_bias": ((None, {}), "sampling has temperature, top_p and top_k only (egmla.infer.sampling)"),
    "suffix": ((None, ""), "the model only continues a prompt; it does not fill in before a suffix"),
}


class ApiError(Exception):
    """An error response: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
        self.headers = headers or {}  # sent with the answer (a 405's Allow)

    def body(self) -> dict:
        kind = "rate_limit_error" if self.status == 429 else "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class CompletionRequest:
    """A checked POST /v1/completions body. Its choices: every sample (`sampling`) of every prompt, prompt-major."""

    prompts: list[list[int]]  # token ids of each prompt
    prompt_texts: list[str | None]  # each prompt as text where it was given as text (else decoded when needed)
    sampling: list[SamplingParams]  # of sample j of every prompt (seed + j where a seed is given)
    max_tokens: int
    stop: list[str]
    ignore_eos: bool
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    logprobs: int | None  # None, or each token's log-probability and this many most likely tokens
    echo: bool  # the prompt comes back in front of the completion (with its log-probabilities if logprobs is set)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompts)


def parse_completion_request(body, model_name: str, encode: Callable[[object, int], list[int]],
                             max_choices: int | None = None) -> CompletionRequest:
    """Check a request body field by field (ApiError naming the first bad one); `encode(prompt, index)` gives a
    prompt's token ids or raises ValueError (`GenerationEngine.encode`). Unknown fields are ignored, as OpenAI
    clients send extras. max_choices: the most choices a call can ever have queued (the scheduler's max_batch +
    max_waiting); a larger n, or more prompts x n, is refused before its samples are made or its prompts encoded."""
    check_body(body, model_name, '{"prompt": "Hello", "max_tokens": 16}', UNSUPPORTED)
    common = generation_fields(body, max_choices)
    max_tokens = integer_field(body, "max_tokens", 16, minimum=0)
    logprobs, echo = integer_field(body, "logprobs", None, minimum=0), boolean_field(body, "echo")
    if max_tokens == 0 and not (echo and logprobs is not None):
        raise ApiError(400, "max_tokens=0 generates nothing: it serves to score a prompt, with echo and logprobs; "
                            "otherwise give max_tokens >= 1", "max_tokens")
    check_top_logprobs(logprobs, "logprobs")
    if echo and common["stream"]:
        raise ApiError(400, "echo with stream is not supported: ask for the prompt back without streaming", "echo")
    raw = body.get("prompt")
    texts = [raw] if isinstance(raw, str) else [p if isinstance(p, str) else None for p in raw] \
        if isinstance(raw, list) and not _token_ids(raw) else [None]
    choices = len(texts) * len(common["sampling"])
    if max_choices is not None and choices > max_choices:  # many prompts, n of 1 or more: before they are encoded
        raise ApiError(400, f"{len(texts)} prompts x n={len(common['sampling'])} = {choices} choices at once can "
                            f"never be queued here: at most max_batch + max_waiting = {max_choices}; send fewer "
                            f"prompts per call (or a smaller n)", "prompt")
    return CompletionRequest(_prompts(raw, encode), texts, max_tokens=max_tokens, logprobs=logprobs, echo=echo,
                             **common)


def check_body(body, model_name: str, example: str, unsupported: dict) -> None:
    """What every generation endpoint checks first: a JSON object, the served model (or none), and none of the
    `unsupported` fields (name -> (the values that mean "not used", why)) set to anything else."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body is a JSON {type(body).__name__}: send an object such as {example}")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"model={model!r}: this server serves {model_name!r} only (GET /v1/models); give that "
                            f"name or leave model out", "model", "model_not_found")
    for name, (unused, why) in unsupported.items():
        if body.get(name) not in unused:
            raise ApiError(400, f"{name}={body[name]!r} is not supported: {why}; leave it out", name)


def generation_fields(body: dict, max_choices: int | None) -> dict:
    """The fields completions and chat completions share, checked: n (as its samples' `sampling`, seed + j for
    sample j where a seed is given), temperature, top_p, top_k, stop, ignore_eos, stream and stream_options; as
    `CompletionRequest`'s keyword arguments."""
    n = integer_field(body, "n", 1, minimum=1)
    if max_choices is not None and n > max_choices:  # before the samples are made: n=10**9 makes 10**9
        raise ApiError(400, f"n={n}: {n} choices at once can never be queued here: at most max_batch + max_waiting "
                            f"= {max_choices}; send a smaller n", "n")
    if integer_field(body, "best_of", n, minimum=1) != n:
        raise ApiError(400, f"best_of={body['best_of']!r} is not supported: it ranks samples by log probability, "
                            f"which the scheduler does not keep; leave it out or set it to n={n}", "best_of")
    seed = integer_field(body, "seed", None)
    if seed is not None and not -2**63 <= seed <= 2**64 - n:
        raise ApiError(400, f"seed={seed}: must lie in [-2**63, 2**64 - n] (sample j of each prompt takes seed + j)",
                       "seed")
    temperature, top_p = _number(body, "temperature", 1.0), _number(body, "top_p", 1.0)
    if temperature < 0:
        raise ApiError(400, f"temperature={temperature}: must be >= 0 (0 = greedy)", "temperature")
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p={top_p}: must lie in (0, 1] (1 = no nucleus filter)", "top_p")
    top_k = max(0, integer_field(body, "top_k", 0, minimum=-1))  # -1 is vLLM's "off", as 0 here
    try:  # a temperature below GREEDY_BELOW is greedy (SamplingParams makes it 0)
        sampling = [SamplingParams(temperature, top_k, top_p, None if seed is None else seed + j) for j in range(n)]
    except ValueError as error:  # its message names the field and the range
        raise ApiError(400, str(error)) from error
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop={stop!r}: must be a non-empty string or a list of them", "stop")
    stream, options = boolean_field(body, "stream"), body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options={options!r}: must be an object such as {{\"include_usage\": true}}",
                       "stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):  # strict, as every other flag here: the
        # string "false" was read as true, adding a usage chunk that the client did not ask for
        raise ApiError(400, f"stream_options.include_usage={include_usage!r}: must be true or false",
                       "stream_options")
    if options and not stream:  # vLLM's rule: options of a stream that there is not are a mistake, not a no-op
        raise ApiError(400, f"stream_options={options!r} without stream: true: stream_options set a stream's "
                            f"options; add \"stream\": true or leave stream_options out", "stream_options")
    return dict(sampling=sampling, stop=stops, ignore_eos=boolean_field(body, "ignore_eos"), stream=stream,
                include_usage=bool(include_usage))


def check_top_logprobs(value: int | None, name: str) -> None:
    if value is not None and value > MAX_TOP_LOGPROBS:
        raise ApiError(400, f"{name}={value}: at most {MAX_TOP_LOGPROBS} alternatives per token", name)


def _prompts(prompt, encode) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, a list of token ids, or a list of lists of them."""
    shape = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if prompt is None:
        raise ApiError(400, f"prompt is missing: give {shape}", "prompt")
    if isinstance(prompt, str) or _token_ids(prompt) and prompt:
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, f"prompt={prompt!r}: must be {shape}", "prompt")
    prompts = []
    for index, one in enumerate(prompt):
        if not (isinstance(one, str) or _token_ids(one)):
            raise ApiError(400, f"prompt[{index}]={one!r}: must be a string or a list of token ids", "prompt")
        if isinstance(one, str):
            check_text(one, f"prompt[{index}]", "prompt")
        try:
            prompts.append(encode(one, index))
        except ValueError as error:  # empty, too long for the model, ids outside the vocabulary
            raise ApiError(400, str(error), "prompt") from error
    return prompts


def check_text(text: str, name: str, param: str) -> None:
    """ApiError unless the text is valid Unicode: JSON's \\ud800 escapes give Python strings holding half of a UTF-16
    surrogate pair, which the tokenizer refuses with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ApiError(400, f"{name} holds a lone UTF-16 surrogate ({text[error.start]!r} at character {error.start}): "
                            f"send valid Unicode text" + (" (or the prompt as token ids)" if param == "prompt" else ""),
                       param) from None


def _token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def integer_field(body: dict, name: str, default, minimum: int | None = None):
    value = body.get(name)
    if value is None:  # clients send null for "the default"
        return default
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ApiError(400, f"{name}={value!r}: must be an integer{'' if minimum is None else f' >= {minimum}'}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if number is None or not math.isfinite(number):  # Python's json reads NaN and Infinity, which JSON does not have
        raise ApiError(400, f"{name}={value!r}: must be a finite number", name)
    return number


def boolean_field(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{name}={value!r}: must be true or false", name)
    return default if value is None else value
