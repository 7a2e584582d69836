"""Prompt lookup: copy what followed the longest earlier match of the text just written.

The history (prompt, then output) is a list of token ids, with where each token and each
pair of adjacent tokens occurs (kept as it grows or is cut back). A *match* is the
longest suffix h[n-L:n] that also ends at an earlier position e < n, and the draft is what
followed it there, h[e:e+k]. The continuation may run into the suffix itself, which is how
repetition loops are predicted: in ``a b c a b c`` the suffix ``a b c`` last occurred at
the start, followed by ``a b c``.

Which earlier occurrence is the *source*: an answer that works through its input (an
edit, a conversion, a summary that quotes) copies it in order, so where the prompt holds
one at or after the point the last right copy from it stopped (the *cursor*), the first
such one (AHEAD); else the most recent (in the output, OUTPUT, or the prompt, PROMPT).
Over the recorded answers of tools/replay_auto.py this raised `auto`'s geometric mean by
0.7-2.1% over the most recent occurrence always (docs/speed-notes.md).

Search: the earlier occurrences of the last pair of tokens (of the last token when the
pair never occurred), then, one token further back at a time, those that still agree
with the suffix, up to SEARCH_MAX tokens: no pass over the whole history, and work in
proportion to the candidates and how far they agree. Past MANY candidates (a frequent
pair, a line repeated many times) they are compared all at once as arrays instead, as
are more than MANY sources being followed: list operations cost little per call but
per element, array operations the reverse.

Following: once a source is found it is followed forward. When the tokens committed
since are exactly what the source continued with, the source advances with them and the
match grows by as many tokens: no search. Only a deviation searches again. The match
length is the drafter's confidence: the controller estimates acceptance by it
(ggspec.controller.MatchAcceptance), so a long, reliable copy gets a long draft.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..config import SamplingConfig
from ..tokens import common_prefix
from . import Draft

SEARCH_MAX = 32  # longest match a search measures; following lets a match grow beyond it
MAX_ALTERNATIVES = 64  # other sources read for candidate continuations, most recent first
MANY = 32  # more candidates (sources) than this are compared as arrays, fewer as lists
# where a copy source lies (Match.where): the answer's own text, the prompt before the
# cursor, the prompt at or after it
OUTPUT, PROMPT, AHEAD = 0, 1, 2


def as_ends(ends: list[int] | np.ndarray) -> list[int] | np.ndarray:
    """Positions as searches and sources keep them: a list of MANY or fewer, else an array."""
    if len(ends) > MANY:
        return ends if isinstance(ends, np.ndarray) else np.fromiter(ends, np.int64, len(ends))
    return ends if isinstance(ends, list) else ends.tolist()


class History:
    """A token history and where each token and each pair of adjacent tokens occurs: for
    a token x, the ascending ends e with h[e - 1] == x; for a pair (x, y), those with
    h[e - 2:e] == [x, y]. Kept as the history grows and is cut back."""

    def __init__(self, tokens: Sequence[int] = ()) -> None:
        self.tokens: list[int] = []
        self._one: defaultdict[int, list[int]] = defaultdict(list)
        self._two: defaultdict[tuple[int, int], list[int]] = defaultdict(list)
        self._array = np.zeros(1024, dtype=np.int32)
        self._arrayed = 0  # how many of the tokens _array holds
        self.extend(tokens)

    def extend(self, new: Sequence[int]) -> None:
        """Append `new` to the tokens."""
        h, one, two = self.tokens, self._one, self._two
        e = len(h)
        prev = h[-1] if h else None
        for x in new:
            e += 1
            one[x].append(e)
            if e > 1:
                two[prev, x].append(e)
            prev = x
        h.extend(new)

    def cut(self, n: int) -> None:
        """Keep the first n tokens."""
        h, one, two = self.tokens, self._one, self._two
        for e in range(len(h), n, -1):  # each end is the last of its lists
            x = h[e - 1]
            one[x].pop()
            if not one[x]:
                del one[x]
            if e > 1:
                pair = h[e - 2], x
                two[pair].pop()
                if not two[pair]:
                    del two[pair]
        del h[n:]
        self._arrayed = min(self._arrayed, n)

    def array(self) -> np.ndarray:
        """The tokens as an array (n,), copied over as far as they were not yet."""
        n = len(self.tokens)
        if len(self._array) < n:
            self._array = np.concatenate([self._array[:self._arrayed], np.zeros(2 * n, dtype=np.int32)])
        self._array[self._arrayed:n] = self.tokens[self._arrayed:n]
        self._arrayed = n
        return self._array[:n]

    def longest_match(self, max_len: int = SEARCH_MAX) -> tuple[int, list[int] | np.ndarray]:
        """(L, ends): the longest L <= max_len such that h[-L:] == h[e-L:e] for some e <
        len(h), and every such e in ascending order (as_ends); (0, []) when the last token
        never occurred before."""
        h = self.tokens
        n = len(h)
        if n < 2:
            return 0, []
        ends = self._two.get((h[-2], h[-1]), []) if max_len > 1 else []
        if len(ends) < 2:  # the last pair never occurred before: a match of one token, or none
            ends = self._one[h[-1]]
            return (1, as_ends(ends[:-1])) if len(ends) > 1 else (0, [])
        ends, length = ends[:-1], 2  # (the last is the suffix itself)
        if len(ends) > MANY:  # how much further back each agrees, at once
            a, e = self.array(), as_ends(ends)
            back = np.arange(length, min(max_len, n - 1))
            at = e[:, None] - 1 - back                           # (c, w) positions compared
            same = (a[np.maximum(at, 0)] == a[n - 1 - back]) & (at >= 0)
            further = np.cumprod(same, axis=1).sum(axis=1)      # (c,) agreeing tokens beyond the pair
            best = further.max()
            return length + int(best), as_ends(e[further == best])
        while length < max_len:  # keep the ends that agree with the suffix one token further back
            x = h[n - 1 - length]
            longer = [e for e in ends if e > length and h[e - 1 - length] == x]
            if not longer:
                break
            ends, length = longer, length + 1
        return length, ends


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
    where: int  # OUTPUT, PROMPT or AHEAD
    # at the wrong token: None when every other source agreed with the followed one, else
    # whether one of the others continued with the token the text has
    alternative: bool | None = None
    agreement: tuple[int, ...] = ()  # of each proposed token, as Match.agreement


@dataclass(frozen=True)
class Match:
    """What lookup can copy now: `tokens` followed an earlier occurrence of the last
    `length` tokens of the history. `followed`: how the previous source fared."""

    tokens: list[int]
    length: int = 0
    followed: Followed | None = None
    where: int = OUTPUT  # OUTPUT, PROMPT (the user's text) or AHEAD (the user's text, in order)
    # of each token, what the match's other sources say there (ALONE, AGREE or DIFFER,
    # below): a copy rarely holds where earlier occurrences of the same text went on differently
    agreement: list[int] = field(default_factory=list)


# Match.agreement of a copied token, from the other sources that continued as the followed
# one up to it: none did (ALONE), all of them continue with it (AGREE), or one continues
# with another token (DIFFER).
ALONE, AGREE, DIFFER = 0, 1, 2


class CopySource:
    """The token history and the copy source being followed."""

    def __init__(self) -> None:
        self._history = History()
        # sources: every e with h[e - length:e] == h[n - length:n], e < n, ascending but
        # for the last, the one followed (_choose)
        self._ends: list[int] | np.ndarray = []
        self._length = 0  # 0: no source
        self._at = 0      # the history length the source was valid for
        self._agreement: list[int] = []  # of the tokens the last match offered
        self.prompt_len = 0  # history before this is the prompt
        self._cursor = 0  # the prompt position after the last token copied rightly from it
        # the match was found where the prompt goes on after the cursor. A source that takes
        # over when the followed one goes wrong (it agreed with the text all along) inherits
        # the label: labelling it by its own place instead replayed 0.1-0.3% lower
        # (docs/speed-notes.md, "The AHEAD label of a source that takes over")
        self._ahead = False

    def __len__(self) -> int:
        return len(self._history.tokens)

    @property
    def history(self) -> list[int]:
        return self._history.tokens

    def sync(self, tokens: Sequence[int]) -> None:
        """Make the history equal `tokens`, keeping the common prefix."""
        h = self._history
        n = common_prefix(h.tokens, tokens)
        if n < len(h.tokens):
            h.cut(n)
            if n < self._at:  # the text the source matched changed
                self._length = 0
        h.extend(tokens[n:])

    def forget(self) -> None:
        """Drop the source (a new prompt: its tokens are not the target's to predict)."""
        self._length = 0
        self._at = self.prompt_len = len(self._history.tokens)
        self._cursor = 0

    def match(self, max_tokens: int, estimates: bool = True) -> Match:
        """Follow the source over the tokens added since the last call, or search anew.
        estimates: fill in what auto's estimates read, Match.agreement and Match.followed
        (else left empty and None)."""
        h = self._history.tokens
        n = len(h)
        m = n - self._at
        followed = None
        if self._length and m > 0:
            end = int(self._ends[-1])
            new = h[self._at:n]
            hits = common_prefix(h[end:end + m], new)
            where = self._where(end)
            if hits and where != OUTPUT:
                self._cursor = end + hits
            # the other sources that continued as the text did stay sources, of a longer match;
            # after: the tokens after those that agreed up to the wrong token
            if isinstance(self._ends, np.ndarray):  # many: compared all at once
                a, o = self._history.array(), self._ends[:-1]
                same = a[o[:, None] + np.arange(m)] == a[self._at:n]  # (sources, m)
                stay = o[same.all(axis=1)] + m
                after = a[o[same[:, :hits].all(axis=1)] + hits].tolist() if hits < m and estimates else []
                if hits == m:
                    stay = np.append(stay, end + m)
            else:
                others = self._ends[:-1]
                stay = [e + m for e in others if h[e:e + m] == new]
                after = [h[e + hits] for e in others if h[e:e + hits] == new[:hits]] if hits < m and estimates else []
                if hits == m:
                    stay.append(end + m)
            if estimates:
                # did another source differ from the followed one at the wrong token, and rightly?
                alternative = new[hits] in after if any(y != h[end + hits] for y in after) else None
                proposed = tuple(h[end:end + min(hits + 1, m)])
                agreement = self._agreement  # (as the last match offered them, when it did so far)
                if len(agreement) < len(proposed):
                    agreement = self.agreement(len(proposed))
                followed = Followed(self._length, proposed, hits, where, alternative,
                                    tuple(agreement[:len(proposed)]))
            self._ends = as_ends(stay)
            self._length = self._length + m if len(stay) else 0
        if not self._length:
            self._length, ends = self._history.longest_match()
            self._ends = self._choose(ends) if self._length else ends
        self._at = n
        if not self._length:
            self._agreement = []
            return Match([], followed=followed)
        end = int(self._ends[-1])
        tokens = h[end:min(end + max_tokens, n)]
        self._agreement = self.agreement(len(tokens)) if estimates else []
        return Match(tokens, self._length, followed, self._where(end), self._agreement)

    def _choose(self, ends: list[int] | np.ndarray) -> list[int] | np.ndarray:
        """The sources of a match (ascending), the one to follow moved last: the first in
        the prompt at or after the cursor, else the most recent."""
        cursor = self._cursor
        i = int(np.searchsorted(ends, cursor)) if isinstance(ends, np.ndarray) else bisect.bisect_left(ends, cursor)
        self._ahead = i < len(ends) and ends[i] < self.prompt_len
        if not self._ahead or i == len(ends) - 1:
            return ends
        if isinstance(ends, np.ndarray):
            return np.append(np.delete(ends, i), ends[i])
        return [*ends[:i], *ends[i + 1:], ends[i]]

    def _where(self, end: int) -> int:
        """Where the source followed, now at `end`, lies (OUTPUT, PROMPT or AHEAD)."""
        return OUTPUT if end >= self.prompt_len else AHEAD if self._ahead else PROMPT

    def agreement(self, k: int) -> list[int]:
        """Match.agreement of the followed source's next k tokens (ALONE, AGREE or DIFFER
        each), from how far each other source continues as the followed one does."""
        h = self._history.tokens
        n = len(h)
        end = int(self._ends[-1])
        first = h[end:end + k]
        k = len(first)
        if isinstance(self._ends, np.ndarray):  # many: all at once
            a, o = self._history.array(), self._ends[:-1]
            at = o[:, None] + np.arange(k)  # (sources, k)
            same = (a[np.minimum(at, n - 1)] == a[end:end + k]) & (at < n)
            agreed = np.cumprod(same, axis=1).sum(axis=1)  # (sources,) tokens each agrees on
            longest = int(agreed.max(initial=0))
            differ = set(agreed[(agreed < k) & (o + agreed < n)].tolist())
            return [DIFFER if i in differ else AGREE if i < longest else ALONE for i in range(k)]
        agreement, alive = [], self._ends[:-1]  # position by position, over the sources still agreeing
        for i, x in enumerate(first):
            if not alive:
                break
            going = [e for e in alive if e + i < n]  # (not yet run into the end of the text)
            alive = [e for e in going if h[e + i] == x]
            agreement.append(DIFFER if len(alive) < len(going) else AGREE if alive else ALONE)
        return agreement + [ALONE] * (k - len(agreement))

    def alternatives(self, max_tokens: int, max_count: int) -> list[tuple[list[int], int]]:
        """Up to max_count continuations of the other sources of the current match that
        differ from the followed one's, most recent first, each with how many sources
        continue so (after match())."""
        if not self._length:
            return []
        h = self._history.tokens
        n = len(h)
        ends = self._ends
        end = int(ends[-1])
        first = h[end:min(end + max_tokens, n)]
        seen: dict[tuple[int, ...], int] = {}
        for e in reversed(ends[max(len(ends) - 1 - MAX_ALTERNATIVES, 0):-1]):
            cont = h[e:min(e + max_tokens, n)]
            if cont == first[:len(cont)]:
                continue
            key = tuple(cont)
            if key in seen or len(seen) < max_count:
                seen[key] = seen.get(key, 0) + 1
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

    def match(self, tokens: Sequence[int], budget: int, estimates: bool = True) -> Match:
        self.source.sync(tokens)
        return self.source.match(budget, estimates)

    def propose(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:
        found = self.match(tokens, budget, estimates=False)  # (only auto reads them)
        return Draft(found.tokens if found.length >= self.min_match else [])

    def accept(self, draft: Draft, nodes: Sequence[int]) -> None:
        """Nothing to learn: the next propose() follows or searches from the committed tokens."""
