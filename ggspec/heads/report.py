"""Stage 3 of head training: held-out accuracy, measured tree acceptance, the report.

Accuracy on held-out files is reported over all rows ("top1", "top5") and over rows where
the corpus follows the target's greedy chain up to the label ("chain_top1": the rate at
which greedy speculation would accept the head's first guess, given the earlier heads were
right).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tree import grown_choices
from .collect import HiddenStates
from .medusa import TOP_K, MedusaHeads
from .nn import softmax_xent

@dataclass(frozen=True)
class HeadAccuracy:
    """Held-out accuracy of one head (its label is token t+head+2)."""

    head: int
    top1: float
    top5: float
    chain_top1: float  # on rows where the corpus follows the target's greedy chain
    loss: float        # mean cross-entropy over rows whose label is in the vocabulary
    n: int


@dataclass(frozen=True)
class TrainReport:
    path: Path
    n_train: int
    n_heldout: int
    vocab_coverage: float  # share of held-out labels inside the reduced vocabulary
    before: list[HeadAccuracy]
    after: list[HeadAccuracy]
    trees: dict[int, float]  # tree nodes -> mean accepted drafts per round (tree_acceptance)
    steps: int
    seconds: float


@dataclass
class Split:
    rows: np.ndarray    # (n,) row indices into the hidden states
    labels: np.ndarray  # (n, n_heads) target ids to learn, -1 where outside the window
    greedy: np.ndarray  # (n, n_heads) the target's greedy continuation where the corpus
                        # follows it from the row up to the label, else -1




def to_rows(labels: np.ndarray, token_ids: np.ndarray | None, n_vocab: int) -> np.ndarray:
    """Target ids -> output rows (-1: no label, or outside the reduced vocabulary)."""
    if token_ids is None:
        return labels
    index = np.full(n_vocab, -1, dtype=np.int64)
    index[token_ids] = np.arange(len(token_ids))
    return np.where(labels >= 0, index[np.maximum(labels, 0)], -1)


def evaluate(heads: MedusaHeads, data: HiddenStates, split: Split,
             batch_size: int = 512) -> list[HeadAccuracy]:
    """Per-head top-1 / top-5 accuracy and loss of `heads` on the rows of `split`."""
    nh, n_vocab = heads.n_heads, data.target.n_vocab
    y = to_rows(split.labels, heads.token_ids, n_vocab)
    g = to_rows(split.greedy, heads.token_ids, n_vocab)
    hit1, hit5, chain_hit = np.zeros(nh), np.zeros(nh), np.zeros(nh)
    loss, n_loss = np.zeros(nh), np.zeros(nh)
    for s in range(0, len(split.rows), batch_size):
        x = np.asarray(data.hidden[split.rows[s:s + batch_size]], dtype=np.float32)
        yb, gb = y[s:s + batch_size], g[s:s + batch_size]
        z = heads.logits(x)                                              # (B, nh, V)
        k = min(5, z.shape[2])
        top5 = np.argpartition(z, -k, axis=2)[:, :, -k:]
        top1 = z.argmax(axis=2)
        hit1 += ((top1 == yb) & (yb >= 0)).sum(axis=0)
        hit5 += ((top5 == yb[:, :, None]).any(axis=2) & (yb >= 0)).sum(axis=0)
        chain_hit += ((top1 == gb) & (gb >= 0)).sum(axis=0)
        loss += softmax_xent(z, yb, grad=False)[0].sum(axis=0)
        n_loss += (yb >= 0).sum(axis=0)
    n = (split.labels >= 0).sum(axis=0)          # labels outside the vocabulary are misses
    n_chain = (split.greedy >= 0).sum(axis=0)
    return [HeadAccuracy(h, float(hit1[h] / max(n[h], 1)), float(hit5[h] / max(n[h], 1)),
                         float(chain_hit[h] / max(n_chain[h], 1)),
                         float(loss[h] / max(n_loss[h], 1)), int(n[h])) for h in range(nh)]


TREE_SIZES = (1, 4, 8, 16, 32)


def tree_acceptance(heads: MedusaHeads, data: HiddenStates, split: Split,
                    sizes: Sequence[int] = TREE_SIZES, top_k: int = TOP_K,
                    batch_size: int = 512) -> tuple[np.ndarray, dict[int, float]]:
    """The per-(head, rank) acceptance (n_heads, top_k) measured on the rows of `split`
    whose continuation follows the target's greedy chain (there the tree's root is the
    target's own next token, as when generating), and, for a tree of each size grown from
    it, the mean draft tokens greedy verification would accept per round on those rows."""
    nh, k = heads.n_heads, min(top_k, heads.vocab_size)
    rows = np.flatnonzero(split.greedy[:, 0] >= 0)
    ranks = np.full((len(rows), nh), k, dtype=np.int64)  # k: not among the top k
    for s in range(0, len(rows), batch_size):
        b = rows[s:s + batch_size]
        z = heads.logits(np.asarray(data.hidden[split.rows[b]], dtype=np.float32))  # (B, nh, V)
        top = np.argsort(-z, axis=2)[:, :, :k]
        ids = top if heads.token_ids is None else heads.token_ids[top]
        hit = ids == split.greedy[b][:, :, None]                                    # (B, nh, k)
        ranks[s:s + len(b)] = np.where(hit.any(axis=2), hit.argmax(axis=2), k)
    acceptance = np.zeros((nh, k))
    reached = np.ones(len(rows), dtype=bool)  # every earlier head's label is in its top k
    for d in range(nh):
        if reached.any():
            acceptance[d] = np.bincount(ranks[reached, d], minlength=k + 1)[:k] / reached.sum()
        reached &= ranks[:, d] < k
    out = {}
    for n in sizes:
        tree = set(grown_choices(acceptance, n)[0])
        accepted = np.zeros(len(rows))
        for d in range(1, nh + 1):
            accepted += [tuple(r) in tree for r in ranks[:, :d].tolist()]
        out[n] = float(accepted.mean()) if len(rows) else 0.0
    return acceptance, out




def _summary(report: TrainReport | EagleReport, vocabulary: str) -> str:
    return (f"wrote {report.path}: {report.steps} steps in {report.seconds:.0f} s, "
            f"{report.n_train:,} training rows, {report.n_heldout:,} held-out rows, "
            f"{vocabulary} covers {report.vocab_coverage:.1%} of held-out labels")


def format_report(report: TrainReport) -> str:
    """The report as a few lines of text."""
    lines = [_summary(report, "vocabulary"), "head  top-1 (start)  top-5 (start)  chain top-1  loss (start)"]
    for a, b in zip(report.before, report.after):
        lines.append(f"{b.head:>4}  {b.top1:6.1%} ({a.top1:5.1%})  {b.top5:6.1%} ({a.top5:5.1%})"
                     f"  {b.chain_top1:10.1%}  {b.loss:5.2f} ({a.loss:5.2f})")
    lines.append("greedy trees on held-out rows: " + ", ".join(
        f"{n} nodes -> {1 + a:.2f} tokens/round" for n, a in report.trees.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# EAGLE-3 drafts: accuracy per draft step and simulated chains
# ---------------------------------------------------------------------------------------

CHAIN_DEPTHS = (3, 4, 5)


@dataclass(frozen=True)
class StepAccuracy:
    """Held-out accuracy of the draft's step k (k = 1: g from the target's features; k > 1:
    g is the draft's own output of step k - 1), whose label is the target's greedy token
    k + 1 positions after the row."""

    step: int
    top1: float
    chain_top1: float  # on rows where steps 1..k-1 were right: P(step k right | earlier right)
    loss: float        # mean cross-entropy over rows whose label is in the draft vocabulary
    n: int


@dataclass(frozen=True)
class EagleReport:
    path: Path
    n_train: int
    n_heldout: int
    vocab_coverage: float  # share of held-out labels inside the draft vocabulary
    before: list[StepAccuracy]
    after: list[StepAccuracy]
    chains: dict[int, float]  # chain depth -> simulated mean committed tokens per round
    steps: int
    seconds: float
    flops_per_row: float  # of one training pass (forward and backward) over one row


def chain_tokens(chain_top1: Sequence[float], depths: Sequence[int] = CHAIN_DEPTHS) -> dict[int, float]:
    """Mean committed tokens per greedy round with a draft chain of depth D, from the
    conditional per-step accuracies a_k: E = 1 + sum_{d=1..D} prod_{k=1..d} a_k (the bonus
    token, plus draft token d whenever steps 1..d are all right); a_k for k beyond the
    measured steps is the last one's."""
    a = np.asarray(chain_top1, dtype=np.float64)
    out = {}
    for depth in depths:
        ak = np.concatenate([a, np.full(max(depth - len(a), 0), a[-1])])[:depth]
        out[depth] = float(1 + np.cumprod(ak).sum())
    return out


def format_eagle_report(report: EagleReport) -> str:
    """The report as a few lines of text."""
    lines = [_summary(report, "draft vocabulary")
             + f", {report.flops_per_row / 1e9:.3g} GFLOP per row per pass",
             "step  top-1 (start)  chain top-1  loss (start)"]
    for a, b in zip(report.before, report.after):
        lines.append(f"{b.step:>4}  {b.top1:6.1%} ({a.top1:5.1%})  {b.chain_top1:10.1%}"
                     f"  {b.loss:5.2f} ({a.loss:5.2f})")
    lines.append("greedy chains on held-out rows: " + ", ".join(
        f"depth {d} -> {t:.2f} tokens/round" for d, t in report.chains.items()))
    return "\n".join(lines)
