"""Token ids -> text while generating: incremental detokenization and stop strings.

Byte-level BPE tokens can end in the middle of a UTF-8 character, so text is released only once it
decodes cleanly (no trailing U+FFFD), and text that could still become a stop string is held back, so
a stream never prints part of a stop string that is then cut from the result.
"""
from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decode a growing list of token ids, returning only the newly completed text each time."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # decode from here, so merges with the previous token are seen
        self.read_offset = 0  # text of ids[:read_offset] has been returned

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
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
        self.text = ""
        self.released = 0  # characters of self.text already handed to the stream

    def add(self, delta: str) -> tuple[str, bool]:
        """Append new text; return (text safe to release now, whether a stop string was found).
        On a match the text is cut before the stop string."""
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
        for size in range(min(len(self.text), self.longest - 1), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return size
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        out, self.released = self.text[self.released:upto], upto
        return out
