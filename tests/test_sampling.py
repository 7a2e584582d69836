"""The warped distribution, drawing from it, and greedy, against hand-computed references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ggspec.config import SamplingConfig
from ggspec.sampling import GROUPS, _top_k, distribution, draw, greedy, pick, prob, softmax_max
from reference import sample, warp

PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # warp is the softmax


def cfg(**overrides) -> SamplingConfig:
    return SamplingConfig(**{**PLAIN, **overrides})


def support(probs: np.ndarray) -> set[int]:
    return set(np.flatnonzero(probs).tolist())


def hand_softmax(logits, temperature=1.0, keep=None) -> np.ndarray:
    """exp(l / T) / sum over the kept ids, in plain Python floats."""
    keep = range(len(logits)) if keep is None else keep
    weights = {i: math.exp(logits[i] / temperature) for i in keep}
    total = sum(weights.values())
    return np.array([weights.get(i, 0.0) / total for i in range(len(logits))])


def log_probs(*probs: float) -> np.ndarray:
    return np.log(np.array(probs)).astype(np.float32)


class CountingRng:
    """A Generator stand-in that returns fixed draws (or real ones) and counts them."""

    def __init__(self, draws=None, seed=0):
        self.draws = None if draws is None else list(draws)
        self.real = np.random.default_rng(seed)
        self.calls = 0

    def random(self) -> float:
        self.calls += 1
        return self.draws.pop(0) if self.draws is not None else self.real.random()


def test_greedy_is_argmax_with_ties_to_lowest_id():
    assert greedy(np.array([0.1, 3.0, -1.0, 3.0], dtype=np.float32)) == 1
    assert greedy(np.array([-np.inf, -2.0, -np.inf], dtype=np.float32)) == 1


def test_softmax_max_is_the_top_probability():
    logits = np.array([0.5, 2.0, -np.inf, -1.0], dtype=np.float32)
    assert softmax_max(logits) == pytest.approx(max(hand_softmax([0.5, 2.0, -1.0])), rel=1e-6)


def test_softmax_max_of_a_large_vocabulary_is_within_the_cuts_bound():
    """Logits more than SOFTMAX_CUT below the largest are left out: at most 3.2e-4 of the
    sum for 152k of them (here, most of a row shaped like a real one's)."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(151_936) * 6).astype(np.float32)
    logits[7] = 33.0  # 2,000-odd logits within 20 of it, the rest further
    exact = 1 / np.exp(logits.astype(np.float64) - 33.0).sum()
    assert exact * (1 - 1e-6) <= softmax_max(logits) <= exact * (1 + 3.2e-4)  # (exponentials in float32)
    logits[8:108] = 33.0 - 5  # near: counted (0.59; left out, it would stay 0.99)
    assert softmax_max(logits) == pytest.approx(1 / np.exp(logits.astype(np.float64) - 33.0).sum(), rel=3.2e-4)


def test_softmax_max_of_a_broken_row_is_no_confidence():
    assert softmax_max(np.array([1.0, np.nan, 0.5], dtype=np.float32)) == 0.0
    assert softmax_max(np.array([1.0, np.inf, 0.5], dtype=np.float32)) == 0.0


def test_temperature_zero_is_one_hot_at_argmax():
    logits = np.array([0.5, 2.0, 2.0, -1.0], dtype=np.float32)
    probs = warp(logits, SamplingConfig(temperature=0.0))
    assert probs.dtype == np.float64
    np.testing.assert_array_equal(probs, [0.0, 1.0, 0.0, 0.0])


def test_plain_config_is_the_softmax():
    logits = np.random.default_rng(1).normal(size=50).astype(np.float32)
    np.testing.assert_allclose(warp(logits, cfg()), hand_softmax(logits.tolist()), rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.3, 0.8, 1.7])
def test_temperature_scales_the_kept_logits(temperature):
    logits = [1.5, -0.5, 0.25, 3.0, 0.0]
    probs = warp(np.array(logits, dtype=np.float32), cfg(temperature=temperature))
    np.testing.assert_allclose(probs, hand_softmax(logits, temperature), rtol=1e-6)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 7, 39])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits = np.random.default_rng(k).permutation(40).astype(np.float32) / 4
    probs = warp(logits, cfg(top_k=k))
    kept = sorted(np.argsort(logits)[-k:].tolist())
    assert support(probs) == set(kept)
    np.testing.assert_allclose(probs, hand_softmax(logits.tolist(), keep=kept), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 40, 333, 4999])
