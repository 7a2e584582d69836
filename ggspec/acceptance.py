"""Verifying draft tokens against the target's logits. Pure numpy.

Chains (with or without a draft distribution q) first, then trees.

A chain d_0..d_{K-1} comes with the target's rows L_0..L_K: row i predicts the position of
d_i, row K the bonus position after a full accept. Each rule returns a Verdict: how many
draft tokens are accepted, and the token the target commits after them. Rows are warped
lazily, only as far as the verification reaches.

Random numbers, so runs replay from a seed: greedy rules draw none; the sampling rules draw
one rng.random() per draft token tested, in order (even where acceptance is certain), then
one for the committed token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ggspec.config import SamplingConfig
from ggspec.sampling import Dist, distribution, draw, pick, prob, softmax
from ggspec.tree import Tree


@dataclass(frozen=True)
class Verdict:
    """n_accepted draft tokens are kept (0..K); token is committed after them."""

    n_accepted: int
    token: int


def accept_greedy(target_logits: np.ndarray, draft: Sequence[int] | np.ndarray) -> Verdict:
    """Keep the longest prefix where the draft equals the target's argmax; commit the next argmax."""
    k = _chain_length(target_logits, draft)
    for n in range(k + 1):  # rows past the first mismatch are not read
        top = int(target_logits[n].argmax())
        if n == k or top != draft[n]:
            return Verdict(n, top)


def accept_speculative(
    target_logits: np.ndarray,
    draft: Sequence[int] | np.ndarray,
    q: np.ndarray,
    cfg: SamplingConfig,
    rng: np.random.Generator,
) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023) for a draft d_i ~ q_i.

    target_logits (k + 1, n_vocab); draft (k,); q (k,) the warped draft distributions.
    The committed tokens are distributed exactly as sampling the target token by token.
    At temperature 0 this is accept_greedy and q is not used.
    """
    k = _chain_length(target_logits, draft)
    if cfg.greedy:
        return accept_greedy(target_logits, draft)
    for i in range(k):
        d = draft[i]
        p = distribution(target_logits[i], cfg)
        if rng.random() * prob(q[i], d) < prob(p, d):  # u < p(d) / q(d): accept w.p. min(1, p(d) / q(d))
            continue  # q(d) <= p(d): always accepted, the draw is still made
        return Verdict(i, pick(*residual(p, q[i]), rng))  # rejected: resample from norm(max(p - q, 0))
    return Verdict(k, draw(target_logits[k], cfg, rng))  # all accepted: bonus from p_k


def residual(p: Dist, q: Dist) -> Dist:
    """max(p - q, 0) over the tokens where it is positive (unnormalised), or p where
    nothing is (p == q)."""
    ids = np.union1d(p[0], q[0])  # (s,) ascending
    w = np.zeros(ids.size)
    w[ids.searchsorted(p[0])] = p[1]
    w[ids.searchsorted(q[0])] -= q[1]
    kept = w > 0
    return (ids[kept], w[kept]) if kept.any() else p


def accept_match(
    target_logits: np.ndarray,
    draft: Sequence[int] | np.ndarray,
    cfg: SamplingConfig,
    rng: np.random.Generator,
) -> Verdict:
    """Sample-and-match for drafts without q (prompt lookup): y_i ~ p_i, accept while y_i == d_i.

    target_logits (k + 1, n_vocab); draft (k,). Exact for any draft: y_i is the target's own sample.
    """
    k = _chain_length(target_logits, draft)
    if cfg.greedy:
        return accept_greedy(target_logits, draft)
    for i in range(k):
        y = draw(target_logits[i], cfg, rng)  # y ~ p_i
        if y != draft[i]:
            return Verdict(i, y)  # mismatch: commit the target's own sample
    return Verdict(k, draw(target_logits[k], cfg, rng))  # all matched: bonus from p_k


def _chain_length(target_logits: np.ndarray, draft: Sequence[int] | np.ndarray) -> int:
    """K, after checking that the target gave one row per draft token plus the bonus row."""
    k = len(draft)
    if target_logits.shape[0] != k + 1:
        raise ValueError(f"need {k + 1} target rows for {k} draft tokens, got {target_logits.shape[0]}")
    return k


@dataclass(frozen=True)
class TreeVerdict:
    """The accepted nodes (a root path of the tree, in order) and the token committed after them."""

    nodes: tuple[int, ...]
    token: int


def accept_tree_greedy(target_logits: np.ndarray, tokens: Sequence[int], tree: Tree) -> TreeVerdict:
    """Follow the child whose token is the target's argmax while there is one.

    target_logits (n + 1, n_vocab): row 0 the pending token, row i + 1 node i."""
    top = target_logits.argmax(axis=-1)  # (n + 1,)
    nodes: list[int] = []
    row = 0
    while (child := _child_with(tree, tokens, row, top[row])) is not None:
        nodes.append(child)
        row = child + 1
    return TreeVerdict(tuple(nodes), int(top[row]))


def accept_tree_match(target_logits: np.ndarray, tokens: Sequence[int], tree: Tree,
                      cfg: SamplingConfig, rng: np.random.Generator) -> TreeVerdict:
    """Exact multi-candidate verification for drafts without q (top-k candidates of heads):
    y ~ p at the current node; move to the child drafting y, else commit y.

    This is SpecInfer's recursive rejection over siblings with one-hot q: trying siblings
    in turn, each accepted with its residual probability, selects child c with probability
    p(c) and otherwise samples p without the siblings -- the same law as y ~ p, with one
    draw per committed token."""
    if cfg.greedy:
        return accept_tree_greedy(target_logits, tokens, tree)
    nodes: list[int] = []
    row = 0
    while True:
        y = draw(target_logits[row], cfg, rng)  # y ~ p at this node
        child = _child_with(tree, tokens, row, y)
        if child is None:
            return TreeVerdict(tuple(nodes), y)
        nodes.append(child)
        row = child + 1


def accept_tree_typical(target_logits: np.ndarray, tokens: Sequence[int], tree: Tree,
                        cfg: SamplingConfig, rng: np.random.Generator,
                        epsilon: float = 0.3, delta: float = 0.09) -> TreeVerdict:
    """Medusa's typical acceptance -- LOSSY: the output no longer follows the target's
    distribution. A child is acceptable when p(x) > min(epsilon, delta * exp(-H(p))) with
    p at temperature cfg.temperature (1 when greedy); the most probable acceptable child
    is followed. The token after the accepted path is sampled from p (argmax when greedy)."""
    temperature = cfg.temperature or 1.0
    nodes: list[int] = []
    row = 0
    while True:
        p = softmax(target_logits[row] / temperature)  # (n_vocab,)
        entropy = -np.sum(p * np.log(np.maximum(p, 1e-30)))
        threshold = min(epsilon, delta * np.exp(-entropy))
        ok = [c for c in tree.children[row] if p[tokens[c]] > threshold]
        if not ok:
            last = target_logits[row]
            token = int(np.argmax(last)) if cfg.greedy else draw(last, cfg, rng)
            return TreeVerdict(tuple(nodes), token)
        child = max(ok, key=lambda c: p[tokens[c]])
        nodes.append(child)
        row = child + 1


def _child_with(tree: Tree, tokens: Sequence[int], row: int, token: int) -> int | None:
    return next((c for c in tree.children[row] if tokens[c] == token), None)
