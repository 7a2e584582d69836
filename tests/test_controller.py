"""The cost-aware controller: pure decisions, then the same decisions inside the engine."""

from __future__ import annotations

import numpy as np
import pytest

from ggspec import BackendConfig, Engine, SamplingConfig
from ggspec.controller import AcceptanceModel, CostModel, Plan, best_plan
from tinymodels import VOCAB

CPU = CostModel(np.array([1.0, 1.4, 2.0, 2.0, 2.6, 3.0, 4.0, 5.0, 5.5]), draft_token=0.4)


def test_expected_accepted_length_is_the_sum_of_prefix_products():
    acc = AcceptanceModel(0.5, 4)
    np.testing.assert_allclose(acc.expected(3), [0.5, 0.75, 0.875])


def test_acceptance_model_learns_from_outcomes():
    acc = AcceptanceModel(0.5, 4)
    for _ in range(200):
        acc.observe(proposed=4, accepted=1)  # position 0 accepted, position 1 rejected
    assert acc.alpha[0] > 0.99 and acc.alpha[1] < 0.01
    assert acc.alpha[2] == acc.alpha[3] == 0.5  # never reached: unchanged


def test_expensive_verification_means_plain_decoding():
    costs = CostModel(np.array([1.0] + [100.0] * 8), draft_token=0.0)
    plan, _ = best_plan(costs, AcceptanceModel(0.99, 8), AcceptanceModel(0.99, 8), lookup_len=8, budget=8)
    assert plan == Plan()


def test_free_and_always_accepted_drafts_mean_the_longest_draft():
    costs = CostModel(np.ones(9), draft_token=0.0)
    plan, rate = best_plan(costs, AcceptanceModel(1.0, 8), AcceptanceModel(1.0, 8), lookup_len=3, budget=8)
    assert plan.total == 8 and rate == pytest.approx(9.0)


def test_on_a_cpu_cost_curve_a_mediocre_draft_model_does_not_pay():
    plan, _ = best_plan(CPU, AcceptanceModel(0.0, 8), AcceptanceModel(0.7, 8), lookup_len=0, budget=8)
    assert plan == Plan()


def test_on_a_cpu_cost_curve_a_good_lookup_chain_pays_with_a_moderate_length():
    plan, rate = best_plan(CPU, AcceptanceModel(0.95, 8), None, lookup_len=8, budget=8)
    assert 2 <= plan.lookup <= 5 and plan.model == 0
    assert rate > 1.5


def test_engine_follows_the_controller(target_path, draft_path):
    prompt = [VOCAB.bos_id] + list(range(300, 320)) * 3
    with Engine(target_path, draft_path, target_config=BackendConfig(n_ctx=512, n_threads=1)) as eng:
        auto = eng.drafters["auto"]
        eng.generate(prompt, max_tokens=4, sampling=SamplingConfig(temperature=0))  # calibrates
        auto.costs = CostModel(np.array([1.0] + [1e3] * 8))
        expensive = eng.generate(prompt, max_tokens=40, sampling=SamplingConfig(temperature=0))
        auto.costs = CostModel(np.full(9, 1.0))
        auto.lookup_acceptance = AcceptanceModel(1.0, 8)
        auto.model_acceptance = AcceptanceModel(1.0, 8)
        free = eng.generate(prompt, max_tokens=40, sampling=SamplingConfig(temperature=0))
    # plain rounds, except one exploring draft every EXPLORE_EVERY rounds
    assert expensive.stats.draft_rounds <= 40 // 16 + 1
    assert set(expensive.stats.controller["plans"]) >= {"lookup=0,model=0"}
    assert free.stats.draft_rounds >= free.stats.rounds - 1  # the last round may have no budget left
    assert free.stats.draft_tokens / free.stats.draft_rounds > 4


def test_exploring_the_draft_model_weighs_its_catch_up():
    """After many plain rounds the draft model is tried again only when a perfectly
    accepted draft over EXPLORE_EVERY tokens would repay catching it up on what it missed."""
    from types import SimpleNamespace

    from ggspec.controller import EXPLORE_EVERY
    from ggspec.drafters.auto import AutoDrafter
    from ggspec.drafters.lookup import LookupDrafter

    tokens = list(range(200))
    model = SimpleNamespace(ctx=SimpleNamespace(tokens=tokens[:150]))  # 50 tokens behind
    auto = AutoDrafter(None, LookupDrafter(), model, 8)
    # a CPU: t(1) 100 ms, t(2) 140 ms, a draft token 40 ms -> 10 ms saved a token at best
    auto.costs = CostModel(np.array([0.100, 0.140, 0.20]), draft_token=0.040)
    assert auto._explore([], tokens) == Plan()  # 48 x 10 ms < 50 x 40 ms
    model.ctx.tokens = tokens[:198]                # 2 behind: 80 ms to catch up
    assert auto._explore([], tokens) == Plan(model=1)
    # a GPU: t(1) 20 ms, t(2) 21 ms, a draft token 2 ms -> 8.5 ms saved a token
    auto.costs = CostModel(np.array([0.020, 0.021, 0.022]), draft_token=0.002)
    model.ctx.tokens = tokens[:150]
    assert EXPLORE_EVERY * 0.0085 > 50 * 0.002 and auto._explore([], tokens) == Plan(model=1)
    assert auto._explore([7], tokens) == Plan(lookup=1)  # lookup needs no catching up
