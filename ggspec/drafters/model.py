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
    """

    name = "draft"

    def __init__(self, ctx: Context, p_min: float = 0.0):
        self.ctx = ctx
        self.p_min = p_min

    def prepare(self, tokens: Sequence[int]) -> None:
        n = self.ctx.sync(tokens[:-1])
        self.ctx.eval(tokens[n:-1], logits="none")

    def propose(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:
        if budget <= 0:
            return Draft([])
        # the last committed token must be decoded here to get its logits
        n = min(self.ctx.sync(tokens), len(tokens) - 1)
        self.ctx.truncate(n)
        logits = self.ctx.eval(tokens[n:], logits="last")[0]
        out: list[int] = []
        qs: list[np.ndarray] = []
        while True:
            if sampling.greedy:
                x = int(np.argmax(logits))
                confident = self.p_min == 0 or softmax_max(logits) >= self.p_min
            else:
                q = warp(logits, sampling)  # (n_vocab,)
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
            logits = self.ctx.eval([x], logits="last")[0]
        return Draft(out, np.stack(qs) if qs else None)

    def accept(self, draft: Draft, nodes: Sequence[int]) -> None:
        """Nothing to learn: the next propose() syncs to the committed tokens."""