@pytest.mark.parametrize("layout", ["shuffled", "ascending", "on_stride", "one_group", "in_the_tail"])
def test_top_k_selects_exactly_on_larger_vocabularies(k, layout):
    n = 5000
    values = np.random.default_rng(k).permutation(n).astype(np.float32)
    w = n // GROUPS
    if layout == "ascending":
        values = np.sort(values)
    elif layout == "on_stride":  # the largest logits sit on every 16th id
        values = np.where(np.arange(n) % 16 == 0, values + n, values)
    elif layout == "one_group":  # the largest logits share two of _top_k's groups
        values = np.where(np.arange(n) % w < 2, values + n, values)
    elif layout == "in_the_tail":  # or lie past its groups
        values = np.where(np.arange(n) >= GROUPS * w, values + n, values)
    probs = warp(values / 100, cfg(top_k=k))
    assert support(probs) == set(np.argsort(values)[-k:].tolist())


@pytest.mark.parametrize("k", [0, 40, 1000])
def test_top_k_zero_or_at_least_n_vocab_keeps_all(k):
    logits = np.random.default_rng(3).normal(size=40).astype(np.float32)
    assert len(support(warp(logits, cfg(top_k=k)))) == 40


@pytest.mark.parametrize(
    ("top_p", "n_kept"),
    [(0.01, 1), (0.49, 1), (0.51, 2), (0.79, 2), (0.81, 3), (0.94, 3), (0.96, 4), (0.995, 5), (1.0, 5)],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, n_kept):
    logits = log_probs(0.15, 0.5, 0.01, 0.3, 0.04)  # sorted: 0.5 0.3 0.15 0.04 0.01
    probs = warp(logits, cfg(top_p=top_p))
    assert support(probs) == set([1, 3, 0, 4, 2][:n_kept])


def test_top_p_matches_a_reference_on_random_rows():
    rng = np.random.default_rng(5)
    for _ in range(50):
        logits = rng.normal(scale=2.0, size=30).astype(np.float32)
        top_p = rng.uniform(0.05, 0.99)
        p = hand_softmax(logits.tolist())
        order = sorted(range(30), key=lambda i: -p[i])
        mass, kept = 0.0, []
        for i in order:
            kept.append(i)
            mass += p[i]
            if mass >= top_p:
                break
        probs = warp(logits, cfg(top_p=top_p, temperature=0.6))
        assert support(probs) == set(kept)
        np.testing.assert_allclose(probs, hand_softmax(logits.tolist(), 0.6, kept), rtol=1e-6)


def test_top_p_and_min_p_together_keep_the_intersection():
    rng = np.random.default_rng(6)
    for _ in range(50):
        logits = rng.normal(scale=2.0, size=300).astype(np.float32)
        top_p, min_p = rng.uniform(0.3, 0.99), rng.uniform(0.0, 0.2)
        p = hand_softmax(logits.tolist())
        by_p = np.argsort(-p, kind="stable")
        n_top_p = int(np.argmax(np.cumsum(p[by_p]) >= top_p)) + 1
        kept = set(by_p[:n_top_p].tolist()) & set(np.flatnonzero(p >= min_p * p.max()).tolist())
        assert support(warp(logits, cfg(top_p=top_p, min_p=min_p))) == kept


def test_top_p_and_min_p_are_judged_at_temperature_one():
    logits = log_probs(0.5, 0.3, 0.15, 0.04, 0.01)
    for temperature in (0.2, 1.0, 3.0):
        assert support(warp(logits, cfg(top_p=0.7, temperature=temperature))) == {0, 1}
        assert support(warp(logits, cfg(min_p=0.25, temperature=temperature))) == {0, 1, 2}


def test_top_p_applies_to_the_top_k_survivors():
    logits = log_probs(0.4, 0.3, 0.2, 0.1)  # survivors of top-2 renormalise to 0.57, 0.43
    assert support(warp(logits, cfg(top_p=0.5))) == {0, 1}
    assert support(warp(logits, cfg(top_k=2, top_p=0.5))) == {0}


