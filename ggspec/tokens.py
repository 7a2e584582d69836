"""Small helpers on token sequences."""

from __future__ import annotations

from typing import Sequence


def common_prefix(cached: list[int], tokens: Sequence[int]) -> int:
    """Length of the longest common prefix; fast when `tokens` extends `cached`."""
    n = len(cached)
    if n <= len(tokens) and cached == list(tokens[:n]):
        return n
    # the history changed: find the first difference
    return next((i for i, (a, b) in enumerate(zip(cached, tokens)) if a != b), min(n, len(tokens)))
