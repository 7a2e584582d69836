"""Chain verification rules: edge cases, and exactness of the committed tokens' distribution."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from ggspec.acceptance import Verdict, accept_greedy, accept_match, accept_speculative
from ggspec.config import SamplingConfig
from reference import sample, sparse, warp

V = 6
PLAIN = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # warp is the softmax
GREEDY = SamplingConfig(temperature=0.0)


class CountingRng:
    """np.random.Generator stand-in that counts its draws."""

    def __init__(self, seed=0):
        self.real = np.random.default_rng(seed)
        self.calls = 0

    def random(self) -> float:
        self.calls += 1
        return self.real.random()


def logits_of(*probs: float) -> np.ndarray:
    """A logits row whose softmax is probs (0 -> -inf)."""
    with np.errstate(divide="ignore"):
        return np.log(np.array(probs)).astype(np.float32)


def hand_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """exp(l / T) / sum in plain Python floats; -inf gives 0."""
    weights = [0.0 if x == -math.inf else math.exp(x / temperature) for x in logits.tolist()]
    return np.array(weights) / sum(weights)


def within_6_sigma(counts: np.ndarray, expected: np.ndarray) -> bool:
    n = counts.sum()
    return bool(np.all(np.abs(counts / n - expected) <= 6 * np.sqrt(expected * (1 - expected) / n)))


def test_verdict_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Verdict(1, 2).token = 3


@pytest.mark.parametrize(
    ("draft", "expected"),
    [([3, 1, 4], Verdict(3, 5)), ([3, 1, 0], Verdict(2, 4)), ([2, 1, 4], Verdict(0, 3)), ([], Verdict(0, 3))],
)
def test_accept_greedy_keeps_the_prefix_matching_argmax(draft, expected):
    rows = 5 * np.eye(V, dtype=np.float32)[[3, 1, 4, 5][: len(draft) + 1]]  # argmax 3, 1, 4, 5
    assert accept_greedy(rows, np.array(draft, dtype=np.int64)) == expected


def test_draft_may_be_a_list():
    rows = 5 * np.eye(V, dtype=np.float32)[[3, 1, 4]]
    q = np.eye(V)[[3, 1]]
    assert accept_greedy(rows, [3, 2]) == Verdict(1, 1)
    assert accept_speculative(rows, [3, 1], sparse(q), GREEDY, np.random.default_rng(0)) == Verdict(2, 4)
    assert accept_speculative(rows[:1], [], sparse(np.zeros((0, V))), PLAIN, np.random.default_rng(0)).n_accepted == 0
    assert accept_match(rows, [3, 1], SamplingConfig(temperature=0.01), np.random.default_rng(0)) == Verdict(2, 4)


@pytest.mark.parametrize("rule", ["speculative", "match"])
def test_greedy_config_reduces_to_accept_greedy_and_draws_nothing(rule):
    rng = np.random.default_rng(0)
    for _ in range(100):
        k = int(rng.integers(0, 5))
        rows = rng.normal(size=(k + 1, V)).astype(np.float32)
        draft = np.where(rng.random(k) < 0.7, rows[:k].argmax(axis=1), rng.integers(0, V, k))
        q = np.eye(V)[draft]  # a greedy draft's q is one-hot
        counting = CountingRng()
        if rule == "speculative":
            verdict = accept_speculative(rows, draft, sparse(q), GREEDY, counting)
        else:
            verdict = accept_match(rows, draft, GREEDY, counting)
        assert verdict == accept_greedy(rows, draft)
        assert counting.calls == 0


def test_p_equal_to_q_always_accepts_and_draws_once_per_token():
    rng = np.random.default_rng(1)
    cfg = SamplingConfig(temperature=0.7, top_k=4, top_p=0.9, min_p=0.05)
    for k in range(5):
        rows = rng.normal(scale=2.0, size=(k + 1, V)).astype(np.float32)
        q = np.array([warp(row, cfg) for row in rows[:k]]).reshape(k, V)  # (k, V)
        draft = np.array([sample(q_i, rng) for q_i in q], dtype=np.int64)
        counting = CountingRng(k)
        verdict = accept_speculative(rows, draft, sparse(q), cfg, counting)
        assert verdict.n_accepted == k
        assert warp(rows[k], cfg)[verdict.token] > 0
        assert counting.calls == k + 1


def dense_speculative(rows, draft, q, cfg, rng) -> Verdict:
    """Speculative sampling on dense vectors (n_vocab,), written out as in the papers."""
    for i, d in enumerate(draft):
        p = warp(rows[i], cfg)
        if rng.random() * q[i, d] < p[d]:
            continue
        r = np.maximum(p - q[i], 0.0)
        return Verdict(i, sample(r if r.any() else p, rng))
    return Verdict(len(draft), sample(warp(rows[len(draft)], cfg), rng))


@pytest.mark.parametrize("n_vocab", [6, 300, 151_936])
def test_speculative_sampling_on_the_kept_tokens_equals_the_dense_rule_draw_for_draw(n_vocab):
    rng = np.random.default_rng(n_vocab)
    configs = [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, min_p=0.0),
               SamplingConfig(temperature=1.3, top_k=0, top_p=1.0, min_p=0.05)]
    for trial in range(40 if n_vocab < 1000 else 8):
        cfg = configs[trial % len(configs)]
        k = int(rng.integers(1, 5))
        rows = rng.normal(scale=2.0, size=(k + 1, n_vocab)).astype(np.float32)
        near = rows[:k] + rng.normal(scale=0.5, size=(k, n_vocab)).astype(np.float32)  # a draft close to p
        q = np.array([warp(row, cfg) for row in near])  # (k, n_vocab)
        draft = [sample(q_i, rng) for q_i in q]
        if trial % 4 == 3:
            q[0] = warp(rows[0], cfg)  # p == q at the first token
        a, b = np.random.default_rng(trial), np.random.default_rng(trial)
        assert accept_speculative(rows, draft, sparse(q), cfg, a) == dense_speculative(rows, draft, q, cfg, b)
        assert a.random() == b.random()  # the same number of draws


def test_q_zero_where_p_positive_gets_the_residual_mass():
    rows = np.stack([logits_of(0.5, 0.5, 0.0), logits_of(0.0, 0.0, 1.0)])  # (2, 3)
    q = np.array([[0.0, 1.0, 0.0]])  # (1, 3): the draft never proposes token 0
    draft = np.array([1])
    rng = np.random.default_rng(2)
    verdicts = [accept_speculative(rows, draft, sparse(q), PLAIN, rng) for _ in range(2000)]
    # accept 1 with p / q = 0.5; on rejection norm(max(p - q, 0)) is the one-hot at 0
    assert set(verdicts) == {Verdict(1, 2), Verdict(0, 0)}
    rejected = sum(v.n_accepted == 0 for v in verdicts)
    assert abs(rejected / 2000 - 0.5) <= 6 * math.sqrt(0.25 / 2000)


def test_draft_token_outside_p_is_always_rejected():
    rows = np.stack([logits_of(0.25, 0.75, 0.0), logits_of(1.0, 0.0, 0.0)])
    q = np.array([[0.0, 0.0, 1.0]])
    rng = np.random.default_rng(3)
    tokens = [accept_speculative(rows, np.array([2]), sparse(q), PLAIN, rng) for _ in range(2000)]
    assert {v.n_accepted for v in tokens} == {0}
    assert within_6_sigma(np.bincount([v.token for v in tokens], minlength=3), np.array([0.25, 0.75, 0.0]))


@pytest.mark.parametrize(("p_token", "q_token", "expected"), [(1, 1, Verdict(1, 0)), (2, 1, Verdict(0, 2))])
def test_one_hot_p_and_q(p_token, q_token, expected):
    rows = np.full((2, 3), -np.inf, dtype=np.float32)
    rows[0, p_token] = rows[1, 0] = 0.0
    q = np.eye(3)[[q_token]]  # (1, 3)
    counting = CountingRng()
    assert accept_speculative(rows, np.array([q_token]), sparse(q), PLAIN, counting) == expected
    assert counting.calls == 2


@pytest.mark.parametrize("rule", ["speculative", "match"])
def test_empty_draft_samples_from_the_first_row(rule):
    rows = logits_of(0.0, 0.3, 0.7)[None, :]  # (1, 3)
    rng = np.random.default_rng(4)
    draft = np.zeros(0, dtype=np.int64)
    verdicts = [
        accept_speculative(rows, draft, sparse(np.zeros((0, 3))), PLAIN, rng) if rule == "speculative"
        else accept_match(rows, draft, PLAIN, rng)
        for _ in range(2000)
    ]
    assert {v.n_accepted for v in verdicts} == {0}
    assert within_6_sigma(np.bincount([v.token for v in verdicts], minlength=3), np.array([0.0, 0.3, 0.7]))


def test_accept_match_commits_the_targets_own_sample():
    rows = np.stack([logits_of(0.0, 1.0, 0.0), logits_of(0.0, 0.0, 1.0), logits_of(1.0, 0.0, 0.0)])
    assert accept_match(rows, np.array([1, 2]), PLAIN, np.random.default_rng(0)) == Verdict(2, 0)
    assert accept_match(rows, np.array([1, 0]), PLAIN, np.random.default_rng(0)) == Verdict(1, 2)


def test_same_seed_same_verdicts():
    rows = np.random.default_rng(5).normal(size=(4, V)).astype(np.float32)
    q = np.full((3, V), 1 / V)
    runs = [
        [accept_speculative(rows, np.array([0, 1, 2]), sparse(q), PLAIN, rng) for _ in range(50)]
        for rng in (np.random.default_rng(9), np.random.default_rng(9))
    ]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("rule", ["speculative", "match"])
def test_row_count_must_be_draft_length_plus_one(rule):
    rows, draft = np.zeros((2, V), dtype=np.float32), np.array([0, 1])
    with pytest.raises(ValueError, match="3 target rows"):
        if rule == "speculative":
            accept_speculative(rows, draft, sparse(np.full((2, V), 1 / V)), PLAIN, np.random.default_rng(0))
        else:
            accept_match(rows, draft, PLAIN, np.random.default_rng(0))


class ToyPair:
    """A target and a draft over V tokens whose logits depend on the whole prefix.

    Each has a token at -inf per row, so q = 0 where p > 0 and p = 0 where q > 0 both occur.
    """

    def __init__(self, seed: int, temperature: float):
        self.seed, self.temperature = seed, temperature
        self.rows: dict[tuple, np.ndarray] = {}
        self.dists: dict[tuple, np.ndarray] = {}
        self.cdfs: dict[tuple, np.ndarray] = {}

    def logits(self, who: int, prefix: tuple) -> np.ndarray:
        """0 is the target, 1 the draft."""
        key = (who, prefix)
        if key not in self.rows:
            rng = np.random.default_rng([self.seed, who, len(prefix), *prefix])
            row = rng.normal(scale=1.5, size=V).astype(np.float32)
            row[rng.integers(V)] = -np.inf
            self.rows[key] = row
        return self.rows[key]

    def dist(self, who: int, prefix: tuple) -> np.ndarray:
        """The warped distribution, computed by hand."""
        key = (who, prefix)
        if key not in self.dists:
            self.dists[key] = hand_softmax(self.logits(who, prefix), self.temperature)
        return self.dists[key]

    def draft_token(self, prefix: tuple, rng: np.random.Generator) -> int:
        """d ~ q(. | prefix) by inverse CDF."""
        if prefix not in self.cdfs:
            self.cdfs[prefix] = np.cumsum(self.dist(1, prefix))
        cdf = self.cdfs[prefix]
        return int(cdf.searchsorted(rng.random() * cdf[-1], side="right"))


def generate(pair: ToyPair, k: int, rule: str, cfg: SamplingConfig, n_tokens: int, rng) -> list[int]:
    """Speculative rounds of k draft tokens until n_tokens are committed.

    The speculative rule drafts d ~ q; the match rule drafts deterministically, as prompt
    lookup does (here the draft's argmax).
    """
    out: tuple[int, ...] = ()
    while len(out) < n_tokens:
        prefixes = [out]  # prefixes[i]: what row i of the target has seen
        for _ in range(k):
            prefix = prefixes[-1]
            if rule == "speculative":
                prefixes.append(prefix + (pair.draft_token(prefix, rng),))
            else:
                prefixes.append(prefix + (int(np.argmax(pair.dist(1, prefix))),))
        draft = np.array(prefixes[-1][len(out):], dtype=np.int64)  # (k,)
        rows = np.array([pair.logits(0, prefix) for prefix in prefixes])  # (k + 1, V)
        if rule == "speculative":
            q = np.array([pair.dist(1, prefix) for prefix in prefixes[:-1]]).reshape(k, V)
            verdict = accept_speculative(rows, draft, sparse(q), cfg, rng)
        else:
            verdict = accept_match(rows, draft, cfg, rng)
        out = prefixes[verdict.n_accepted] + (verdict.token,)
    return list(out[:n_tokens])


@pytest.mark.parametrize("rule", ["speculative", "match"])
def test_committed_tokens_are_distributed_as_the_target(rule):
    """Speculation must not change the distribution: the first two committed tokens ~ p.

    The target's and the draft's rows depend on the whole prefix, so a rule that reads the
    wrong row fails too. Trials cycle through K = 1, 2, 3; the exact law is p(x0) p(x1 | x0).
    """
    temperature, trials = 0.9, 20_000
    cfg = SamplingConfig(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0)
    pair = ToyPair(seed=7, temperature=temperature)
    rng = np.random.default_rng(11)
    pairs = np.array([generate(pair, 1 + t % 3, rule, cfg, 2, rng) for t in range(trials)])  # (trials, 2)
    p0 = pair.dist(0, ())
    joint = np.array([p0[x] * pair.dist(0, (x,)) for x in range(V)])  # (V, V)
    assert within_6_sigma(np.bincount(pairs[:, 0], minlength=V), p0)
    assert within_6_sigma(np.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V), joint.ravel())
