"""Cost-aware choice of what to draft, from measured costs and acceptance.

Pure numpy: no llama.cpp here. A round that drafts k tokens costs its drafting time plus
one verification of k + 1 rows, t(k + 1), and commits 1 + E[accepted] tokens. With c_i the
chance that draft position i is accepted given positions < i were,
E[accepted | k] = sum_{j=1..k} prod_{i<=j} c_i. Each round the controller takes the plan
with the most expected committed tokens per second; drafting nothing (plain decoding,
1 / t(1)) is always a candidate, so a draft is only taken where the estimates say it pays.
Where the target's memory is a recurrent state that cannot drop rejected tokens, a round
also costs saving that state and, after a rejection, restoring it and replaying the kept
tokens (CostModel.t_rewind).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np

EMA = 0.1           # weight of a new observation, once the prior has been outweighed
EXPLORE_EVERY = 48  # rounds of one kind (plain / drafting) in a row before trying the other
DENSE_ROWS = 33     # a calibration times every size up to here (CPU kernels favour some sizes,
STRIDE = 8          # e.g. multiples of 16), above it every STRIDE-th one,
PASSES = 2          # in this many passes (up, then down): each size's fastest counts


class _Input:
    """An attribute the cost model's table of t(b) is computed from: setting it (tests
    replace them whole) drops the table, computed again when next asked for. (Without a
    __get__, reading it is a plain read of the instance's own attribute: the controller
    reads them many times a round.)"""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __set__(self, model: CostModel, value) -> None:
        model.__dict__[self.name] = value
        model._table = None


def measured_sizes(rows: int) -> list[int]:
    """The verification sizes a calibration of 1..rows rows times; the others are interpolated."""
    return sorted({*range(1, min(rows, DENSE_ROWS) + 1), *range(DENSE_ROWS, rows + 1, STRIDE), rows})


class Survey:
    """One calibration's timings: every size of measured_sizes(rows) PASSES times, each
    size keeping its fastest. Every size is timed alike: a curve whose t(1) were the best
    of more tries than the other points would overstate every other point against it.
    ggspec.calibration.measure takes the timings from decodes of filler tokens while
    nothing else waits, in the order of `next` (up, then down). An engine with no stored
    curve takes them from its own rounds instead, whatever sizes they verify (ggspec.engine),
    and chooses meanwhile by curve(): an answer streams from its first round, and no round
    decodes filler.

    done: the timings taken so far, (rows, seconds) in order (a survey resumed from the
    store replays them)."""

    def __init__(self, rows: int, done: Sequence[tuple[int, float]] = ()):
        self.rows = rows
        self._sizes = measured_sizes(rows)
        self._times: dict[int, list[float]] = {b: [] for b in self._sizes}
        self.done: list[tuple[int, float]] = []
        for b, seconds in done:
            self.observe(b, seconds)

    @property
    def next(self) -> int | None:
        """Rows of the next timing a measurement takes: the sizes timed fewest times, up
        on even passes and down on odd ones (None: all taken)."""
        for n in range(PASSES):
            left = [b for b in self._sizes if len(self._times[b]) == n]
            if left:
                return left[0] if n % 2 == 0 else left[-1]
        return None

    def observe(self, rows: int, seconds: float) -> bool:
        """A decode of `rows` rows took `seconds`: True when it is a timing the survey
        still waits for."""
        times = self._times.get(rows)
        if times is None or len(times) >= PASSES:
            return False
        times.append(seconds)
        self.done.append((rows, seconds))
        return True

    def curve(self) -> np.ndarray | None:
        """t(1..rows) from each timed size's fastest: (rows,) once every size is timed;
        None before t(1). Under way, sizes between timed ones are interpolated, and those
        above the largest timed one, up to twice it, taken to cost as much as it: an
        untimed size never looks dearer than the timed ones around it, so where drafting
        that much might pay, a round tries it, and times it. (Past twice the largest timed
        size the curve ends, and the cost model takes a size to cost in proportion to its
        rows: a draft at most doubles from one untried size to the next, so a first answer
        does not pay for K + 1 rows before a smaller size told what rows cost.)"""
        timed = [b for b in self._sizes if self._times[b]]
        if not timed or timed[0] != 1:
            return None
        return np.interp(np.arange(1, min(self.rows, 2 * timed[-1]) + 1), timed, [min(self._times[b]) for b in timed])


class CostModel:
    """Seconds per target verification of b rows and per draft-model token.

    The shape of the verification curve comes from a calibration (ggspec.calibration);
    it need not grow monotonically (on a CPU, 16 rows can cost less than 15: the matrix
    kernels work in tiles). Its level follows the rounds actually run: each verification
    of b rows moves `scale` toward observed / calibrated, so a measurement at any size
    keeps the whole curve current (the KV cache deepens, the machine warms up); and a
    size's own correction follows, slowly, how its rounds compare with that level, so a
    point the calibration got wrong is corrected where it is used.
    t(b) = scale * curve[b - 1] * correction[b - 1].

    draft_token: seconds the draft model takes per drafted token. draft_row: seconds per
    further row when it first catches up on tokens it has not seen (the tokens committed
    while it did not draft, a copied head it extends): a batch row costs less than a token
    drafted alone, and until measured it is taken to cost as much.

    state_copy: seconds one save or one restore of the target's recurrent state takes (0:
    the target's cache is cut without copies); rollback: how many rejected tokens its
    memory drops without one (llama.cpp's rollback slots).

    survey: the calibration that the rounds are taking (Survey; the engine passes it their
    timings, and has the model follow its curve meanwhile), if one is under way.
    """

    SHAPE_EMA = 0.05

    curve = _Input()       # (b_max,): curve[b - 1] = t(b) when calibrated, else None
    correction = _Input()  # (b_max,)
    scale = _Input()

    def __init__(self, curve: np.ndarray | None = None, draft_token: float = 0.0):
        self.reset()
        self.draft_token = self.draft_row = draft_token
        self.state_copy = 0.0
        self.rollback = 0
        if curve is not None:
            self.calibrate(curve, draft_token)

    def reset(self) -> None:
        """Forget every measurement (the machine changed: threads, offloading)."""
        self.curve = self.correction = None
        self.scale = 1.0
        self._table: np.ndarray | None = None  # t(1..b_max), made when first asked for
        self.draft_token = self.draft_row = 0.0
        self.overlap = Overlap()
        self.survey: Survey | None = None

    @property
    def calibrated(self) -> bool:
        return self.curve is not None

    def calibrate(self, curve: np.ndarray, draft_token: float = 0.0) -> None:
        self.follow(curve)
        if self.survey is not None and self.survey.rows <= len(self.curve):
            self.survey = None  # (a curve measured or stored meanwhile covers its sizes)
        self.draft_token = self.draft_row = draft_token

    def follow(self, curve: np.ndarray | None) -> None:
        """Choose by this curve (None: draft nothing), its corrections started afresh: a
        calibration's, or a survey's while it is under way."""
        self.curve = None if curve is None else np.array(curve, dtype=np.float64)
        self.correction = None if curve is None else np.ones_like(self.curve)
        self.scale = 1.0

    @property
    def max_rows(self) -> int:
        return len(self.curve)

    def t_verify(self, rows: int | np.ndarray) -> np.ndarray | float:
        """Seconds to verify `rows` rows (an int or an array of them); beyond the
        calibrated range the cost grows linearly from the last point."""
        b = np.minimum(rows, len(self.curve))
        return self.table[b - 1] * rows / b

    def t_verify_upto(self, rows: int) -> np.ndarray:
        """t_verify(1), ..., t_verify(rows): (rows,)."""
        return self.table[:rows] if rows <= len(self.curve) else self.t_verify(np.arange(1, rows + 1))

    @property
    def table(self) -> np.ndarray:
        """t(b) for every calibrated b: (b_max,)."""
        if self._table is None:
            self._table = self.scale * self.curve * self.correction
        return self._table

    def t_rewind(self, chances: np.ndarray) -> np.ndarray:
        """Expected seconds spent undoing rejections for chains of 0..k tokens with these
        conditional acceptance chances (k,): (k + 1,). A chain of more than `rollback`
        tokens saves the state before its verification; when a token is rejected after
        the first a were accepted, the state is restored and the a + 1 kept tokens (the
        pending one and the accepted) replayed, a decode of a + 1 rows."""
        k = len(chances)
        if self.state_copy == 0.0:
            return np.zeros(k + 1)
        reach = np.concatenate([[1.0], np.cumprod(chances)])  # (k + 1,): P(first a accepted)
        stop = reach[:-1] - reach[1:]  # (k,): P(exactly a accepted), a < k
        undo = stop * (self.state_copy + self.t_verify(np.arange(1, k + 1)))
        cost = np.concatenate([[0.0], self.state_copy + np.cumsum(undo)])
        cost[:self.rollback + 1] = 0.0
        return cost

    def observe_verify(self, rows: int, seconds: float) -> None:
        if self.curve is not None and rows <= len(self.curve):
            ratio = seconds / self.curve[rows - 1]
            self.scale += EMA * (ratio - self.scale)  # (which also drops the table)
            self.correction[rows - 1] += self.SHAPE_EMA * (ratio / self.scale - self.correction[rows - 1])

    def t_draft(self, tokens: int, behind: int) -> float:
        """Seconds for the draft model to draft `tokens` tokens when it first decodes
        `behind` tokens it has not seen (>= 1: the last committed one)."""
        return tokens * self.draft_token + (behind - 1) * self.draft_row if tokens > 0 else 0.0

    def observe_draft(self, tokens: int, seconds: float, behind: int = 1, catch_up: float = 0.0) -> None:
        """A draft of `tokens` tokens took `seconds`, of which `catch_up` went to its first
        decode, of `behind` rows (the first token's and the unseen tokens')."""
        if tokens <= 0:
            return
        if behind > 1:
            extra = max(catch_up - self.draft_token, 0.0) / (behind - 1)
            self.draft_row += EMA * (extra - self.draft_row)
            seconds -= (behind - 1) * self.draft_row
        self.draft_token += EMA * (max(seconds, 0.0) / tokens - self.draft_token)

    def state(self) -> dict:
        """The estimates as plain data, to save (ggspec.session)."""
        return {"curve": None if self.curve is None else self.curve.tolist(),
                "correction": None if self.correction is None else self.correction.tolist(),
                "scale": self.scale, "draft_token": self.draft_token, "draft_row": self.draft_row, "state_copy": self.state_copy,
                "rollback": self.rollback, "overlap": self.overlap.state()}

    def set_state(self, state: dict) -> None:
        """Take the estimates of state(); ValueError when they do not fit."""
        curve = None if state["curve"] is None else estimates(state["curve"])
        self.correction = None if curve is None else estimates(state["correction"], curve.shape)
        self.curve = curve
        self.scale, self.draft_token = float(state["scale"]), float(state["draft_token"])
        self.draft_row = float(state.get("draft_row", self.draft_token))
        self.state_copy, self.rollback = float(state["state_copy"]), int(state["rollback"])
        self.overlap.set_state(state["overlap"])


def estimates(values, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Saved estimates as a float64 array of `shape` (any 1-d length when None); ValueError
    when they have another shape or are not finite."""
    a = np.array(values, dtype=np.float64)
    fits = a.shape == shape if shape is not None else a.ndim == 1 and a.size > 0
    if not fits or not np.isfinite(a).all():
        raise ValueError(f"saved estimates of shape {a.shape} where {shape or '(n,)'} was expected")
    return a


class Overlap:
    """Whether the draft model drafts the next round while the target verifies this one
    (asynchronous drafting), from the measured wall time per committed token of rounds
    run each way. It pays where the two decodes overlap (a GPU target and a CPU draft,
    CPU threads split between them) and the draft's guesses usually hold; it costs where
    they compete for the same cores. Each way is tried for TRIAL rounds, then the faster
    is taken, and the other is tried again for TRIAL rounds after every EXPLORE_EVERY.
    The first round after a switch is not counted: it carries the other way's draft."""

    TRIAL = 8

    def __init__(self) -> None:
        # plain floats: each round updates them, and numpy's scalars cost more than the
        # round's other bookkeeping right after a decode
        self.seconds = [0.0, 0.0]  # [sync, async]: mean wall seconds of a round
        self.tokens = [0.0, 0.0]   # [sync, async]: mean tokens committed by a round
        self.rounds = [0, 0]       # [sync, async]: rounds counted
        self._last = False  # the way of the latest round
        self._streak = 0    # rounds in a row of the faster way
        self._trial = 0     # rounds of the slower way still to run

    def start(self) -> None:
        """A generation starts: no worker has drafted its first round."""
        self._last = False

    @property
    def faster(self) -> bool:
        """True when asynchronous rounds commit more tokens per second."""
        rate = self._rates()
        return rate[1] > rate[0]

    def _rates(self) -> list[float]:
        """[sync, async]: committed tokens per second."""
        return [t / max(s, 1e-12) for t, s in zip(self.tokens, self.seconds)]

    def choose(self) -> bool:
        """Draft the next round during this round's verification?"""
        for way in (False, True):
            if self.rounds[int(way)] < self.TRIAL:
                return way
        if self._trial == 0 and self._streak >= EXPLORE_EVERY:
            self._trial, self._streak = self.TRIAL + 1, 0  # + 1: the switch round is not counted
        if self._trial:
            self._trial -= 1
            return not self.faster
        self._streak += 1
        return self.faster

    def observe(self, ahead: bool, seconds: float, tokens: int) -> None:
        """A round (propose and verify) that ran `ahead` or not took `seconds` wall time
        and committed `tokens`."""
        if ahead == self._last:
            i = int(ahead)
            self.rounds[i] += 1
            w = max(1.0 / self.rounds[i], EMA)
            self.seconds[i] += w * (seconds - self.seconds[i])
            self.tokens[i] += w * (tokens - self.tokens[i])
        self._last = ahead

    def state(self) -> dict:
        """The estimates as plain data, to save (ggspec.session)."""
        return {"seconds": self.seconds[:], "tokens": self.tokens[:], "rounds": self.rounds[:],
                "last": self._last, "streak": self._streak, "trial": self._trial}

    def set_state(self, state: dict) -> None:
        """Take the estimates of state(); ValueError when they do not fit."""
        self.seconds, self.tokens = (estimates(state[k], (2,)).tolist() for k in ("seconds", "tokens"))
        self.rounds = [int(n) for n in estimates(state["rounds"], (2,))]
        self._last, self._streak, self._trial = bool(state["last"]), int(state["streak"]), int(state["trial"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Overlap) and self.state() == other.state()

    def report(self) -> dict:
        rate = self._rates()
        return {"sync_tokens_per_second": round(rate[0], 2), "sync_rounds": self.rounds[0],
                "async_tokens_per_second": round(rate[1], 2), "async_rounds": self.rounds[1]}


def _learn(p: np.ndarray | list[float], n: np.ndarray | list[float], i: int, outcome: float, prior: float) -> None:
    """Move estimate p[i] toward outcome: a mean over the first observations (the prior
    counting as `prior` of them), an exponential moving average after that."""
    seen, value = float(n[i]) + 1, float(p[i])  # (as floats: one read and one write of each)
    n[i] = seen
    p[i] = value + max(1.0 / (seen + prior), EMA) * (outcome - value)


class AcceptanceModel:
    """Conditional acceptance by draft position (the draft model's chains)."""

    PRIOR_WEIGHT = 2.0

    def __init__(self, prior: float, n: int):
        self.alpha = np.full(n, prior)  # (n,)
        self._seen = np.zeros(n)

    def observe(self, proposed: int, accepted: int) -> None:
        # positions 0..accepted-1 were accepted; position `accepted` (if drafted) was not
        for i in range(min(proposed, accepted + 1)):
            _learn(self.alpha, self._seen, i, float(i < accepted), self.PRIOR_WEIGHT)

    def chances(self, k: int) -> np.ndarray:
        return self.alpha[:k]

    def state(self) -> dict:
        return {"alpha": self.alpha.tolist(), "seen": self._seen.tolist()}

    def set_state(self, state: dict) -> None:
        """Take the estimates of state(); ValueError when they do not fit."""
        self.alpha, self._seen = (estimates(state[k], self.alpha.shape) for k in ("alpha", "seen"))


# A copied token's chance of acceptance grows with the length of the match behind it: the
# match of the copy source with the text just before it (for the i-th token of a draft
# from a match of length L, L + i: the draft tokens before it were accepted). It depends
# on where the source is: text the user gave (a document, code to edit) is copied far more
# faithfully than the answer's own earlier words, and the part of it an answer working
# through it in order has reached (ggspec.drafters.lookup: AHEAD) more than what it passed.
# It depends on the token: a copy tends to end where a line ends (the next line of an edit
# is the one that changes; a quotation stops at the end of its sentence or paragraph), so
# a copied line break is far less certain than the tokens inside a line. It depends on the
# match's other sources (earlier occurrences of the same text): where they all went on with
# the copied token it is more likely, where one went on differently far less (the text
# branches there). And on what is being written: an answer that copies a document
# confirms long matches, prose rarely does. So the estimate is kept by (where the source
# is, how often copying was right lately, the token's kind, match length); a token's kind
# is whether it ends a line plus KINDS_PER_AGREEMENT times its agreement
# (ggspec.drafters.lookup: ALONE, AGREE, DIFFER).
# Buckets of match length: bucket j holds MATCH_EDGES[j] <= L < MATCH_EDGES[j + 1]; of
# the recent hit rate: RECENT_EDGES likewise.
MATCH_EDGES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 128)
RECENT_EDGES = (0.0, 0.25, 0.5, 0.75)
RECENT_EMA = 1 / 8  # the recent hit rate weighs about the last eight outcomes
# starting guesses by match length, replaced by measurements on this engine's answers
MATCH_PRIOR = np.array([0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.85, 0.9, 0.9])
LINE_END_PRIOR = 0.7  # a line break's starting guess, as a fraction of MATCH_PRIOR
AGREE_MISS = 0.5      # where the other sources agree: the chance of a miss, as a fraction
DIFFER_HIT = 0.5      # where another source differs: the chance of a hit, as a fraction
KINDS_PER_AGREEMENT = 2  # inside a line, line end
# No copied token is surer than this, whatever the tables learnt: an answer may leave any
# copy at any token (a docstring after a copied `def` line, a changed value), and over the
# recorded answers of docs/speed-notes.md even copies that had held for 32 tokens or more
# broke at about 3% a token, and tokens estimated above 0.98 held at 0.98. Without the cap,
# a few hundred held copies put long matches at 0.995 a token, and a 31-token chain was
# priced at 26-28 accepted tokens where the answer broke off after 1-4: a larger draft_max
# made `auto` slower.
MAX_CHANCE = 0.98


def copy_kinds(line_ends: Sequence[bool], agreement: Sequence[int]) -> list[int]:
    """The kinds of copied tokens: line_ends (k,) whether each ends a line, agreement (k,)
    as Match.agreement."""
    if any(agreement):  # (mostly there are no other sources)
        return [int(end) + KINDS_PER_AGREEMENT * a for end, a in zip(line_ends, agreement, strict=True)]
    return [int(end) for end in line_ends]


def _kind_priors() -> np.ndarray:
    """Starting guesses (kinds, length buckets)."""
    by_line = np.stack([MATCH_PRIOR, LINE_END_PRIOR * MATCH_PRIOR])
    return np.concatenate([by_line, 1 - AGREE_MISS * (1 - by_line), DIFFER_HIT * by_line])


GUESSES = _kind_priors()  # (kind, length bucket)


class MatchAcceptance:
    """Chance that a copied draft token is accepted, by where its source is, the recent
    hit rate of copying, the token's kind (whether it ends a line, whether the match's
    other sources agree) and the match length behind it.

    Three levels: what this answer has shown so far (counts, from `start()`), what
    earlier answers have shown (a moving average over them), which weighs as
    ANSWER_PRIOR observations of this one, and the built-in starting guesses, which weigh
    as GUESS_WEIGHT more: a new answer starts from experience and soon follows its own
    evidence (a document being copied, or prose), instead of inheriting the last
    conversation's; and what earlier answers showed is never taken as certain before this
    one confirms it (after answers whose copies of the prompt always held, a rewrite of
    the prompt's code would otherwise draft its first long copies at 0.99 a token)."""

    PRIOR_WEIGHT = 2.0
    ANSWER_PRIOR = 4.0
    GUESS_WEIGHT = 1.0
    _GUESSED = (GUESS_WEIGHT * GUESSES).tolist()  # (the guesses' share of every table, computed once)
    NEIGHBOUR = 0.5  # an outcome counts this much for the neighbouring length buckets too
    _SHAPE = (3, len(RECENT_EDGES), *GUESSES.shape)  # where: lookup's OUTPUT, PROMPT, AHEAD

    # The tables are nested lists, indexed [where the source is][recent bucket][kind][length
    # bucket]: a round reads and updates a few of their entries, right after a decode,
    # where a numpy index costs several times a list's.
    def __init__(self) -> None:
        self.p = np.broadcast_to(GUESSES, self._SHAPE).tolist()
        self._seen = np.zeros(self._SHAPE).tolist()
        # this answer's outcomes; few in any one cell, so each also counts, at NEIGHBOUR
        # weight, for the match lengths on either side (the chance changes smoothly with them)
        self.hits = np.zeros(self._SHAPE).tolist()
        self.trials = np.zeros(self._SHAPE).tolist()
        self.recent = 0.5  # hit rate of the latest outcomes
        self.alternative = 0.5  # chance another source is right where the followed one is not

    def start(self) -> None:
        """A new answer."""
        self.hits, self.trials = np.zeros(self._SHAPE).tolist(), np.zeros(self._SHAPE).tolist()

    @staticmethod
    def bucket(length: int) -> int:
        return bisect.bisect_right(MATCH_EDGES, length) - 1

    @property
    def row(self) -> int:
        return bisect.bisect_right(RECENT_EDGES, self.recent) - 1

    def chances(self, match_len: int, kinds: Sequence[int], where: int) -> list[float]:
        """For a draft of len(kinds) tokens copied after a match of match_len tokens;
        kinds: theirs (copy_kinds)."""
        return self.chance_at(range(match_len, match_len + len(kinds)), kinds, where)

    def chance_at(self, lengths: Sequence[int], kinds: Sequence[int], where: int) -> list[float]:
        """Chances of copied tokens each after a match of lengths[i] tokens."""
        row = self.row
        p, hits, trials, guessed = self.p[where][row], self.hits[where][row], self.trials[where][row], self._GUESSED
        weight = self.ANSWER_PRIOR + self.GUESS_WEIGHT
        out = []
        for length, kind in zip(lengths, kinds, strict=True):
            b = self.bucket(length)
            out.append(min((hits[kind][b] + self.ANSWER_PRIOR * p[kind][b] + guessed[kind][b])
                           / (trials[kind][b] + weight), MAX_CHANCE))
        return out

    def observe_alternative(self, right: bool) -> None:
        """Where the followed source was wrong and another source differed from it: was
        one of the others right?"""
        self.alternative += RECENT_EMA * (float(right) - self.alternative)

    def observe(self, match_len: int, kinds: Sequence[int], hits: int, where: int) -> None:
        """The copy after a match of match_len tokens gave `hits` right tokens, then (when
        it proposed more, kinds being longer) a wrong one. kinds: those of the tokens it
        proposed (copy_kinds); where: the source's (lookup's OUTPUT, PROMPT or AHEAD)."""
        for i, kind in enumerate(kinds):
            hit = float(i < hits)
            b, row = self.bucket(match_len + i), self.row
            _learn(self.p[where][row][kind], self._seen[where][row][kind], b, hit, self.PRIOR_WEIGHT)
            hits_at, trials_at = self.hits[where][row][kind], self.trials[where][row][kind]
            for near in range(max(b - 1, 0), min(b + 2, len(MATCH_EDGES))):
                hits_at[near] += self.NEIGHBOUR * hit
                trials_at[near] += self.NEIGHBOUR
            hits_at[b] += (1 - self.NEIGHBOUR) * hit
            trials_at[b] += 1 - self.NEIGHBOUR
            self.recent += RECENT_EMA * (hit - self.recent)

    def state(self) -> dict:
        return {"p": np.array(self.p).tolist(), "seen": np.array(self._seen).tolist(),  # (copies)
                "hits": np.array(self.hits).tolist(), "trials": np.array(self.trials).tolist(),
                "recent": self.recent, "alternative": self.alternative}

    def set_state(self, state: dict) -> None:
        """Take the estimates of state(); ValueError when they do not fit. Tables saved by
        versions that kept two places (output, prompt) give the prompt's to both of its
        places now: sessions and stored experience from before still load."""
        tables = [np.array(state[k], dtype=np.float64) for k in ("p", "seen", "hits", "trials")]
        tables = [a[[0, 1, 1]] if a.shape == (2, *self._SHAPE[1:]) else a for a in tables]
        self.p, self._seen, self.hits, self.trials = (estimates(a, self._SHAPE).tolist() for a in tables)
        self.recent, self.alternative = float(state["recent"]), float(state["alternative"])


class TokenRecord:
    """This answer's record of copying each token: how many copies proposing it were tried
    and how many held.

    A conversion (JSON to YAML, callbacks to async/await) copies names and values from its
    input but not the syntax around them: its copies break at the same tokens again and
    again, whatever the match behind them. So a copied token's chance is capped by how
    often copies of that very token held in this answer so far, with the chance from
    MatchAcceptance counting as PRIOR such copies: a token that keeps breaking stops being
    trusted, and one that holds changes nothing (raising chances from it made long copies
    worse in the replays). Cleared for each answer, and not part of a saved state, which
    is taken between answers."""

    PRIOR = 8.0

    def __init__(self) -> None:
        self._record: dict[int, list[int]] = {}  # token -> [copies that held, copies tried]

    def clear(self) -> None:
        self._record.clear()

    def observe(self, tokens: Sequence[int], hits: int) -> None:
        """Copies proposed `tokens`: the first `hits` held, the one after them (if any) did not."""
        for i, token in enumerate(tokens):
            record = self._record.setdefault(token, [0, 0])
            record[0] += i < hits
            record[1] += 1

    def cap(self, chances: list[float], tokens: Sequence[int]) -> list[float]:
        """chances (k,) of copying tokens (k,), each lowered (in place) where its token's
        copies held less often than that chance: to (held + PRIOR * chance) / (tried + PRIOR)."""
        if self._record:
            get = self._record.get
            for i, (token, chance) in enumerate(zip(tokens, chances)):
                record = get(token)
                if record is not None and record[0] < record[1] * chance:  # held less often than `chance`
                    chances[i] = (record[0] + self.PRIOR * chance) / (record[1] + self.PRIOR)
        return chances


@dataclass(frozen=True)
class Plan:
    lookup: int = 0  # tokens taken from prompt lookup
    model: int = 0   # tokens then drafted by the draft model
    paths: int = 1   # more: the copied tokens are a tree of candidate continuations

    @property
    def total(self) -> int:
        return self.lookup + self.model


def _best_length(chances: list[float], copied: int, shortest: int, costs: CostModel, verify: list[float],
                 behind: int = 1) -> tuple[int, float]:
    """The chain length from `shortest` to len(chances) with the most expected committed
    tokens per second, and that rate: its first `copied` tokens cost nothing to draft, the
    later ones the draft model's time (catching up on `behind` tokens first).
    verify: t_verify(1), ..., t_verify(len(chances) + 1) at least. (In plain floats: for
    a round's few candidates, right after a decode, numpy's operations cost more.)"""
    rewind = costs.t_rewind(np.array(chances)).tolist() if costs.state_copy else None
    best, best_rate = shortest, -1.0
    gain = reach = 1.0  # gain: 1 + E[accepted] of the first j tokens
    for j in range(len(chances) + 1):
        if j:
            reach *= chances[j - 1]
            gain += reach
        if j < shortest:
            continue
        cost = verify[j] + costs.t_draft(j - copied, behind + copied)
        if rewind is not None:
            cost += rewind[j]
        rate = gain / cost
        if rate > best_rate:
            best, best_rate = j, rate
    return best, best_rate


def best_plan(costs: CostModel, lookup: Sequence[float], model: AcceptanceModel | None,
              budget: int, behind: int = 1) -> tuple[Plan, float]:
    """The plan with the most expected committed tokens per second, and that rate.

    lookup: conditional chances of the copied chain's tokens (its length is what lookup
    offers). The draft model may draft alone or continue after the whole copied chain;
    it has not seen the last `behind` committed tokens (1: only the last one)."""
    copied = list(lookup[:budget])
    if model is None and not copied:  # plain decoding is the only plan
        return Plan(), float(1 / costs.t_verify(1))
    verify = costs.t_verify_upto((budget if model is not None else len(copied)) + 1).tolist()
    n, rate = _best_length(copied, len(copied), 0, costs, verify)  # 0: plain decoding
    best = Plan(lookup=n)
    if model is None:
        return best, rate
    for prefix in sorted({0, len(copied)}, reverse=True):  # ties: copy first
        if prefix == budget:
            continue
        chances = copied[:prefix] + model.chances(budget - prefix).tolist()
        k, r = _best_length(chances, prefix, prefix + 1, costs, verify, behind)
        if r > rate:
            best, rate = Plan(lookup=prefix, model=k - prefix), r
    return best, rate


def best_tree(parents: Sequence[int], chances: np.ndarray, costs: CostModel, budget: int) -> tuple[np.ndarray, float]:
    """The nodes of a candidate tree worth verifying, and the expected committed tokens per
    second of that tree. chances (n,): each node's chance of acceptance given its parent
    was accepted. A node's chance of being reached is the product along its path, which
    never grows with depth, so the best tree of m nodes is the m most likely ones (a
    parent first on ties): returns them in that order (parents before children), the
    count chosen by the cost of m + 1 rows; none is plain decoding."""
    reach = np.empty(len(parents))
    for i, p in enumerate(parents):
        reach[i] = chances[i] * (reach[p] if p >= 0 else 1.0)
    order = np.argsort(-reach, kind="stable")[:budget]
    m = np.arange(len(order) + 1)
    rate = (1 + np.concatenate([[0.0], np.cumsum(reach[order])])) / costs.t_verify(m + 1)
    n = int(rate.argmax())
    return order[:n], float(rate[n])


def oracle_speedup(copyable: np.ndarray, costs: CostModel, k_max: int) -> float:
    """The best speed ratio to plain decoding that drafting with perfect foresight could
    reach on one answer at these costs: before token i, up to copyable[i] tokens can be
    drafted and are all accepted. Dynamic programming over the rounds; drafting time and
    Python work are free."""
    n = len(copyable)
    t = costs.t_verify(np.arange(1, k_max + 2))  # (k_max + 1,): t[k] verifies k drafted tokens
    best = np.zeros(n + 1)  # best[i]: least time to commit tokens i..n-1
    for i in range(n - 1, -1, -1):
        k = np.arange(min(int(copyable[i]), k_max, n - i - 1) + 1)
        best[i] = np.min(t[k] + best[i + k + 1])
    return float(n * t[0] / best[0]) if n else 0.0
