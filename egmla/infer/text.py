"""Token ids -> text while generating: incremental detokenization and stop strings.

Byte-level BPE tokens can end in the middle of a UTF-8 character, so text is released only once it
decodes cleanly (no trailing U+FFFD), and text that could still become a stop string is held back, so
a stream never prints part of a stop string that is then cut from the result.

This runs on the host for every row of every decode step of a server, so it is kept cheap: a `tokenizers.Tokenizer`
(what runs save) decodes through the library's own `DecodeStream`, one call per token; other tokenizers (e.g.
transformers' wrappers, whose decode defaults differ) through two decodes per token; and a matcher without stop
strings only appends.
"""
from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


def _decode_stream(tokenizer):
    """tokenizers' DecodeStream for a `tokenizers.Tokenizer` (the same text as its `decode`, special tokens skipped as
    its `decode` does by default), or None where the tokenizer is another kind or the library predates it (< 0.21)."""
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    return DecodeStream(skip_special_tokens=True) if isinstance(tokenizer, Tokenizer) else None


class IncrementalDetokenizer:
    """Decode a growing list of token ids, returning only the newly completed text each time.

    use_stream=False decodes twice per token even where DecodeStream could serve (a benchmark's baseline)."""

    def __init__(self, tokenizer, use_stream: bool = True):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.stream = _decode_stream(tokenizer) if use_stream else None
        self.prefix_offset = 0  # decode from here, so merges with the previous token are seen
        self.read_offset = 0  # text of ids[:read_offset] has been returned

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        if self.stream is not None:
            return self.stream.step(self.tokenizer, token_id) or ""  # None: an incomplete character so far
        prefix = self.tokenizer.decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.token_ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete character (or a special token that decodes to nothing)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full[len(prefix):]

    def text(self) -> str:
        """All of it, decoded in one go (what the result reports)."""
        return self.tokenizer.decode(self.token_ids)


class StopStringMatcher:
    """Accumulates generated text and finds the first stop string in it."""

    def __init__(self, stop_strings: list[str]):
        if any(not s for s in stop_strings):
            raise ValueError("stop_strings: an empty stop string would stop at once; remove it")
        self.stop_strings = list(stop_strings)
        self.longest = max((len(s) for s in self.stop_strings), default=0)
        self.inner_chars = {c for s in self.stop_strings for c in s[:-1]}  # what a held-back tail can end with
        self.text = ""
        self.released = 0  # characters of self.text already handed to the stream

    def add(self, delta: str) -> tuple[str, bool]:
        """Append new text; return (text safe to release now, whether a stop string was found).
        On a match the text is cut before the stop string."""
        if not self.stop_strings:  # nothing to find or hold back
            self.text += delta
            self.released = len(self.text)
            return delta, False
        search_from = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        cut = min((pos for s in self.stop_strings if (pos := self.text.find(s, search_from)) >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._release(len(self.text)), True
        return self._release(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        return self._release(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        if not self.text or self.text[-1] not in self.inner_chars:  # most text: no stop string's prefix ends here
            return 0
        for size in range(min(len(self.text), self.longest - 1), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return size
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        out, self.released = self.text[self.released:upto], upto
        return out
