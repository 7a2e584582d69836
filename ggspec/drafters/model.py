"""Draft-model drafter: a small model with the target's tokenizer proposes a chain.

Asynchronous drafting: while the target verifies a draft, a worker thread can draft the
next round as if that draft is accepted whole (llama-cpp-python's ctypes calls release
the GIL, so the two llama_decode calls run at once). Any proposal keeps the output exact
-- verification decides -- as long as each proposed token's q is the distribution it was
drawn from, which the worker records as the synchronous path does.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

import numpy as np

from ..backend import Context
from ..config import SamplingConfig
from ..sampling import distribution, pick, softmax_max
from ..tokens import common_prefix
from . import Draft


AHEAD = "drafted ahead"  # Draft.plan of a draft that the worker made


class _Ahead:
    """One worker run: the next round's draft, drafted after `base` (the committed tokens
    and the draft being verified) and the draft model's own next token, its guess at the
    target's token after `base`."""

    def __init__(self, base: list[int]):
        self.base = base
        self.guess: int | None = None  # written by the worker once drafted
        self.bonus: int | None = None  # the target's token after base, written once known
        self.stop = threading.Event()  # the speculation is void: stop drafting
        self.recorded = threading.Event()  # the drafter holds this run (it will join the worker)
        self.chain = Draft([])         # [guess, *next round's draft] with their q
        self.error: Exception | None = None
        self.thread: threading.Thread | None = None
        self.busy = 0.0  # seconds the worker spent inside llama_decode

    def go_on(self, out: list[int]) -> bool:
        """Called after each drafted token. The worker writes guess before it reads bonus
        and the main thread writes bonus before it reads guess: a mismatch is seen by one."""
        self.guess = out[0]
        return not self.stop.is_set() and self.bonus in (None, self.guess)


