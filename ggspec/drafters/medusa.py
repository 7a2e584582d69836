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
from ..controller import EMA, MARGIN, CostModel
from ..heads import TOP_K, MedusaHeads
from ..tree import TREE_SHAPES, Tree, fixed_choices, grown_choices, tree_from_choices
from . import Draft
from .auto import measure_verify_costs


class MedusaDrafter:
    name = "medusa"

    def __init__(self, target: Context, heads: MedusaHeads, max_nodes: int, shape: str = "grown",
                 nodes: int = 0):
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
        self.costs: CostModel | None = None
        self.head_seconds = 0.0  # evaluating the heads, an EMA
        self._hidden: np.ndarray | None = None
        self._rows = 1
        self._ranks = np.zeros(0, dtype=np.int64)
        self._tree: Tree | None = None
        self._planned: list[tuple[int, ...]] = []

    def prepare(self, tokens: Sequence[int]) -> None:
        self._hidden = None  # a new prompt: the first round runs plain and yields one
        if self.costs is None and len(self.target.tokens) + self.max_nodes + 2 <= self.target.n_ctx:
            self.costs = CostModel(measure_verify_costs(self.target, self.max_nodes + 1))

    def plan(self, budget: int) -> tuple[int, float]:
        """The tree size to draft now (0: none) and its expected committed tokens per second."""
        if self._hidden is None or self.costs is None:
            return 0, 0.0
        # best-first: the first n of these nodes are the tree of n nodes
        self._planned, chances = self._choices(min(budget, self.max_nodes))
        gain = 1 + np.concatenate([[0.0], np.cumsum(chances)])  # (n + 1,)
        seconds = np.array([self.costs.t_verify(k + 1) for k in range(len(gain))]) + self.head_seconds
        seconds[0] -= self.head_seconds  # a plain round evaluates no heads
        rate = gain / seconds
        if self.nodes:
            n = min(self.nodes, len(rate) - 1)
        else:
            n = int(np.argmax(rate))
            if rate[n] < MARGIN * rate[0]:
                n = 0  # too little to gain for the risk
        return n, float(rate[n])

    def propose(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:
        return self.draft(self.plan(budget)[0])

    def draft(self, n: int) -> Draft:
        """A tree of n nodes from the heads (0: none, a plain round), after plan()."""
        if n == 0:
            self.passed(1)
            return Draft([])
        t0 = time.perf_counter()
        ids, _ = self.heads.propose(self._hidden, self.top_k)  # (n_heads, top_k)
        self.head_seconds += EMA * (time.perf_counter() - t0 - self.head_seconds)
        tree, ranks = tree_from_choices(self._planned[:n])
        self._tree, self._ranks, self._rows = tree, ranks, n + 1
        return Draft([int(ids[d - 1, r]) for d, r in zip(tree.depths, ranks)], tree=tree)

    def _choices(self, budget: int):
        if self.shape is None:
            return grown_choices(self.acceptance, budget)
        return fixed_choices(self.shape, self.acceptance, budget)

    def passed(self, rows: int) -> None:
        """This round verifies `rows` rows that are not a tree of these heads."""
        self._tree, self._rows = None, rows

    def accept(self, nodes: Sequence[int], verify_seconds: float) -> None:
        # the hidden state of the row whose logits gave the committed token
        row = nodes[-1] + 1 if len(nodes) else 0
        self._hidden = self.target.hidden(self._rows)[row].copy()
        if self.costs is not None:
            self.costs.observe_verify(self._rows, verify_seconds)
        if self._tree is not None:
            self._learn(list(nodes))

    def _learn(self, nodes: list[int]) -> None:
        """Update the (head, rank) acceptance from the levels the verification reached."""
        tree = self._tree
        parent_row = 0
        for depth in range(1, len(nodes) + 2):
            children = tree.children[parent_row]
            if not children:
                return
            taken = nodes[depth - 1] if depth <= len(nodes) else None
            for c in children:
                hit = 1.0 if c == taken else 0.0
                r = self._ranks[c]
                self.acceptance[depth - 1, r] += EMA * (hit - self.acceptance[depth - 1, r])
            if taken is None:
                return
            parent_row = taken + 1
