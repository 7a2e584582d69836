"""Medusa heads: the target's own last hidden state proposes a token tree, no draft model.

Head d reads the hidden state of the row that produced the last committed token and
predicts the token d + 1 positions after it. Each round grows the tree with the highest
expected accepted length from the measured acceptance of every (head, rank) (or takes a
fixed shape: chain, cartesian, Medusa's sparse tree), and sizes it
by the target's measured verification cost: the node count n maximises
(1 + expected accepted) / (t_verify(n + 1) + t_heads). Zero nodes means a plain round.
A fixed node count (`nodes`) skips that choice.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..backend import Context
from ..config import SamplingConfig
from ..controller import EMA, CostModel, estimates
from ..heads import TOP_K, MedusaHeads
from ..tree import TREE_SHAPES, Tree, fixed_choices, grown_choices, tree_from_choices
from . import Draft


class MedusaDrafter:
    name = "medusa"

    def __init__(self, target: Context, costs: CostModel, heads: MedusaHeads, max_nodes: int,
                 shape: str = "grown", nodes: int = 0):
        if shape not in TREE_SHAPES:
            raise ValueError(f"tree shape must be one of {', '.join(TREE_SHAPES)}, got {shape!r}")
        if not (isinstance(nodes, int) and 0 <= nodes <= max_nodes):
            raise ValueError(f"tree nodes must be an integer from 0 (sized by cost) to "
                             f"{max_nodes}, got {nodes!r}")
        self.nodes = nodes
        self.target = target
        self.heads = heads
        self.max_nodes = max_nodes
        self.shape = TREE_SHAPES[shape]
        self.top_k = min(TOP_K, heads.vocab_size)
        # chance that head d's rank-r candidate is accepted given its parent was: (n_heads,
        # top_k), from the head file's measurement where it has one, else a guess
        ranks = np.arange(1, self.top_k + 1)
        self.acceptance = 0.5 ** np.arange(1, heads.n_heads + 1)[:, None] / ranks[None, :]
        if heads.acceptance is not None:
            k = min(self.top_k, heads.acceptance.shape[1])
            self.acceptance[:, :k] = heads.acceptance[:, :k]
        self.costs = costs
        self.head_seconds = 0.0  # evaluating the heads, an EMA
        self._hidden: np.ndarray | None = None
        self._planned: list[tuple[int, ...]] = []

    def prepare(self, tokens: Sequence[int]) -> None:
        self._hidden = None  # a new prompt: the first round runs plain and yields one

    def plan(self, budget: int, tokens: Sequence[int] = ()) -> tuple[int, float]:
        """The tree size to draft now (0: none) and its expected committed tokens per second
        (the heads read the last hidden state, not `tokens`)."""
        if self._hidden is None or not self.costs.calibrated:
            return 0, 0.0
        # best-first: the first n of these nodes are the tree of n nodes
        self._planned, chances = self._choices(min(budget, self.max_nodes))
        gain = 1 + np.concatenate([[0.0], np.cumsum(chances)])  # (n + 1,)
        k = np.arange(len(gain))
        seconds = self.costs.t_verify(k + 1) + np.where(k > 0, self.head_seconds, 0.0)  # plain: no heads
        rate = gain / seconds
        n = min(self.nodes, len(rate) - 1) if self.nodes else int(rate.argmax())
        return n, float(rate[n])

    def propose(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:
        return self.draft(self.plan(budget)[0])

    def draft(self, n: int) -> Draft:
        """A tree of n nodes from the heads (0: none, a plain round), after plan()."""
        if n == 0:
            return Draft([])
        t0 = time.perf_counter()
        ids, _ = self.heads.propose(self._hidden, self.top_k)  # (n_heads, top_k)
        self.head_seconds += EMA * (time.perf_counter() - t0 - self.head_seconds)
        tree, ranks = tree_from_choices(self._planned[:n])
        return Draft([int(ids[d - 1, r]) for d, r in zip(tree.depths, ranks)], tree=tree, plan=ranks)

    def state(self) -> dict:
        """The measured acceptance and head cost as plain data, to save (ggspec.session)."""
        return {"acceptance": self.acceptance.tolist(), "head_seconds": self.head_seconds}

    def set_state(self, state: dict) -> None:
        """Take what state() gave; ValueError when it does not fit these heads."""
        self.acceptance = estimates(state["acceptance"], self.acceptance.shape)
        self.head_seconds = float(state["head_seconds"])

    def _choices(self, budget: int):
        if self.shape is None:
            return grown_choices(self.acceptance, budget)
        return fixed_choices(self.shape, self.acceptance, budget)

    def accept(self, draft: Draft, nodes: Sequence[int]) -> None:
        # the hidden state of the row whose logits gave the committed token; any draft
        # (also another drafter's chain) was verified with one row per token after the pending one
        row = nodes[-1] + 1 if len(nodes) else 0
        self._hidden = self.target.hidden(len(draft.tokens) + 1)[row].copy()
        if draft.tree is not None and isinstance(draft.plan, np.ndarray):  # its own tree, with its ranks
            self._learn(draft.tree, draft.plan, list(nodes))                # (auto's copy trees carry a Plan)

    def _learn(self, tree: Tree, ranks: np.ndarray, nodes: list[int]) -> None:
        """Update the (head, rank) acceptance from the levels the verification reached."""
        parent_row = 0
        for depth in range(1, len(nodes) + 2):
            children = tree.children[parent_row]
            if not children:
                return
            taken = nodes[depth - 1] if depth <= len(nodes) else None
            for c in children:
                hit = 1.0 if c == taken else 0.0
                r = ranks[c]
                self.acceptance[depth - 1, r] += EMA * (hit - self.acceptance[depth - 1, r])
            if taken is None:
                return
            parent_row = taken + 1
