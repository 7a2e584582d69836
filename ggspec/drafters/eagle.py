"""EAGLE drafts: a one-layer draft reads the target's hidden states and grows an EAGLE-2
dynamic token tree; the target verifies the tree in one llama_decode.

Features: for EAGLE-3 the target's context taps the inputs of the draft's three target
layers for every row of every decode (backend taps); for EAGLE-1/2 (heads.eagle1) it
outputs its last hidden state of every row (embeddings). After a round, the committed rows' features
g_P and the committed tokens give the pairs (token P+1, g_P); running them through the
draft fills its KV cache and its last row predicts the token after the pending one.

The tree (SafeAILab's topK_genrate): depth 1 holds the top `top_k` tokens of that
prediction; each further depth expands the `top_k` frontier nodes of highest cumulative
log-probability, all in one batched draft step (each node feeds its parent's pre-norm
output back as g), and keeps their children's top `top_k`. Of the frontier only the nodes
inside the best tree found so far are expanded (none left: the tree is done), so where
extra rows cost much (a CPU) the steps narrow to what can be verified. Of all nodes, the best by
cumulative log-probability make the tree; its size n maximises the expected committed
tokens per second, (1 + sum of the first n nodes' chances) / (t_verify(n + 1) + t_draft),
by the engine's cost model, each node's chance being exp(cumulative log-probability)
scaled by the measured ratio of accepted to expected tokens. Zero nodes: a plain round.

Growing a tree costs draft steps whether or not any node is worth verifying: after a round
whose best tree was empty, the next 1, 2, 4, ... (at most EXPLORE_EVERY) rounds are plain
without growing one, and the committed rows' features wait; the round that grows again
runs them through the draft in one batch. The wait carries over to the next prompt (what
the costs allowed on the last answer still holds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..backend import Context
from ..config import SamplingConfig
from ..controller import EMA, EXPLORE_EVERY, CostModel
from ..heads import nn
from ..heads.eagle_paths import LlamaPath, NumpyPath
from ..tree import Tree
from . import Draft

TOP_K = 8  # children per expanded node, and frontier nodes expanded per depth
DEPTH = 5  # draft steps per tree


@dataclass(frozen=True)
class _Grown:
    """A grown tree before sizing, nodes best first (parents before children)."""

    tokens: np.ndarray   # (m,) target ids
    parents: np.ndarray  # (m,) index of the parent in this order, -1 at depth 1
    chances: np.ndarray  # (m,) exp(cumulative log-probability)


class EagleDrafter:
    name = "eagle"

    def __init__(self, target: Context, costs: CostModel, path: NumpyPath | LlamaPath, max_nodes: int,
                 nodes: int = 0, depth: int = DEPTH, top_k: int = TOP_K):
        if not (isinstance(nodes, int) and 0 <= nodes <= max_nodes):
            raise ValueError(f"tree nodes must be an integer from 0 (sized by cost) to "
                             f"{max_nodes}, got {nodes!r}")
        self.target, self.costs, self.path, self.heads = target, costs, path, path.heads
        # the features of every row of the target's last decode: EAGLE-3 its tapped layer
        # inputs, EAGLE-1/2 its last hidden states
        self._rows = target.hidden_rows if self.heads.features == "hidden" else target.tapped_rows
        self.max_nodes, self.nodes = max_nodes, nodes
        self.depth, self.top_k = depth, min(top_k, self.heads.vocab_size)
        self.draft_seconds = 0.0  # growing a tree, an EMA
        self._accepted = self._expected = 1.0  # accepted and expected tokens per tree, EMAs
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # (positions, features) not yet run
        self._wait = self._backoff = 0  # plain rounds left without growing; the next wait
        self._last: tuple[np.ndarray, np.ndarray] | None = None     # (logits (V,), pre (h,))
        self._grown: _Grown | None = None

    def prepare(self, tokens: Sequence[int]) -> None:
        """A new prompt, whose rows before the pending token the target just decoded: the
        draft takes the features of the last decode's rows (it sees at most n_batch of the
        prompt's last tokens; the target's verification keeps the output exact anyway)."""
        self.path.reset()
        self._last = None
        positions, features = self._rows()
        fresh = positions.size and positions[-1] == len(tokens) - 2
        self._pending = [(positions.copy(), features.copy())] if fresh else []

    def _catch_up(self, tokens: Sequence[int]) -> None:
        """Run the committed pairs (tokens[P+1], g_P) through the draft."""
        if not self._pending:
            return
        positions = np.concatenate([p for p, _ in self._pending])
        features = np.concatenate([f for _, f in self._pending])
        self._pending = []
        self._last = self.path.commit(np.asarray(tokens)[positions + 1], self.path.fuse(features), positions)

    def _grow(self, tokens: Sequence[int], limit: int) -> _Grown | None:
        """EAGLE-2's dynamic tree of at most `limit` nodes from the last committed row's
        prediction (the draft has caught up). A depth step expands only frontier nodes
        inside the best tree found so far: a node outside it cannot bring children into
        it (a child is never likelier than its parent), so where extra rows are dear (a
        CPU) the steps stay narrow and cheap."""
        if self._last is None:
            return None
        k = self.top_k
        root = len(tokens) - 1  # the pending token's position
        logp, pre = nn.log_softmax(self._last[0])[None], self._last[1][None]
        scores = np.zeros(1)
        all_tok, all_par, all_score = [], [], []
        frontier_ids = np.array([-1])  # index into all_* of each frontier node
        for d in range(self.depth):
            # children: top k of each frontier node, scored by cumulative log-probability
            top, lp = nn.top_k(logp, k)                                  # (f, k)
            cand = (scores[:, None] + lp).ravel()
            base = len(all_tok)
            all_tok += top.ravel().tolist()
            all_par += np.repeat(frontier_ids, k).tolist()
            all_score += cand.tolist()
            if d + 1 == self.depth:
                break
            ranked = np.sort(all_score)[::-1]
            n, _ = self._size(np.exp(ranked), limit, 0.0)  # (growing costs what it costs)
            best = np.argsort(-cand, kind="stable")[:k]                  # next frontier
            best = best[cand[best] >= ranked[n - 1]] if n else best[:0]
            if not best.size:
                break
            parent_of = best // k  # among the frontier (at d = 0: the root alone)
            # (fed as target ids: the draft's token embedding is the target's)
            logits, pre = self.path.expand(self.heads.target_ids(top.ravel()[best]), pre[parent_of], root + d,
                                           parent_of if d else np.full(len(best), -1))
            logp, scores = nn.log_softmax(logits), cand[best]
            frontier_ids = base + best
        self.path.end_tree()
        score = np.asarray(all_score)
        depth_of = np.zeros(len(all_tok), dtype=np.int64)
        for i, p in enumerate(all_par):
            depth_of[i] = 0 if p < 0 else depth_of[p] + 1
        # best first; a child never beats its parent (log-probabilities are <= 0), ties
        # go to the shallower node, so every prefix of this order is a tree
        order = np.lexsort((depth_of, -score))[:self.max_nodes]
        chosen = set(order.tolist())
        order = [i for i in order if all_par[i] < 0 or all_par[i] in chosen]
        place = {int(i): j for j, i in enumerate(order)}
        tok = self.heads.target_ids(np.asarray(all_tok)[order])
        par = np.array([-1 if all_par[i] < 0 else place[all_par[i]] for i in order], dtype=np.int64)
        return _Grown(tok.astype(np.int64), par, np.exp(score[order]))

    def plan(self, budget: int, tokens: Sequence[int]) -> tuple[int, float]:
        """Grow the tree and choose its size (0: none) and its expected committed tokens
        per second."""
        self._grown = None
        ready = self.costs.calibrated and budget >= 1
        if ready and self._wait and not self.nodes:
            self._wait -= 1
            return 0, 0.0
        self._catch_up(tokens)  # (rows that waited: not the tree's cost)
        if not ready:
            return 0, 0.0
        t0 = time.perf_counter()
        grown = self._grow(tokens, min(budget, self.max_nodes))
        self.draft_seconds += EMA * (time.perf_counter() - t0 - self.draft_seconds)
        if grown is None:
            return 0, 0.0
        self._grown = grown
        best, rate = self._size(grown.chances, budget, self.draft_seconds)
        self._backoff = 0 if best else min(max(2 * self._backoff, 1), EXPLORE_EVERY)
        self._wait = self._backoff
        return best, rate

    def _size(self, chances: np.ndarray, limit: int, draft_seconds: float) -> tuple[int, float]:
        """How many of the nodes with these chances (best first) to verify, at most
        `limit` (the fixed size when set), and that tree's expected committed tokens per
        second, its growing costing draft_seconds; each chance is scaled by the measured
        ratio of accepted to expected tokens."""
        m = min(limit, len(chances))
        calibration = self._accepted / self._expected  # how far the chances run over or under
        gain = 1 + np.concatenate([[0.0], np.cumsum(calibration * chances[:m])])
        n = np.arange(m + 1)
        rate = gain / (self.costs.t_verify(n + 1) + np.where(n > 0, draft_seconds, 0.0))
        best = min(self.nodes, m) if self.nodes else int(rate.argmax())
        return best, float(rate[best])

    def propose(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:
        return self.draft(self.plan(budget, tokens)[0])

    def draft(self, n: int) -> Draft:
        """The first n nodes of the tree grown by plan() (0: a plain round)."""
        g = self._grown
        if n == 0 or g is None:
            return Draft([])
        keep = _prefix_tree(g.parents, n)
        return Draft(g.tokens[:n].tolist(), tree=keep, plan=float(g.chances[:n].sum()))

    def state(self) -> dict:
        """The measured tree cost and accepted / expected tokens as plain data, to save
        (ggspec.session); the draft's cache is rebuilt from the target for each prompt."""
        return {"draft_seconds": self.draft_seconds, "accepted": self._accepted, "expected": self._expected}

    def set_state(self, state: dict) -> None:
        """Take what state() gave."""
        self.draft_seconds, self._accepted, self._expected = (float(state[k]) for k in
                                                              ("draft_seconds", "accepted", "expected"))

    def accept(self, draft: Draft, nodes: Sequence[int]) -> None:
        # features of the committed rows of the verification: the pending row and the
        # accepted nodes (any drafter's draft: one row per token after the pending one)
        positions, features = self._rows()
        rows = [0, *(i + 1 for i in nodes)]
        start = positions[0]
        self._pending.append((start + np.arange(len(rows)), features[rows].copy()))
        if isinstance(draft.plan, float):
            self._accepted += EMA * (len(nodes) - self._accepted)
            self._expected += EMA * (draft.plan - self._expected)


def _prefix_tree(parents: np.ndarray, n: int) -> Tree:
    """The tree of the first n nodes of a best-first order (parents come first)."""
    return Tree(tuple(int(p) for p in parents[:n]))
