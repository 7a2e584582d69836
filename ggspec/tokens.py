"""Small helpers on token sequences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def common_prefix(cached: list[int], tokens: Sequence[int]) -> int:
    """Length of the longest common prefix; fast when `tokens` extends `cached`, and when
    the history changed (a draft model's cache after a rejection), by halving with list
    comparisons, which run in C: a few µs for a thousand tokens against 0.1 ms for a
    Python loop over them."""
    tokens = tokens if isinstance(tokens, list) else list(tokens)
    n = len(cached)
    if n <= len(tokens) and cached == tokens[:n]:
        return n
    n = min(n, len(tokens))
    if cached[:n] == tokens[:n]:
        return n
    lo, hi = 0, n  # the first difference lies in [lo, hi)
    while hi - lo > 16:
        mid = (lo + hi) // 2
        if cached[lo:mid] == tokens[lo:mid]:
            lo = mid
        else:
            hi = mid
    while cached[lo] == tokens[lo]:
        lo += 1
    return lo


@dataclass(frozen=True)
class Marker:
    """A control token as the tokenizer matches it in text: its text, its id, and whether
    it eats the whitespace on its left (lstrip) or right (rstrip)."""

    text: str
    id: int
    lstrip: bool = False
    rstrip: bool = False


C_SPACE = " \t\n\v\f\r"  # C's isspace: what llama.cpp strips


def split_markers(text: str, markers: Sequence[Marker], protected: Sequence[tuple[int, int]]) -> list[str | int]:
    """`text` cut at its control-token markers into text pieces and token ids, as llama.cpp
    partitions text with special-token parsing (markers longest first, each found left to
    right in the remaining text, lstrip / rstrip applied), except that no marker is taken
    where it overlaps a protected [start, end) range: there its characters stay text."""
    frags: list[tuple[int, int] | int] = [(0, len(text))] if text else []
    for m in sorted((m for m in markers if m.text), key=lambda m: -len(m.text)):
        out: list[tuple[int, int] | int] = []
        for frag in frags:
            if isinstance(frag, int):
                out.append(frag)
                continue
            start, end = frag
            pos = start
            while (at := text.find(m.text, pos, end)) >= 0:
                stop = at + len(m.text)
                if any(a < stop and at < b for a, b in protected):
                    pos = at + 1
                    continue
                left = at
                while m.lstrip and left > start and text[left - 1] in C_SPACE:
                    left -= 1
                if left > start:
                    out.append((start, left))
                out.append(m.id)
                while m.rstrip and stop < end and text[stop] in C_SPACE:
                    stop += 1
                start = pos = stop
            if start < end:
                out.append((start, end))
        frags = out
    return [f if isinstance(f, int) else text[f[0]:f[1]] for f in frags]