@pytest.mark.parametrize(("min_p", "n_kept"), [(0.05, 5), (0.07, 4), (0.15, 3), (0.3, 2), (0.9, 1)])
def test_min_p_threshold_is_relative_to_the_max(min_p, n_kept):
    logits = log_probs(0.6, 0.2, 0.1, 0.06, 0.04)  # threshold: min_p * 0.6
    probs = warp(logits, cfg(min_p=min_p))
    assert support(probs) == set(range(n_kept))
    np.testing.assert_allclose(probs, hand_softmax(logits.tolist(), keep=range(n_kept)), rtol=1e-6)


def test_default_chain_combines_all_truncations():
    logits = log_probs(0.3, 0.25, 0.2, 0.1, 0.08, 0.05, 0.02)
    probs = warp(logits, SamplingConfig(temperature=0.5, top_k=5, top_p=0.8, min_p=0.3))
    # top-5 renormalises to .32 .27 .22 .11 .09; top-p 0.8 keeps 3; min-p keeps >= .3 * .32: 4
    np.testing.assert_allclose(probs, hand_softmax(logits.tolist(), 0.5, [0, 1, 2]), rtol=1e-6)


@pytest.mark.parametrize("top_k", [0, 6, 7])
def test_non_finite_logits_are_excluded(top_k):
    logits = np.array([1.0, -np.inf, 0.5, np.nan, np.inf, -np.inf, 2.0, -1.0], dtype=np.float32)
    probs = warp(logits, cfg(top_k=top_k))
    finite = [0, 2, 6, 7]
    assert support(probs) == set(finite)
    np.testing.assert_allclose(probs, hand_softmax([float(x) for x in logits], keep=finite), rtol=1e-6)


def test_non_finite_logits_may_take_top_k_slots_but_not_mass():
    logits = np.array([1.0, -np.inf, 0.5, np.nan, np.inf, -np.inf, 2.0, -1.0], dtype=np.float32)
    assert 6 in support(warp(logits, cfg(top_k=3))) <= {0, 2, 6}


def test_top_k_with_fewer_finite_logits_than_k():
    logits = np.full(100, -np.inf, dtype=np.float32)
    logits[[5, 50, 95]] = [0.0, 1.0, 2.0]
    np.testing.assert_allclose(warp(logits, cfg(top_k=40)), hand_softmax(logits.tolist(), keep=[5, 50, 95]))


def test_all_but_one_logit_minus_inf_gives_one_hot():
    logits = np.full(10, -np.inf, dtype=np.float32)
    logits[7] = -50.0
    probs = warp(logits, SamplingConfig(top_k=4, top_p=0.5, min_p=0.5, temperature=0.1))
    np.testing.assert_array_equal(probs, np.eye(10)[7])


def test_no_finite_logit_is_an_error():
    with pytest.raises(ValueError, match="finite"):
        warp(np.full(5, -np.inf, dtype=np.float32), cfg())


@pytest.mark.parametrize("overrides", [dict(top_p=1e-9), dict(min_p=0.9999), dict(top_k=1)])
def test_at_least_one_token_is_kept(overrides):
    logits = np.array([0.0, 0.1, 5.0, 4.999], dtype=np.float32)
    np.testing.assert_array_equal(warp(logits, cfg(**overrides)), [0.0, 0.0, 1.0, 0.0])


def test_top_k_on_a_full_size_vocab_matches_the_full_pass():
    logits = np.random.default_rng(9).normal(scale=3.0, size=151_936).astype(np.float32)
    fast = warp(logits, SamplingConfig(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05))
    ranked = np.argsort(logits)[::-1]
    full = warp(np.where(np.isin(np.arange(logits.size), ranked[:40]), logits, -np.inf),
                SamplingConfig(temperature=0.8, top_k=0, top_p=0.95, min_p=0.05))
    np.testing.assert_allclose(fast, full, rtol=1e-12, atol=0)
    assert support(fast) <= set(ranked[:40].tolist())


