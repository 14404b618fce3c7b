"""The shapes of `egmla serve`'s answers: OpenAI's completions and chat completions objects, whole and streamed, with
their log-probabilities (legacy `logprobs` for completions, `logprobs.content` with each token's bytes for chat).
The server's machinery (egmla/infer/server.py) produces text, finish reasons and log-probabilities once; a `Shape`
writes them as one endpoint answers."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

# OpenAI's finish reasons for the engine's: an eos is a stop; "length" is max_tokens or the row's end.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
# the log-probability written for -inf (and NaN): JSON has no infinity, and Python's json writes -Infinity, which
# strict parsers refuse; vLLM writes this value
LOWEST_LOGPROB = -9999.0


def json_logprob(value: float | None) -> float | None:
    """A log-probability as JSON can hold it: -inf (a token the model rules out) and NaN as LOWEST_LOGPROB."""
    return value if value is None or value >= LOWEST_LOGPROB else LOWEST_LOGPROB


def _by_text(decode, alternatives: dict[int, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for token, value in alternatives.items():  # most likely first
        out.setdefault(decode([token]), json_logprob(value))
    return out


def _choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": FINISH_REASONS.get(finish_reason)}


def _logprobs(decode, ids: list[int], values: list, tops: list, start: int = 0) -> dict:
    """OpenAI's legacy logprobs object: each token's text, log-probability and most likely alternatives (by their
    text) with the token itself among them, and where each token's text starts (character offsets from `start`, each
    token decoded alone)."""
    tokens = [decode([token]) for token in ids]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=start))
    top = []
    for text, value, alternatives in zip(tokens, values, tops):
        if alternatives is None:  # the prompt's first token: nothing predicts it
            top.append(None)
            continue
        # keyed by text as OpenAI's: ids that decode alike (bytes of one character) keep the first, most likely, value
        by_text = _by_text(decode, alternatives)
        # OpenAI's rule (vLLM's too): "the API will always return the logprob of the sampled token, so there may be
        # up to logprobs+1 elements"; a sampled or echoed token outside the k most likely was missing, and
        # logprobs=0 gave {} where OpenAI gives the token itself
        by_text.setdefault(text, json_logprob(value))
        top.append(by_text)
    return {"tokens": tokens, "token_logprobs": [json_logprob(v) for v in values], "top_logprobs": top,
            "text_offset": offsets}


def _chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": FINISH_REASONS.get(finish_reason)}


def _chat_delta(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
            "finish_reason": FINISH_REASONS.get(finish_reason)}


def _chat_opening(index: int) -> dict:
    """A chat stream's first chunk of each choice, before its tokens: the role (OpenAI's and vLLM's)."""
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def _chat_logprobs(tokens: TokenText, ids: list[int], values: list, tops: list, start: int = 0) -> dict:
    """OpenAI's chat logprobs object: {"content": [each token's text (decoded alone), log-probability, bytes and
    most likely alternatives (a list: ids that decode alike each keep their own)]}. (`start`: the legacy shape's.)"""
    def entry(token_id: int, value: float) -> dict:
        return {"token": tokens.decode([token_id]), "logprob": json_logprob(value), "bytes": tokens.bytes(token_id)}

    return {"content": [{**entry(token_id, value), "top_logprobs": [entry(t, v) for t, v in (top or {}).items()]}
                        for token_id, value, top in zip(ids, values, tops)]}


@dataclass(frozen=True)
class Shape:
    """How an endpoint writes what the shared machinery (`_generate`) produces: the one thing /v1/completions and
    /v1/chat/completions do not share. The callables take (index, text, finish_reason, logprobs), and logprobs
    (TokenText, ids, log-probabilities, alternatives, the first token's text offset)."""

    object: str  # a whole answer's "object"
    chunk_object: str  # a streamed chunk's
    id_prefix: str
    choice: Callable[..., dict]  # a whole answer's choice
    delta: Callable[..., dict]  # a streamed chunk's choice
    logprobs: Callable[..., dict]
    opening: Callable[[int], dict] | None = None  # each choice's first chunk, before its tokens


COMPLETION = Shape("text_completion", "text_completion", "cmpl-", _choice, _choice,
                   lambda tokens, *rest: _logprobs(tokens.decode, *rest))
CHAT = Shape("chat.completion", "chat.completion.chunk", "chatcmpl-", _chat_choice, _chat_delta, _chat_logprobs,
             _chat_opening)


def _byte_level_alphabet() -> dict[str, int]:
    """The character GPT-2's byte-level BPE writes for each byte (its bytes_to_unicode), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{chr(byte): byte for byte in printable}, **{chr(256 + i): byte for i, byte in enumerate(others)}}


BYTE_OF_CHAR = _byte_level_alphabet()


class TokenText:
    """A token's text, decoded alone, and its bytes (chat logprobs' `bytes`): a byte-level BPE token's own, so that
    the pieces of a multi-byte character (each decoded alone as U+FFFD) add up to it, as OpenAI's do; else (added and
    special tokens, other tokenizers) its text's UTF-8."""

    def __init__(self, tokenizer):
        from tokenizers import decoders

        self.decode, self._id_to_token = tokenizer.decode, tokenizer.id_to_token
        self._byte_level = isinstance(getattr(tokenizer, "decoder", None), decoders.ByteLevel)
        self._added = set(tokenizer.get_added_tokens_decoder()) if self._byte_level else set()  # written as is

    def bytes(self, token_id: int) -> list[int]:
        piece = self._id_to_token(token_id) if self._byte_level and token_id not in self._added else None
        if piece is not None and all(char in BYTE_OF_CHAR for char in piece):
            return [BYTE_OF_CHAR[char] for char in piece]
        return list(self.decode([token_id]).encode())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
