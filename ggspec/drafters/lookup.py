"""Prompt lookup: copy what followed the longest earlier match of the text just written.

The history (prompt, then output) lives in a growing int32 array. A *match* is the
longest suffix h[n-L:n] that also ends at an earlier position e < n; its *source* is the
most recent such e, and the draft is what followed it there, h[e:e+k]. The continuation
may run into the suffix itself, which is how repetition loops are predicted: in
``a b c a b c`` the suffix ``a b c`` last occurred at the start, followed by ``a b c``.

Search: the earlier positions whose token equals the last one, then, for all of them at
once, how many tokens before agree with the suffix (one vectorised comparison of windows
of up to SEARCH_MAX tokens): O(n) for the first step, then O(candidates x SEARCH_MAX).

Following: once a source is found it is followed forward. When the tokens committed
since are exactly what the source continued with, the source advances with them and the
match grows by as many tokens: no search. Only a deviation searches again. The match
length is the drafter's confidence: the controller estimates acceptance by it
(ggspec.controller.MatchAcceptance), so a long, reliable copy gets a long draft.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import SamplingConfig
from ..tokens import common_prefix
from . import Draft

SEARCH_MAX = 32  # longest match a search measures; following lets a match grow beyond it
MAX_ALTERNATIVES = 64  # other sources read for candidate continuations, most recent first
_EMPTY = np.zeros(0, dtype=np.int64)


def longest_match(h: np.ndarray, max_len: int = SEARCH_MAX) -> tuple[int, np.ndarray]:
    """(L, ends): the longest L <= max_len such that h[-L:] == h[e-L:e] for some e <
    len(h), and every such e in ascending order; (0, empty) when the last token never
    occurred before."""
    n = len(h)
    if n < 2:
        return 0, _EMPTY
    ends = np.flatnonzero(h[:n - 1] == h[n - 1]) + 1  # h[e - 1] == h[n - 1], e <= n - 1
    if ends.size == 0:
        return 0, _EMPTY
    back = np.arange(min(max_len, n - 1))
    at = ends[:, None] - 1 - back                           # (c, w) positions compared
    same = (h[np.maximum(at, 0)] == h[n - 1 - back]) & (at >= 0)
    lengths = np.cumprod(same, axis=1).sum(axis=1)         # (c,) agreeing tokens from the end
    best = int(lengths.max())
    return best, ends[lengths == best]


def copyable(context: Sequence[int], output: Sequence[int]) -> np.ndarray:
    """For each output position i, the most tokens output[i:] starts with that occur
    together in context + output[:i]: what a copying drafter with perfect foresight could
    draft before token i. (n_output,)"""
    h = np.asarray([*context, *output], dtype=np.int64)
    start = len(context)
    out = np.zeros(len(output), dtype=np.int64)
    for i in range(len(output)):
        end = start + i                                      # h[:end] is the text so far
        at = np.flatnonzero(h[:end] == h[end])               # copies of output[i] start there
        k = 0
        while at.size:
            k += 1                                           # h[j:j + k] == h[end:end + k] for j in at
            if end + k == len(h):
                break
            at = at[at + k < end]                            # a copy lies in the text so far
            at = at[h[at + k] == h[end + k]]
        out[i] = k
    return out


@dataclass(frozen=True)
class Followed:
    """How the source being followed predicted the tokens committed since the last
    match: of the tokens it continued with (`proposed`), the first `hits` were right,
    from a match of `length` tokens (so the i-th of them after a match of length + i);
    when `proposed` is longer, the token after those was wrong. A lookup draft is verified
    by matching tokens, so these are exactly the outcomes its drafts had (or would have
    had, in rounds that drafted less)."""

    length: int
    proposed: tuple[int, ...]
    hits: int
    in_prompt: bool  # the source lies in the prompt (else in the output)
    # at the wrong token: None when every other source agreed with the followed one, else
    # whether one of the others continued with the token the text has
    alternative: bool | None = None


@dataclass(frozen=True)
class Match:
    """What lookup can copy now: `tokens` followed an earlier occurrence of the last
    `length` tokens of the history. `followed`: how the previous source fared."""

    tokens: list[int]
    length: int = 0
    followed: Followed | None = None
    in_prompt: bool = False  # the source lies in the prompt (the user's text), not the output


class CopySource:
    """The token history and the copy source being followed."""

    def __init__(self) -> None:
        self._h = np.zeros(1024, dtype=np.int32)
        self._tokens: list[int] = []  # the same history as a list, to compare with callers'
        # sources: every e with h[e - length:e] == h[n - length:n], e < n, ascending; the
        # last (most recent) is the one followed
        self._ends = _EMPTY
        self._length = 0  # 0: no source
        self._at = 0      # the history length the source was valid for
        self.prompt_len = 0  # history before this is the prompt

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def history(self) -> np.ndarray:
        return self._h[:len(self._tokens)]

    def sync(self, tokens: Sequence[int]) -> None:
        """Make the history equal `tokens`, keeping the common prefix."""
        h = self._tokens
        n = common_prefix(h, tokens)
        if n < len(h):
            del h[n:]
            if n < self._at:  # the text the source matched changed
                self._length = 0
        new = tokens[n:]
        if new:
            end = len(h) + len(new)
            if end > len(self._h):
                self._h = np.concatenate([self._h, np.zeros(max(end, len(self._h)), dtype=np.int32)])
            self._h[len(h):end] = new
            h.extend(new)

    def forget(self) -> None:
        """Drop the source (a new prompt: its tokens are not the target's to predict)."""
        self._length = 0
        self._at = self.prompt_len = len(self._tokens)

    def match(self, max_tokens: int) -> Match:
        """Follow the source over the tokens added since the last call, or search anew."""
        tokens = self._tokens
        n = len(tokens)
        h = self._h
        m = n - self._at
        followed = None
        if self._length and m > 0:
            end = int(self._ends[-1])
            hits = common_prefix(tokens[end:end + m], tokens[self._at:n])
            proposed = tuple(tokens[end:end + min(hits + 1, m)])
            others = self._ends[:-1]  # the other sources (the followed one is the last)
            alternative, still = None, others
            if others.size:
                same = h[others[:, None] + np.arange(m)] == h[self._at:n]  # (sources, m)
                still = others[same.all(axis=1)]
                if hits < m:  # the sources that agreed up to the wrong token: did another differ, and rightly?
                    up_to = others[same[:, :hits].all(axis=1)]
                    if np.any(h[up_to + hits] != h[end + hits]):
                        alternative = bool(np.any(h[up_to + hits] == h[self._at + hits]))
            followed = Followed(self._length, proposed, hits, end < self.prompt_len, alternative)
            # the sources that continued as the text did stay sources, of a longer match
            if hits == m:
                still = np.append(still, end)
            self._ends = still + m
            self._length = self._length + m if self._ends.size else 0
        if not self._length:
            self._length, self._ends = longest_match(h[:n])
        self._at = n
        if not self._length:
            return Match([], followed=followed)
        end = int(self._ends[-1])
        return Match(tokens[end:min(end + max_tokens, n)], self._length, followed, end < self.prompt_len)


    def alternatives(self, max_tokens: int, max_count: int) -> list[tuple[list[int], int]]:
        """Up to max_count continuations of the other sources of the current match that
        differ from the followed one's, most recent first, each with how many sources
        continue so (after match())."""
        n = len(self._tokens)
        if not self._length:
            return []
        h = self._h
        first = h[self._ends[-1]:min(self._ends[-1] + max_tokens, n)].tolist()
        seen: dict[tuple[int, ...], int] = {}
        for e in self._ends[-2::-1][:MAX_ALTERNATIVES].tolist():
            cont = tuple(h[e:min(e + max_tokens, n)].tolist())
            if list(cont) == first[:len(cont)]:
                continue
            if cont in seen or len(seen) < max_count:
                seen[cont] = seen.get(cont, 0) + 1
        return [(list(c), k) for c, k in seen.items()]


class LookupDrafter:
    """Prompt lookup: drafts by copying what followed the last occurrence of the current
    suffix in the prompt and output. It has no draft distribution, so the target verifies
    its drafts by sample-and-match (exact), or greedy prefix matching at temperature 0.

    As a method of its own it drafts `budget` tokens whenever a match of at least
    `min_match` tokens exists; `auto` takes the match with its length and lets the
    controller choose how much of it to draft."""

    name = "lookup"

    def __init__(self, min_match: int = 2) -> None:
        self.source = CopySource()
        self.min_match = min_match

    def prepare(self, tokens: Sequence[int]) -> None:
        self.source.sync(tokens)
        self.source.forget()

    def match(self, tokens: Sequence[int], budget: int) -> Match:
        self.source.sync(tokens)
        return self.source.match(budget)

    def propose(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:
        found = self.match(tokens, budget)
        return Draft(found.tokens if found.length >= self.min_match else [])

    def accept(self, draft: Draft, nodes: Sequence[int]) -> None:
        """Nothing to learn: the next propose() follows or searches from the committed tokens."""