@pytest.mark.parametrize("n_vocab", [7, 97, 1000, 151_936])
@pytest.mark.parametrize("k", [1, 3, 40])
def test_top_k_finds_the_k_largest_in_ascending_order(n_vocab, k):
    rng = np.random.default_rng(n_vocab + k)
    for scale in (0.1, 3.0, 30.0):
        logits = rng.normal(scale=scale, size=n_vocab).astype(np.float32)
        ids = _top_k(logits, k)
        want = np.sort(np.argsort(logits, kind="stable")[::-1][:min(k, n_vocab)])
        np.testing.assert_array_equal(ids, want if k < n_vocab else np.arange(n_vocab))


def noisy_rows(rng, n_vocab, n):
    """Rows of logits with ties, -inf (a grammar's mask), and the odd NaN or +inf."""
    for i in range(n):
        row = rng.normal(scale=rng.choice([0.5, 2.0, 8.0]), size=n_vocab).astype(np.float32)
        if i % 3 == 1:
            row[(rng.random(n_vocab) < 0.9) & (np.arange(n_vocab) != i % n_vocab)] = -np.inf
        if i % 5 == 2:
            row[rng.integers(n_vocab, size=3)] = row.max()  # ties at the top
        if i % 7 == 3:
            row[rng.integers(n_vocab)] = rng.choice([np.nan, np.inf])
        yield row


@pytest.mark.parametrize("n_vocab", [5, 300, 151_936])
def test_draw_is_sample_of_warp_draw_for_draw(n_vocab):
    rng = np.random.default_rng(n_vocab)
    configs = [SamplingConfig(), SamplingConfig(temperature=0.0), cfg(), cfg(top_k=1), cfg(top_k=2, temperature=0.3),
               SamplingConfig(temperature=1.5, top_k=0, top_p=0.9, min_p=0.0),
               SamplingConfig(temperature=0.7, top_k=100, top_p=0.5, min_p=0.1)]
    for i, row in enumerate(noisy_rows(rng, n_vocab, 14 if n_vocab > 1000 else 60)):
        c = configs[i % len(configs)]
        a, b = CountingRng(seed=i), CountingRng(seed=i)
        try:
            dense = warp(row, c)
        except ValueError:  # a non-finite logit took the only top-k slot: no token to draw
            with pytest.raises(ValueError, match="finite"):
                draw(row, c, a)
            continue
        assert [draw(row, c, a) for _ in range(8)] == [sample(dense, b) for _ in range(8)]
        assert a.calls == b.calls == 8
        ids, p = distribution(row, c)
        np.testing.assert_array_equal(ids, np.flatnonzero(dense))
        np.testing.assert_array_equal(p, dense[ids])


def test_pick_draws_once_by_inverse_cdf():
    ids, weights = np.array([1, 3]), np.array([0.25, 0.75])
    edges = [0.0, 0.2499, 0.25, 0.9999, np.nextafter(1.0, 0.0)]
    rng = CountingRng(draws=edges)
    assert [pick(ids, weights, rng) for _ in edges] == [1, 1, 3, 3, 3]
    assert rng.calls == len(edges)


def test_pick_guards_the_end_of_the_cdf():
    tiny = np.array([1e-320])  # subnormal total: u * total rounds up to total
    assert pick(np.array([1]), tiny, CountingRng(draws=[np.nextafter(1.0, 0.0)])) == 1


def test_pick_takes_unnormalised_weights():
    rng = CountingRng(draws=[0.1, 0.6])
    assert [pick(np.array([1, 2]), np.array([2.0, 6.0]), rng) for _ in range(2)] == [1, 2]


def test_pick_frequencies_match_probabilities():
    probs = np.array([0.05, 0.0, 0.4, 0.3, 0.0, 0.15, 0.1])
    ids = np.flatnonzero(probs)
    rng = np.random.default_rng(11)
    n = 40_000
    freq = np.bincount([pick(ids, probs[ids], rng) for _ in range(n)], minlength=probs.size) / n
    assert np.all(np.abs(freq - probs) <= 6 * np.sqrt(probs * (1 - probs) / n))


def test_prob_is_zero_outside_the_ids():
    dist = (np.array([2, 5, 9]), np.array([0.2, 0.3, 0.5]))
    assert [prob(dist, t) for t in (0, 2, 3, 5, 9, 10)] == [0.0, 0.2, 0.0, 0.3, 0.5, 0.0]
