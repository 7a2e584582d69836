"""Incremental text: token bytes in, safe text pieces out."""

from __future__ import annotations

import codecs
from typing import Sequence


def utf8(text: str, what: str = "the text") -> bytes:
    """`text` as UTF-8; ValueError naming `what` when it holds bytes that were not UTF-8
    (Python keeps those of command-line arguments and stdin as lone surrogates)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = text[e.start]
        byte = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"character {char!r}"
        raise ValueError(f"{what} is not UTF-8 text: {byte} at character {e.start}; "
                         "convert it to UTF-8 (e.g. iconv -t utf-8)") from None


class TextStream:
    """Turns the bytes of committed tokens into text pieces.

    Never emits half of a multi-byte UTF-8 character, holds back any tail that could be
    the start of a stop string, and ends (without emitting it) at the first stop string,
    also when it spans several tokens.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, tokens: Sequence[bytes]) -> tuple[str, int]:
        """Add the bytes of committed tokens, one item per token; return the text that is
        now safe to show and how many of the tokens the text keeps: all of them, unless a
        stop string ends among them (then those up to the one that completes it)."""
        if self.stopped:
            return "", 0
        if not self._stops:  # nothing to hold back: the tokens' bytes at once
            return self._decoder.decode(b"".join(tokens)), len(tokens)
        out = ""
        for i, data in enumerate(tokens):  # token by token, to know which one ends the text
            self._held += self._decoder.decode(data)
            out += self._release()
            if self.stopped:
                return out, i + 1
        return out, len(tokens)

    def flush(self) -> str:
        """End of generation: return everything still held back."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        out = self._release()
        out, self._held = out + self._held, ""
        return out

    def _release(self) -> str:
        if not self._stops:
            out, self._held = self._held, ""
            return out
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if hits:
            # a stop string is complete: emit what precedes it and end
            out, self._held, self.stopped = self._held[:min(hits)], "", True
            return out
        keep = max((_overlap(self._held, s) for s in self._stops), default=0)
        out, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
