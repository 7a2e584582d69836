"""Cost-aware choice of how much to draft, from measured costs and acceptance.

Pure numpy: no llama.cpp here. A round that drafts k tokens costs draft time plus one
verification of k + 1 rows, and commits 1 + E[accepted] tokens, where with conditional
acceptance a_i (the chance position i is accepted given positions < i were)
E[accepted | k] = sum_{j=1..k} prod_{i<=j} a_i. The controller picks the plan with the
most expected tokens per second; drafting nothing (plain decoding) is always a candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EMA = 0.1           # weight of a new observation
EXPLORE_EVERY = 48  # rounds of one kind (plain / drafting) in a row before trying the other
MARGIN = 1.1        # a draft must promise this much more than plain decoding: estimates are
                    # noisy, and a draft that does not pay costs more than one not taken


class CostModel:
    """Seconds per target verification of b rows, and per draft-model token (EMA)."""

    def __init__(self, verify: np.ndarray, draft_token: float = 0.0):
        self.verify = np.asarray(verify, dtype=np.float64)  # (b_max,): verify[b - 1] = t(b)
        self.draft_token = draft_token

    def t_verify(self, rows: int) -> float:
        b = min(rows, len(self.verify))
        # beyond the calibrated range: grow linearly from the last point
        return float(self.verify[b - 1] * rows / b)

    def observe_verify(self, rows: int, seconds: float) -> None:
        if rows <= len(self.verify):
            self.verify[rows - 1] += EMA * (seconds - self.verify[rows - 1])

    def observe_draft(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self.draft_token += EMA * (seconds / tokens - self.draft_token)


class AcceptanceModel:
    """Conditional acceptance by draft position, an exponential moving average."""

    def __init__(self, prior: float, n: int):
        self.alpha = np.full(n, prior)  # (n,)

    def observe(self, proposed: int, accepted: int) -> None:
        # positions 0..accepted-1 were accepted; position `accepted` (if drafted) was not
        reached = min(proposed, accepted + 1)
        outcome = (np.arange(reached) < accepted).astype(np.float64)
        self.alpha[:reached] += EMA * (outcome - self.alpha[:reached])

    def expected(self, k: int) -> np.ndarray:
        """E[accepted] for chains of length 1..k: (k,)."""
        return np.cumsum(np.cumprod(self.alpha[:k]))


@dataclass(frozen=True)
class Plan:
    lookup: int = 0  # tokens taken from prompt lookup
    model: int = 0   # tokens then drafted by the draft model

    @property
    def total(self) -> int:
        return self.lookup + self.model


def best_plan(costs: CostModel, lookup: AcceptanceModel, model: AcceptanceModel | None,
              lookup_len: int, budget: int) -> tuple[Plan, float]:
    """The plan with the most expected committed tokens per second, and that rate. A
    drafting plan is only taken when it beats plain decoding by MARGIN."""
    best, plain = Plan(), 1.0 / costs.t_verify(1)
    rate = plain * MARGIN
    n_lookup = min(lookup_len, budget)
    for n in range(1, n_lookup + 1):
        r = (1 + lookup.expected(n)[-1]) / costs.t_verify(n + 1)
        if r > rate:
            best, rate = Plan(lookup=n), r
    if model is None:
        return best, rate if best.total else plain
    # the draft model continues after the whole lookup chain (or drafts alone)
    for prefix in sorted({0, n_lookup}):
        base = lookup.expected(prefix)[-1] if prefix else 0.0
        reach = np.prod(lookup.alpha[:prefix]) if prefix else 1.0
        gains = base + reach * model.expected(budget - prefix)
        for m, gain in enumerate(gains, start=1):
            seconds = m * costs.draft_token + costs.t_verify(prefix + m + 1)
            r = (1 + gain) / seconds
            if r > rate:
                best, rate = Plan(lookup=prefix, model=m), r
    return best, rate if best.total else plain