class ModelDrafter:
    """Drafts autoregressively with its own llama.cpp context.

    Its KV cache follows the committed tokens: each round it decodes only the tokens it
    has not seen (the target's correction or bonus token, and nothing else), never the
    history again.

    n_vocab is the target's vocabulary size, which may differ from the draft's (llama.cpp
    pairs models up to 128 tokens apart): drafts and q rows are at the target's width, a
    token beyond the target's vocabulary is never proposed, and a committed token beyond
    the draft's is read by the draft as token 0 (it only makes its drafts worse: the
    target's verification keeps the output exact).

    One owner for the context: while a worker runs (propose_ahead) only it touches the
    context; every other method joins it first.
    """

    name = "draft"

    def __init__(self, ctx: Context, n_vocab: int | None = None):
        self.ctx = ctx
        self.p_min = 0.0  # stop before a token the draft gives less probability (set per generation)
        self.n_vocab = ctx.n_vocab if n_vocab is None else n_vocab
        self._ahead: _Ahead | None = None
        self.catch_up = (1, 0.0)  # the last chain's first decode: (rows, seconds)
        # seconds the worker spent inside llama_decode while the caller did not wait for it
        self.hidden_seconds = 0.0

    def _row(self, logits: np.ndarray, sampling: SamplingConfig) -> np.ndarray:
        """Draft logits (draft n_vocab,) -> (target n_vocab,): cut, or padded with -inf;
        with ignore_eos, -inf for the draft's end-of-generation tokens too."""
        missing = self.n_vocab - len(logits)
        if missing > 0:
            logits = np.concatenate([logits, np.full(missing, -np.inf, dtype=logits.dtype)])
        if sampling.ignore_eos:
            logits[list(self.ctx.model.eog)] = -np.inf
        return logits[:self.n_vocab]

    def _known(self, tokens: Sequence[int]) -> Sequence[int]:
        """`tokens` with every id the draft lacks replaced by 0."""
        if self.n_vocab <= self.ctx.n_vocab:
            return tokens
        n = self.ctx.n_vocab
        return [t if t < n else 0 for t in tokens]

    def behind(self, tokens: Sequence[int]) -> int:
        """Rows the first decode of a chain after `tokens` holds: the tokens its cache
        lacks, at least the last one (whose logits it needs)."""
        return len(tokens) - min(common_prefix(self.ctx.tokens, self._known(tokens)), len(tokens) - 1)

    def prepare(self, tokens: Sequence[int]) -> None:
        self.stop()
        tokens = self._known(tokens)
        n = self.ctx.sync(tokens[:-1])
        self.ctx.eval(tokens[n:-1], logits="none")

    def propose(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:
        ahead = self._join(tokens)
        if ahead is not None and ahead.chain.tokens and len(tokens) == len(ahead.base) + 1 \
                and tokens[-1] == ahead.chain.tokens[0] and list(tokens[:-1]) == ahead.base:
            # the draft was accepted whole and the target's token was the guess: the
            # worker's draft follows exactly these tokens
            q = ahead.chain.q
            return Draft(ahead.chain.tokens[1:budget + 1], None if q is None else q[1:budget + 1], plan=AHEAD)
        return self._chain(tokens, budget, sampling, rng)

    def _chain(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
               rng: np.random.Generator, go_on: Callable[[list[int]], bool] | None = None) -> Draft:
        """Up to `budget` tokens after `tokens`, each drawn from (or the argmax of) the
        draft's warped distribution q; go_on(tokens so far) False stops early."""
        if budget <= 0:
            return Draft([])
        tokens = self._known(tokens)
        # the last committed token must be decoded here to get its logits
        n = min(self.ctx.sync(tokens), len(tokens) - 1)
        self.ctx.truncate(n)
        same = self.n_vocab == self.ctx.n_vocab and not sampling.ignore_eos  # rows need no _row
        t0 = time.perf_counter()
        logits = self.ctx.eval(tokens[n:], logits="last")[0]
        self.catch_up = (len(tokens) - n, time.perf_counter() - t0)
        logits = logits if same else self._row(logits, sampling)
        # the next round keeps only the drafts the target accepted: a recurrent draft
        # model's state is saved here, to come back to
        self.ctx.checkpoint(budget - 1, 0)
        out: list[int] = []
        qs: list[np.ndarray] = []
        while True:
            if sampling.greedy:
                x = int(logits.argmax())
                confident = self.p_min == 0 or softmax_max(logits) >= self.p_min
            else:
                q = distribution(logits, sampling)
                x = pick(*q, rng)
                confident = q[1].max() >= self.p_min
                qs.append(q)
            if not confident:
                # too unsure to be worth verifying: stop before this token
                qs = qs[:len(out)]
                break
            out.append(x)
            if len(out) == budget or (go_on is not None and not go_on(out)):
                break
            logits = self.ctx.eval([x], logits="last")[0]
            logits = logits if same else self._row(logits, sampling)
        return Draft(out, qs or None)

    def propose_ahead(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                      rng: np.random.Generator) -> None:
        """Start a worker drafting the round after the one that verifies up to `tokens`
        (committed tokens and the draft), as if that draft is accepted whole: the draft's
        own next token stands in for the target's, then up to `budget` tokens follow.
        Until propose() (or stop()) joins it, the worker alone uses the context. It draws
        from a generator seeded by one draw of `rng`: how far it got before being stopped
        then does not change `rng`, so a seeded run replays exactly."""
        self.stop()
        ahead = _Ahead(list(tokens))
        rng = np.random.default_rng(rng.integers(2**63))

        def work() -> None:
            ahead.recorded.wait()
            if ahead.stop.is_set():  # start() was interrupted: no one joins this worker
                return
            busy = self.ctx.busy_seconds
            try:
                ahead.chain = self._chain(ahead.base, budget + 1, sampling, rng, ahead.go_on)
            except Exception as e:  # handed to the main thread by _join
                ahead.error = e
            ahead.busy = self.ctx.busy_seconds - busy

        ahead.thread = threading.Thread(target=work, name="ggspec-draft-ahead", daemon=True)
        # Ctrl-C inside start() may leave a worker that runs but that join() refuses (not
        # yet marked started), or none: such a worker returns without touching the context
        try:
            ahead.thread.start()
            self._ahead = ahead
        finally:
            if self._ahead is not ahead:
                ahead.stop.set()
            ahead.recorded.set()

    def _join(self, tokens: Sequence[int]) -> _Ahead | None:
        """Wait for the worker (told the committed tokens, so that it stops early when its
        guess turned out wrong); raise its error. None when none ran."""
        ahead = self._ahead
        if ahead is None:
            return None
        if len(tokens) == len(ahead.base) + 1:
            ahead.bonus = tokens[-1]
            if ahead.guess not in (None, ahead.bonus):
                ahead.stop.set()
        else:
            ahead.stop.set()
        self._wait(ahead)
        self._ahead = None  # (only once joined: an interrupted join leaves it for stop())
        if ahead.error is not None:
            ahead.error.add_note("(raised in the draft model's worker thread, drafting ahead)")
            raise ahead.error
        return ahead

    def stop(self) -> None:
        """Stop the worker, if one runs, and wait for it; its draft and error are dropped
        (the context's cache then holds what it decoded: the next sync trims it)."""
        ahead = self._ahead
        if ahead is not None:
            ahead.stop.set()
            self._wait(ahead)
            self._ahead = None

    def _wait(self, ahead: _Ahead) -> None:
        """Join the worker; its llama.cpp time that the wait did not cover was hidden."""
        t0 = time.perf_counter()
        ahead.thread.join()
        self.hidden_seconds += max(ahead.busy - (time.perf_counter() - t0), 0.0)

    def accept(self, draft: Draft, nodes: Sequence[int]) -> None:
        """A rejected draft voids the worker's speculation: stop it now (the next
        propose() syncs the context to the committed tokens)."""
        if self._ahead is not None and len(nodes) < len(draft.tokens):
            self._ahead.stop.set()
