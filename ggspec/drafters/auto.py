"""`auto`: each round, choose the drafter and draft length with the most expected
committed tokens per second (ggspec.controller), from costs measured on this machine and
acceptance measured on this conversation. With Medusa heads loaded, a head tree is one
more candidate, taken when its expected rate is the best."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..backend import Context
from ..config import SamplingConfig
from ..controller import EXPLORE_EVERY, AcceptanceModel, CostModel, Plan, best_plan
from ..tokens import common_prefix
from . import Draft
from .lookup import LookupDrafter
from .model import ModelDrafter

if TYPE_CHECKING:
    from .medusa import MedusaDrafter

LOOKUP_PRIOR = 0.6  # starting acceptance guesses, replaced by measurements within rounds
MODEL_PRIOR = 0.7


def measure_verify_costs(ctx: Context, rows: int) -> np.ndarray:
    """Seconds for one decode of b = 1..rows tokens after the cached ones: (rows,),
    measured at a few sizes and interpolated. Leaves the KV cache as it found it."""
    n = len(ctx.tokens)
    filler = ctx.tokens[-1:] or [0]
    ctx.eval(filler, logits="last")  # warm-up: the first decode allocates
    ctx.truncate(n)
    sizes = sorted({b for b in (1, 2, 4, rows) if b <= rows})
    seconds = dict.fromkeys(sizes, np.inf)
    for b in (1, *sizes):  # t(1), the baseline every plan is compared with, twice
        t0 = time.perf_counter()
        ctx.eval(filler * b, logits="all")
        seconds[b] = min(seconds[b], time.perf_counter() - t0)
        ctx.truncate(n)
    curve = np.interp(np.arange(1, rows + 1), sizes, [seconds[b] for b in sizes])
    return np.maximum.accumulate(curve)  # more rows never cost less


class AutoDrafter:
    """Combines prompt lookup and (when loaded) the draft model under the controller:
    a round drafts nothing, a lookup chain, a draft-model chain, or a lookup chain that
    the draft model extends."""

    name = "auto"

    def __init__(self, target: Context, lookup: LookupDrafter, model: ModelDrafter | None, k_max: int,
                 medusa: MedusaDrafter | None = None):
        self.target = target
        self.lookup = lookup
        self.model = model
        self.medusa = medusa
        self.k_max = k_max
        self.costs: CostModel | None = None
        self.lookup_acceptance = AcceptanceModel(LOOKUP_PRIOR, k_max)
        self.model_acceptance = AcceptanceModel(MODEL_PRIOR, k_max) if model else None
        self.plans: Counter[Plan | str] = Counter()
        self._plan = Plan()
        self._streak = 0  # > 0: plain rounds in a row; < 0: drafting rounds in a row

    def prepare(self, tokens: Sequence[int]) -> None:
        # the draft model is not prefilled here: it catches up when a round first uses it,
        # and that cost is part of what the controller measures
        self.lookup.prepare(tokens)
        if self.medusa is not None:
            self.medusa.prepare(tokens)
        self.plans.clear()
        if self.costs is None and len(self.target.tokens) + self.k_max + 2 <= self.target.n_ctx:
            draft_token = float(measure_verify_costs(self.model.ctx, 1)[0]) if self.model else 0.0
            self.costs = CostModel(measure_verify_costs(self.target, self.k_max + 1), draft_token)

    def propose(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:
        budget = min(budget, self.k_max)
        chain = self.lookup.propose(tokens, budget, sampling, rng).tokens
        plan, rate = Plan(), 0.0
        if self.costs is not None:
            plan, rate = best_plan(self.costs, self.lookup_acceptance, self.model_acceptance, len(chain), budget)
        if self.medusa is not None:
            nodes, medusa_rate = self.medusa.plan(budget)
            if nodes and medusa_rate > rate:
                self._plan = Plan()
                self.plans["medusa"] += 1
                return self.medusa.draft(nodes)
        if plan.total == 0 and self._streak >= EXPLORE_EVERY and budget > 0:
            plan = self._explore(chain, tokens)
        elif plan.total and self._streak <= -EXPLORE_EVERY:
            plan = Plan()  # and re-measure the cost of a plain round
        self._streak = max(self._streak, 0) + 1 if plan.total == 0 else min(self._streak, 0) - 1
        head = chain[:plan.lookup]
        tail = Draft([])
        if plan.model:
            t0 = time.perf_counter()
            # with a seed, draft greedily and verify by sample-and-match: the output is then
            # what plain sampling gives for that seed, whatever the controller chose
            how = replace(sampling, temperature=0) if sampling.seed is not None else sampling
            tail = self.model.propose([*tokens, *head], plan.model, how, rng)
            self.costs.observe_draft(len(tail.tokens), time.perf_counter() - t0)
        self._plan = Plan(lookup=len(head), model=len(tail.tokens))
        self.plans[self._plan] += 1
        if self.medusa is not None:
            self.medusa.passed(self._plan.total + 1)
        if tail.q is None:
            return Draft(head + tail.tokens)
        # a lookup token is a draft from a one-hot q: speculative sampling then equals
        # sample-and-match there, and stays exact for the model's tokens after it
        onehot = np.zeros((len(head), tail.q.shape[1]))
        onehot[np.arange(len(head)), head] = 1.0
        return Draft(head + tail.tokens, np.concatenate([onehot, tail.q]))

    def _explore(self, chain: list[int], tokens: Sequence[int]) -> Plan:
        """After many plain rounds, draft one token to re-measure acceptance -- if a
        perfectly accepted token could pay at the measured costs at all. The draft model
        must first catch up on every token committed since it last ran: it is explored
        only when drafting perfectly for EXPLORE_EVERY tokens would repay that."""
        if self.costs is None:
            return Plan()
        t1 = self.costs.t_verify(1)
        if chain and 2.0 / self.costs.t_verify(2) > 1.0 / t1:
            return Plan(lookup=1)
        if self.model is not None:
            saved = t1 - (self.costs.draft_token + self.costs.t_verify(2)) / 2  # per token
            behind = len(tokens) - common_prefix(self.model.ctx.tokens, tokens)
            # a one-row decode per token bounds the catch-up (a batch costs less per row)
            if saved > 0 and EXPLORE_EVERY * saved > behind * self.costs.draft_token:
                return Plan(model=1)
        return Plan()

    def accept(self, nodes: Sequence[int], verify_seconds: float) -> None:
        if self.medusa is not None:
            self.medusa.accept(nodes, verify_seconds)  # keeps the heads' hidden state current
        n_accepted = len(nodes)
        plan = self._plan
        if self.costs is not None:
            self.costs.observe_verify(plan.total + 1, verify_seconds)
        if plan.lookup:
            self.lookup_acceptance.observe(plan.lookup, min(n_accepted, plan.lookup))
        if plan.model and n_accepted >= plan.lookup:
            self.model_acceptance.observe(plan.model, n_accepted - plan.lookup)

    def report(self) -> dict:
        """The controller's estimates and how often it chose each plan."""
        return {
            "plans": {p if isinstance(p, str) else f"lookup={p.lookup},model={p.model}": n
                      for p, n in sorted(self.plans.items(), key=lambda kv: -kv[1])},
            "verify_ms": None if self.costs is None else [round(1000 * t, 3) for t in self.costs.verify],
            "draft_token_ms": None if self.costs is None else round(1000 * self.costs.draft_token, 3),
            "lookup_acceptance": [round(a, 3) for a in self.lookup_acceptance.alpha],
            "model_acceptance": None if self.model_acceptance is None else
            [round(a, 3) for a in self.model_acceptance.alpha],
        }
