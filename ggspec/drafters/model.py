"""Draft-model drafter: a small model with the target's tokenizer proposes a chain."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..backend import Context
from ..config import SamplingConfig
from ..sampling import sample, softmax_max, warp
from . import Draft


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
    """

    name = "draft"

    def __init__(self, ctx: Context, p_min: float = 0.0, n_vocab: int | None = None):
        self.ctx = ctx
        self.p_min = p_min
        self.n_vocab = ctx.n_vocab if n_vocab is None else n_vocab

    def _row(self, logits: np.ndarray) -> np.ndarray:
        """Draft logits (draft n_vocab,) -> (target n_vocab,): cut, or padded with -inf."""
        missing = self.n_vocab - len(logits)
        if missing <= 0:
            return logits[:self.n_vocab]
        return np.concatenate([logits, np.full(missing, -np.inf, dtype=logits.dtype)])

    def _known(self, tokens: Sequence[int]) -> Sequence[int]:
        """`tokens` with every id the draft lacks replaced by 0."""
        if self.n_vocab <= self.ctx.n_vocab:
            return tokens
        n = self.ctx.n_vocab
        return [t if t < n else 0 for t in tokens]

    def prepare(self, tokens: Sequence[int]) -> None:
        tokens = self._known(tokens)
        n = self.ctx.sync(tokens[:-1])
        self.ctx.eval(tokens[n:-1], logits="none")

    def propose(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:
        if budget <= 0:
            return Draft([])
        tokens = self._known(tokens)
        # the last committed token must be decoded here to get its logits
        n = min(self.ctx.sync(tokens), len(tokens) - 1)
        self.ctx.truncate(n)
        logits = self._row(self.ctx.eval(tokens[n:], logits="last")[0])
        # the next round keeps only the drafts the target accepted: a recurrent draft
        # model's state is saved here, to come back to
        self.ctx.checkpoint(budget - 1, 0)
        out: list[int] = []
        qs: list[np.ndarray] = []
        while True:
            if sampling.greedy:
                x = int(np.argmax(logits))
                confident = self.p_min == 0 or softmax_max(logits) >= self.p_min
            else:
                q = warp(logits, sampling)  # (target n_vocab,)
                x = sample(q, rng)
                confident = q.max() >= self.p_min
                qs.append(q)
            if not confident:
                # too unsure to be worth verifying: stop before this token
                qs = qs[:len(out)]
                break
            out.append(x)
            if len(out) == budget:
                break
            logits = self._row(self.ctx.eval([x], logits="last")[0])
        return Draft(out, np.stack(qs) if qs else None)

    def accept(self, draft: Draft, nodes: Sequence[int]) -> None:
        """Nothing to learn: the next propose() syncs to the committed tokens."""
