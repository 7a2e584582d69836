"""Prompt lookup: draft the tokens that followed the last time the current suffix occurred.

The pure core of the prompt-lookup drafter (Saxena 2023; llama.cpp's lookup decoding):
an incremental n-gram index over the token history (prompt + everything generated).

Rule, kept simple on purpose:
- the longest n-gram size that matches wins;
- among occurrences of that n-gram, the most recent one that ends before the suffix wins;
- the draft is what followed it, up to ``max_tokens`` and up to the end of the history.
  The continuation may run into the suffix itself, which is how repetition loops are
  predicted: in ``a b c a b c`` the suffix ``a b c`` last occurred at the start, followed
  by ``a b c``.

Default n-gram sizes are 5, 4, 3, 2. Up to 5 tokens of context tell apart the repeated
identifiers and boilerplate that make lookup pay on code and edits; a single token
(n = 1) matches almost everywhere in prose and mostly drafts noise, and on a CPU every
rejected draft token still costs part of a target step (DESIGN.md §5).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..config import SamplingConfig
from ..tokens import common_prefix
from . import Draft

DEFAULT_NGRAM_SIZES = (5, 4, 3, 2)


class NgramIndex:
    """Most recent earlier occurrence of each n-gram in a growing token history.

    Invariant: for every size n, ``self._last[n]`` maps each n-gram
    ``history[end - n:end]`` with ``n <= end <= len(history) - 1`` to its largest such
    ``end``. The n-gram ending at the very end of the history (the current suffix) is
    left out until a token follows it, so a lookup of the suffix never finds itself.
    """

    def __init__(self, ngram_sizes: Sequence[int] = DEFAULT_NGRAM_SIZES) -> None:
        if not ngram_sizes or not all(isinstance(n, int) and n >= 1 for n in ngram_sizes):
            raise ValueError(f"ngram_sizes must be non-empty positive integers, got {ngram_sizes!r}")
        self.ngram_sizes: tuple[int, ...] = tuple(sorted(set(ngram_sizes), reverse=True))
        self._history: list[int] = []
        self._last: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.ngram_sizes}

    def __len__(self) -> int:
        return len(self._history)

    @property
    def history(self) -> tuple[int, ...]:
        """A copy of the token history (O(length): use ``len()`` for the length)."""
        return tuple(self._history)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens; index only the n-grams that now have a follower."""
        start = len(self._history)
        self._history.extend(map(int, tokens))
        self._index(start)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens; rebuild the index (O(length))."""
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length!r}")
        if length >= len(self._history):
            return
        kept = self._history[:length]
        self._history = []
        self._last = {n: {} for n in self.ngram_sizes}
        self.extend(kept)

    def sync(self, tokens: Sequence[int]) -> None:
        """Make the history equal ``tokens``, keeping the longest common prefix indexed."""
        n = common_prefix(self._history, tokens)
        self.truncate(n)
        self.extend(tokens[n:])

    def propose(self, max_tokens: int) -> list[int]:
        """Tokens that followed the most recent earlier occurrence of the longest matching suffix.

        Returns at most ``max_tokens`` tokens, ``[]`` when no n-gram size matches.
        """
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens!r}")
        h = self._history
        for n in self.ngram_sizes:
            if len(h) <= n:
                continue
            end = self._last[n].get(tuple(h[-n:]))
            if end is not None:
                # end < len(h): the continuation is non-empty before the max_tokens cut
                return h[end:end + max_tokens]
        return []

    def _index(self, start: int) -> None:
        """Index the n-grams ending at ``start .. len(history) - 1`` (end exclusive)."""
        h = self._history
        for n, last in self._last.items():
            # ascending ends: a later occurrence overwrites an earlier one
            for end in range(max(n, start), len(h)):
                last[tuple(h[end - n:end])] = end


class LookupDrafter:
    """Prompt lookup: drafts by copying what followed the last occurrence of the current
    suffix in the prompt and output. It has no draft distribution, so the target verifies
    its drafts by sample-and-match (exact), or greedy prefix matching at temperature 0."""

    name = "lookup"

    def __init__(self, ngram_sizes: Sequence[int] = DEFAULT_NGRAM_SIZES) -> None:
        self.index = NgramIndex(ngram_sizes)

    def prepare(self, tokens: Sequence[int]) -> None:
        self.index.sync(tokens)

    def propose(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:
        self.index.sync(tokens)
        return Draft(self.index.propose(budget))

    def accept(self, nodes: Sequence[int], verify_seconds: float) -> None:
        """Nothing to learn: the next propose() syncs to the committed tokens."""
