"""`auto`: each round, choose the drafter and draft length with the most expected
committed tokens per second (ggspec.controller), from the engine's measured costs and
acceptance measured on this engine's answers. With Medusa heads loaded, a head tree is
one more candidate, taken when its expected rate is the best."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from typing import Sequence

import numpy as np

from ..config import MAX_DRAFT, SamplingConfig
from ..controller import (EXPLORE_EVERY, AcceptanceModel, CostModel, MatchAcceptance, Plan, TokenRecord, best_plan,
                          best_tree, copy_kinds)
from ..tree import Tree, trie
from . import Draft
from .eagle import EagleDrafter
from .lookup import AGREE, ALONE, DIFFER, LookupDrafter, Match
from .medusa import MedusaDrafter
from .model import ModelDrafter

MODEL_PRIOR = 0.7  # starting acceptance guess for the draft model, replaced by measurements


class AutoDrafter:
    """Combines prompt lookup, (when loaded) the draft model and Medusa heads under the
    controller: a round drafts nothing, a copied chain, a draft-model chain, a copied
    chain that the draft model extends, or a head tree."""

    name = "auto"

    def __init__(self, costs: CostModel, lookup: LookupDrafter, model: ModelDrafter | None,
                 line_ends: np.ndarray, heads: MedusaDrafter | EagleDrafter | None = None, max_paths: int = 1):
        self.costs = costs
        self.max_paths = max_paths  # > 1: copied candidates may form a tree of that many paths
        self._line_ends = frozenset(np.flatnonzero(line_ends).tolist())  # the tokens that hold a line break
        self.lookup = lookup
        self.model = model
        self.heads = heads  # Medusa or EAGLE: a tree from the target's hidden states
        self.copy_acceptance = MatchAcceptance()
        self.copied = TokenRecord()  # this answer's copies of each token
        self.model_acceptance = AcceptanceModel(MODEL_PRIOR, MAX_DRAFT) if model else None
        self.plans: Counter[Plan | str] = Counter()
        self._streak = 0  # plain rounds in a row

    def prepare(self, tokens: Sequence[int]) -> None:
        # the draft model is not prefilled here: it catches up when a round first uses it,
        # and that cost is part of what the controller measures
        self.lookup.prepare(tokens)
        self.copy_acceptance.start()
        self.copied.clear()
        if self.heads is not None:
            self.heads.prepare(tokens)
        self.plans.clear()

    def propose(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:
        copy = self.lookup.match(tokens, budget)
        if copy.followed is not None:  # every committed token tells how copying fares
            f = copy.followed
            self.copy_acceptance.observe(f.length, self._kinds(f.proposed, f.agreement), f.hits, f.where)
            self.copied.observe(f.proposed, f.hits)
            if f.alternative is not None:
                self.copy_acceptance.observe_alternative(f.alternative)
        plan, rate = Plan(), 0.0
        tree: Draft | None = None
        if self.costs.calibrated and budget > 0:
            chances: list[float] = []
            if copy.tokens:
                kinds = self._kinds(copy.tokens, copy.agreement)
                chances = self.copied.cap(self.copy_acceptance.chances(copy.length, kinds, copy.where), copy.tokens)
            behind = self.model.behind(tokens) if self.model is not None else 1
            plan, rate = best_plan(self.costs, chances, self.model_acceptance, budget, behind)
            if self.max_paths > 1 and copy.tokens:
                tree, tree_rate = self._copy_tree(copy, budget)
                if tree_rate <= rate:
                    tree = None
                rate = max(rate, tree_rate)
        if self.heads is not None:
            nodes, heads_rate = self.heads.plan(budget, tokens)
            if nodes and heads_rate > rate:
                self.plans[self.heads.name] += 1
                self._streak = 0
                return self.heads.draft(nodes)
        if tree is not None:
            self.plans[tree.plan] += 1
            self._streak = 0
            return tree
        if plan.total == 0 and self._streak >= EXPLORE_EVERY and budget > 0:
            plan = self._explore(tokens)
        self._streak = self._streak + 1 if plan.total == 0 else 0
        head = copy.tokens[:plan.lookup]
        tail = Draft([])
        if plan.model:
            t0 = time.perf_counter()
            # with a seed, draft greedily and verify by sample-and-match: the output is then
            # what plain sampling gives for that seed, whatever the controller chose
            how = replace(sampling, temperature=0) if sampling.seed is not None else sampling
            tail = self.model.propose([*tokens, *head], plan.model, how, rng)
            self.costs.observe_draft(len(tail.tokens), time.perf_counter() - t0, *self.model.catch_up)
        done = Plan(lookup=len(head), model=len(tail.tokens))
        self.plans[done] += 1
        if tail.q is None:
            return Draft(head + tail.tokens, plan=done)
        # a lookup token is a draft from a one-hot q: speculative sampling then equals
        # sample-and-match there, and stays exact for the model's tokens after it
        onehot = [(np.array([t]), np.ones(1)) for t in head]
        return Draft(head + tail.tokens, onehot + tail.q, plan=done)

    def _copy_tree(self, copy: Match, budget: int) -> tuple[Draft | None, float]:
        """The copied continuation and the differing ones of other sources as a tree, and
        its expected rate (None, 0 when no other source differs or the best is a chain).

        A node's chance given its parent: the first child (the most recent source's
        token) has the copy's chance at its match length; the others share, by how many
        sources continue with each, the chance that the first is wrong and another
        source is right."""
        others = self.lookup.source.alternatives(budget, self.max_paths - 1)
        if not others:
            return None, 0.0
        first = copy.tokens[:budget]
        tokens, parents, through = trie([first, *(c for c, _ in others)])
        weight = np.array([1, *(k for _, k in others)], dtype=np.float64)
        candidates = Tree(tuple(parents))
        # the copy's tokens (the first nodes) as its match says; the others' by the tree:
        # another source differs where a node has siblings, agrees where it is shared
        agreement = copy.agreement[:len(first)] + [
            DIFFER if len(candidates.children[parents[i] + 1]) > 1 else AGREE if weight[through[i]].sum() > 1 else ALONE
            for i in range(len(first), len(tokens))]
        copied = np.array(self.copied.cap(self.copy_acceptance.chance_at(
            (copy.length + candidates.depths - 1).tolist(), self._kinds(tokens, agreement), copy.where), tokens))
        chances = copied.copy()
        for kids in candidates.children:
            if len(kids) > 1:
                first, rest = kids[0], np.array(kids[1:])
                w = np.array([weight[through[i]].sum() for i in rest])
                chances[rest] = (1 - copied[first]) * self.copy_acceptance.alternative * w / w.sum()
        nodes, rate = best_tree(parents, chances, self.costs, budget)
        renumber = {int(old): new for new, old in enumerate(nodes)}
        tree = Tree(tuple(renumber[parents[i]] if parents[i] >= 0 else -1 for i in nodes))
        if tree.is_chain:
            return None, 0.0
        plan = Plan(lookup=len(nodes), paths=len(tree.paths))
        return Draft([tokens[i] for i in nodes], tree=tree, plan=plan), rate

    def _kinds(self, tokens: Sequence[int], agreement: Sequence[int]) -> list[int]:
        """The kinds of copied `tokens` (copy_kinds)."""
        ends = self._line_ends
        return copy_kinds([t in ends for t in tokens], agreement)

    def _explore(self, tokens: Sequence[int]) -> Plan:
        """After many plain rounds, draft one draft-model token to re-measure its
        acceptance -- if a perfectly accepted token could pay at the measured costs at all.
        (Copying needs no exploring: every committed token tells how the copy source
        fared.) The draft model must first catch up on every token committed since it
        last ran: it is explored only when drafting perfectly for EXPLORE_EVERY tokens
        would repay that."""
        t1 = self.costs.t_verify(1)
        if self.model is not None:
            saved = t1 - (self.costs.draft_token + self.costs.t_verify(2)) / 2  # per token
            catch_up = self.costs.t_draft(1, self.model.behind(tokens)) - self.costs.draft_token
            if saved > 0 and EXPLORE_EVERY * saved > catch_up:
                return Plan(model=1)
        return Plan()

    def accept(self, draft: Draft, nodes: Sequence[int]) -> None:
        if self.heads is not None:
            self.heads.accept(draft, nodes)  # keeps the heads' hidden state current
        plan = draft.plan
        if isinstance(plan, Plan) and plan.model and len(nodes) >= plan.lookup:
            self.model_acceptance.observe(plan.model, len(nodes) - plan.lookup)

    def state(self) -> dict:
        """What it learnt, as plain data, to save (ggspec.session); the costs are the engine's."""
        return {"copy_acceptance": self.copy_acceptance.state(), "streak": self._streak,
                "model_acceptance": None if self.model_acceptance is None else self.model_acceptance.state()}

    def set_state(self, state: dict) -> None:
        """Take what state() gave; ValueError when it does not fit this drafter."""
        if (state["model_acceptance"] is None) != (self.model_acceptance is None):
            raise ValueError("saved with and loaded without a draft model, or the reverse")
        self.copy_acceptance.set_state(state["copy_acceptance"])
        if self.model_acceptance is not None:
            self.model_acceptance.set_state(state["model_acceptance"])
        self._streak = int(state["streak"])

    def report(self) -> dict:
        """How often this answer chose each plan, and the costs the choices read. (The
        acceptance estimates, the rest of what the choices read, are the engine's state:
        experience.json keeps them.)"""
        return {
            "plans": {p if isinstance(p, str) else f"lookup={p.lookup},model={p.model}"
                      + (f",paths={p.paths}" if p.paths > 1 else ""): n
                      for p, n in sorted(self.plans.items(), key=lambda kv: -kv[1])},
            "verify_ms": None if not self.costs.calibrated else
            [round(1000 * t, 3) for t in self.costs.t_verify(np.arange(1, self.costs.max_rows + 1))],
            "draft_token_ms": round(1000 * self.costs.draft_token, 3),
            "state_copy_ms": round(1000 * self.costs.state_copy, 3),
        }
