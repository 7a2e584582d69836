"""Turning one row of logits into a distribution, and drawing tokens from it. Pure numpy.

`distribution` follows llama.cpp's default sampler chain: top-k, then top-p and min-p on the
temperature-1 softmax of the survivors, then temperature. It treats every non-finite logit
(-inf from a grammar or logit bias, NaN or +inf from a broken model) as excluded.
"""

from __future__ import annotations

import functools

import numpy as np

from ggspec.config import SamplingConfig


GROUPS = 16  # _top_k reads the maxima of this many interleaved groups of ids first
Dist = tuple[np.ndarray, np.ndarray]  # a distribution: ids of positive probability, ascending, and those probabilities


def greedy(logits: np.ndarray) -> int:
    """The most likely token; ties go to the lowest id."""
    return int(logits.argmax())


# softmax_max leaves out logits more than this below the largest: each weighs under
# e^-20 = 2.1e-9 of the largest's term, so for a vocabulary of 152k all of them together
# under 3.2e-4 of the sum. Only a few hundred to a few thousand logits of a real row are
# nearer, so the exponentials are of those alone: a third of the time of all of them.
SOFTMAX_CUT = 20.0


def softmax_max(logits: np.ndarray) -> float:
    """Probability of the most likely token under the plain softmax (temperature 1, no
    truncation), to within SOFTMAX_CUT's bound: 1 / sum of exp(l - max) over the logits
    within SOFTMAX_CUT of the largest."""
    top = logits.max()
    total = np.exp(np.compress(logits > top - SOFTMAX_CUT, logits) - top).sum(dtype=np.float64)
    return float(1.0 / total) if total > 0 else 0.0  # (a row with NaN or +inf: no confidence)


def distribution(logits: np.ndarray, cfg: SamplingConfig) -> Dist:
    """One row of logits (n_vocab,) -> the warped distribution: the ids of positive
    probability, in ascending order, and their probabilities (float64, summing to 1).
    Temperature 0 gives the argmax alone. At least one token is always kept."""
    if cfg.greedy:
        return np.array([greedy(logits)]), np.ones(1)
    ids = _top_k(logits, cfg.top_k)  # (k,) ascending candidate ids
    cand = logits[ids].astype(np.float64)  # (k,)
    cand[~np.isfinite(cand)] = -np.inf
    probs = softmax(_top_p_min_p(cand, cfg.top_p, cfg.min_p) / cfg.temperature)  # p ∝ exp(l / T) over the kept
    kept = probs > 0
    return ids[kept], probs[kept]


def draw(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """A token drawn from the warped distribution of `logits`, with one rng.random()."""
    return pick(*distribution(logits, cfg), rng)


def pick(ids: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse CDF over positive weights (s,) of ascending ids (s,), with one rng.random();
    the weights need not be normalised."""
    cdf = weights.cumsum()  # (s,) strictly increasing
    i = cdf.searchsorted(rng.random() * cdf[-1], side="right")
    return int(ids[min(i, ids.size - 1)])  # u * total rounds up to total if subnormal


def prob(dist: Dist, token: int) -> float:
    """The probability of `token` under `dist` (0 outside its ids)."""
    ids, p = dist
    i = int(ids.searchsorted(token))
    return float(p[i]) if i < ids.size and ids[i] == token else 0.0


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, ascending; every id when k is 0 or >= n_vocab.

    The ids are cut into GROUPS interleaved groups (j, j + w, j + 2w, ...), whose maxima
    one vectorised pass finds. The k largest logits lie in the k groups with the largest
    maxima and the few ids past GROUPS * w: each of those k groups holds a logit at least as
    large as any in a group outside them. So the last pass compares k * GROUPS logits. (NaN
    counts as the largest, in the maxima and the comparison alike, as in numpy's order.)"""
    n_vocab = logits.shape[-1]
    if k == 0 or k >= n_vocab:
        return np.arange(n_vocab)
    w = n_vocab // GROUPS
    if w <= k:  # a small vocabulary: compare them all
        cand = np.arange(n_vocab)
    else:
        maxima = logits[:GROUPS * w].reshape(GROUPS, w).max(axis=0)  # (w,)
        cand = (maxima.argpartition(-k)[-k:] + _group_offsets(w)).ravel()  # (GROUPS * k,)
        if n_vocab > GROUPS * w:
            cand = np.concatenate([cand, np.arange(GROUPS * w, n_vocab)])
    ids = cand[logits[cand].argpartition(-k)[-k:]]
    ids.sort()  # (in place: np.sort adds a copy and Python calls)
    return ids


@functools.cache
def _group_offsets(w: int) -> np.ndarray:
    """(GROUPS, 1): r * w for each row r of _top_k's (GROUPS, w) view of the ids, so
    that column j plus these are the ids of group j."""
    return (w * np.arange(GROUPS))[:, None]


def _top_p_min_p(logits: np.ndarray, top_p: float, min_p: float) -> np.ndarray:
    """Set to -inf the logits that top-p or min-p drop, both judged on the softmax at T = 1."""
    if top_p == 1.0 and min_p == 0.0:
        return logits
    p = softmax(logits)
    keep = p >= min_p * p.max()  # min-p: at least min_p times the most likely (which stays)
    if top_p < 1.0:  # both keep a prefix of the sorted order: sort only the min-p survivors
        survivors = keep.nonzero()[0]
        order = survivors[(-p[survivors]).argsort(kind="stable")]
        n_keep = p[order].cumsum().searchsorted(top_p) + 1  # smallest prefix with mass >= top_p
        keep[order[n_keep:]] = False
    return np.where(keep, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    """exp(l - max) / sum; -inf entries get probability 0."""
    top = logits.max()
    if top == -np.inf:
        raise ValueError("no finite logit to sample from")
    e = np.exp(logits - top)
    return e / e.sum()
