"""The cost-aware controller: pure decisions, then the same decisions inside the engine."""

from __future__ import annotations

import numpy as np
import pytest

from ggspec import BackendConfig, Engine, SamplingConfig
from ggspec.controller import (DENSE_ROWS, MATCH_PRIOR, MAX_CHANCE, RECENT_EDGES, STRIDE, AcceptanceModel, CostModel,
                               MatchAcceptance, Plan, Survey, TokenRecord, best_plan, best_tree, copy_kinds)
from ggspec.drafters.lookup import AGREE, AHEAD, ALONE, DIFFER, OUTPUT, PROMPT
from tinymodels import VOCAB

CPU = CostModel(np.array([1.0, 1.4, 2.0, 2.0, 2.6, 3.0, 4.0, 5.0, 5.5]), draft_token=0.4)


def expected_accepted(chances: np.ndarray) -> np.ndarray:
    """E[accepted] for chains of length 1..k from conditional acceptance chances (k,), the
    sum of prefix products written out (the reference the controller's choices are checked against)."""
    return np.array([sum(np.prod(chances[:i + 1]) for i in range(j + 1)) for j in range(len(chances))])


def test_expected_accepted_length_is_the_sum_of_prefix_products():
    acc = AcceptanceModel(0.5, 4)
    np.testing.assert_allclose(expected_accepted(acc.chances(3)), [0.5, 0.75, 0.875])


def test_acceptance_model_learns_from_outcomes():
    acc = AcceptanceModel(0.5, 4)
    for _ in range(200):
        acc.observe(proposed=4, accepted=1)  # position 0 accepted, position 1 rejected
    assert acc.alpha[0] > 0.99 and acc.alpha[1] < 0.01
    assert acc.alpha[2] == acc.alpha[3] == 0.5  # never reached: unchanged


def chances(p, k=8):
    return np.full(k, p)


def test_expensive_verification_means_plain_decoding():
    costs = CostModel(np.array([1.0] + [100.0] * 8), draft_token=0.0)
    plan, _ = best_plan(costs, chances(0.99), AcceptanceModel(0.99, 8), budget=8)
    assert plan == Plan()


def test_free_and_always_accepted_drafts_mean_the_longest_draft():
    costs = CostModel(np.ones(9), draft_token=0.0)
    plan, rate = best_plan(costs, chances(1.0, 3), AcceptanceModel(1.0, 8), budget=8)
    assert plan == Plan(lookup=3, model=5) and rate == pytest.approx(9.0)


def test_on_a_cpu_cost_curve_a_mediocre_draft_model_does_not_pay():
    plan, _ = best_plan(CPU, chances(0.0, 0), AcceptanceModel(0.7, 8), budget=8)
    assert plan == Plan()


def test_on_a_cpu_cost_curve_a_good_lookup_chain_pays_with_a_moderate_length():
    plan, rate = best_plan(CPU, chances(0.95), None, budget=8)
    assert 2 <= plan.lookup <= 5 and plan.model == 0
    assert rate > 1.5


def test_a_draft_is_taken_exactly_when_it_promises_more_than_plain_decoding():
    costs = CostModel(np.array([1.0, 1.5]))
    # one token accepted with chance c commits 1 + c tokens in 1.5 s: pays when c > 0.5
    assert best_plan(costs, chances(0.49, 1), None, budget=1)[0] == Plan()
    assert best_plan(costs, chances(0.51, 1), None, budget=1)[0] == Plan(lookup=1)


def test_a_larger_budget_never_lowers_the_expected_rate():
    rng = np.random.default_rng(0)
    for _ in range(200):
        curve = np.cumsum(rng.uniform(0.05, 1.0, 17))
        costs = CostModel(curve, draft_token=rng.uniform(0, 0.5))
        copied = rng.uniform(0, 1, rng.integers(0, 17))
        model = AcceptanceModel(rng.uniform(0, 1), 16)
        rates = [best_plan(costs, copied, model, budget=k)[1] for k in range(1, 17)]
        assert np.all(np.diff(rates) >= -1e-12)


def inside(k: int, agreement: int = ALONE) -> list[int]:
    """The kinds of k copied tokens, none of them a line break, all with that agreement."""
    return copy_kinds(np.zeros(k, dtype=bool), [agreement] * k)


def test_copy_acceptance_grows_with_the_match_length_it_learns():
    acc = MatchAcceptance()
    for _ in range(100):
        acc.observe(match_len=2, kinds=inside(1), hits=0, where=PROMPT)     # short matches: wrong
        acc.observe(match_len=20, kinds=inside(4), hits=4, where=PROMPT)   # long matches: right
    assert acc.chances(2, inside(1), PROMPT)[0] < 0.05
    assert min(acc.chances(20, inside(4), PROMPT)) > 0.95
    # a draft from a match of 2 whose first token is accepted continues from a match of 3
    np.testing.assert_array_equal(acc.chances(2, inside(3), PROMPT),
                                  [acc.chances(n, inside(1), PROMPT)[0] for n in (2, 3, 4)])
    assert acc.chances(20, inside(1), OUTPUT)[0] == MATCH_PRIOR[acc.bucket(20)]  # the answer's own text: not learnt yet


def test_copy_acceptance_is_kept_apart_for_answers_that_copy_and_those_that_do_not():
    acc = MatchAcceptance()
    for _ in range(50):  # a document being copied: long matches hold
        acc.observe(match_len=10, kinds=inside(31), hits=30, where=PROMPT)
    copying = acc.chances(10, inside(1), PROMPT)[0]
    for _ in range(50):  # prose: matches are coincidences
        acc.observe(match_len=1, kinds=inside(1), hits=0, where=PROMPT)
        acc.observe(match_len=10, kinds=inside(1), hits=0, where=PROMPT)
    assert acc.recent < 0.25 and acc.chances(10, inside(1), PROMPT)[0] < 0.1
    assert copying > 0.9
    for _ in range(16):  # back to copying: the estimates learnt there come back (less the
        acc.observe(match_len=10, kinds=inside(1), hits=1, where=PROMPT)  # misses of the switch to prose)
    assert acc.row == len(RECENT_EDGES) - 1 and acc.chances(10, inside(1), PROMPT)[0] > 0.75


def test_copy_acceptance_learns_that_copies_end_where_lines_end():
    """An edit copies each line of its input but changes what follows a line break: the
    line breaks' chance falls, the tokens inside lines keep theirs, and a long draft is
    estimated by how many line breaks it crosses."""
    acc = MatchAcceptance()
    line = copy_kinds(np.array([False] * 7 + [True]), [ALONE] * 8)  # seven tokens, then the line's end
    for _ in range(40):
        acc.observe(match_len=10, kinds=line, hits=7, where=PROMPT)  # the break is where it diverges
    assert acc.chances(10, inside(1), PROMPT)[0] > 0.9
    assert acc.chances(17, line[-1:], PROMPT)[0] < 0.2
    across = acc.chances(10, line, PROMPT)
    assert across[-1] < 0.2 and min(across[:-1]) > 0.9


def test_copy_acceptance_learns_where_the_other_sources_agree_and_where_one_differs():
    """Where earlier occurrences of the text went on differently, the text branches: a
    copy there is kept apart from one that every source agrees with, and each learns its own."""
    acc = MatchAcceptance()
    fresh = [acc.chances(3, inside(1, a), PROMPT)[0] for a in (ALONE, AGREE, DIFFER)]
    assert fresh[2] < fresh[0] < fresh[1]  # the starting guesses already say so
    for _ in range(60):  # (the recent hit rate held in one row: only the kind differs)
        for agreement, hits in ((DIFFER, 0), (AGREE, 1)):
            acc.recent = 0.6
            acc.observe(match_len=3, kinds=inside(1, agreement), hits=hits, where=PROMPT)
    acc.recent = 0.6
    assert acc.chances(3, inside(1, DIFFER), PROMPT)[0] < 0.05
    assert acc.chances(3, inside(1, AGREE), PROMPT)[0] > 0.95
    mixed = copy_kinds(np.array([False, True, False]), [AGREE, ALONE, DIFFER])
    np.testing.assert_array_equal(acc.chances(3, mixed, PROMPT),
                                  [acc.chances(n, [inside(1, a)[0] + e], PROMPT)[0]
                                   for n, a, e in ((3, AGREE, 0), (4, ALONE, 1), (5, DIFFER, 0))])


def test_an_answers_outcomes_inform_the_neighbouring_match_lengths():
    acc = MatchAcceptance()
    acc.start()
    before = [acc.chances(n, inside(1), PROMPT)[0] for n in (5, 6, 8, 16)]  # buckets 4, 5, 6, 8
    for _ in range(4):
        acc.observe(match_len=6, kinds=inside(1), hits=0, where=PROMPT)
    after = [acc.chances(n, inside(1), PROMPT)[0] for n in (5, 6, 8, 16)]
    assert after[1] < after[0] < before[0] and after[2] < before[2]  # neighbours learn less
    assert after[3] == before[3]                                        # others nothing


def test_estimates_saved_with_two_places_of_the_source_load_with_the_prompts_for_both():
    acc = MatchAcceptance()
    acc.observe(match_len=20, kinds=inside(4), hits=4, where=PROMPT)
    acc.observe(match_len=2, kinds=inside(1), hits=0, where=OUTPUT)
    state = acc.state()
    old = {**state, **{k: np.array(state[k])[:2].tolist() for k in ("p", "seen", "hits", "trials")}}
    loaded = MatchAcceptance()
    loaded.set_state(old)
    prompt = acc.chances(20, inside(4), PROMPT)
    assert loaded.chances(20, inside(4), AHEAD) == loaded.chances(20, inside(4), PROMPT) == prompt
    assert loaded.chances(2, inside(1), OUTPUT) == acc.chances(2, inside(1), OUTPUT)
    with pytest.raises(ValueError):
        loaded.set_state({**state, "p": np.array(state["p"])[:1].tolist()})


def test_an_outcome_counts_for_its_match_length_and_half_for_each_neighbour_at_the_edges_too():
    acc = MatchAcceptance()
    acc.observe(match_len=1, kinds=inside(1), hits=1, where=PROMPT)       # the first bucket
    acc.observe(match_len=500, kinds=inside(1), hits=0, where=OUTPUT)    # the last bucket
    row = acc.row
    hits, trials = np.array(acc.hits), np.array(acc.trials)
    assert trials[1, :, 0].sum() == trials[0, :, 0].sum() == 1.5
    np.testing.assert_array_equal(hits[1].sum(axis=(0, 1))[:3], [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(trials[0].sum(axis=(0, 1))[-3:], [0.0, 0.5, 1.0])
    assert hits[0].sum() == 0.0 and row == acc.row


def test_a_token_whose_copies_keep_breaking_in_this_answer_is_no_longer_trusted():
    """Copies of a token that broke in this answer are capped at its record, the estimate
    weighing as PRIOR copies; a token whose copies held is not raised, another token is
    not touched, and clear() (a new answer) forgets the record."""
    record, prior = TokenRecord(), TokenRecord.PRIOR
    record.observe([5, 6, 7], hits=2)  # 5 and 6 held, 7 broke
    for _ in range(3):
        record.observe([7], hits=0)    # and 7 broke again
    np.testing.assert_allclose(record.cap([0.9] * 4, [5, 6, 7, 8]), [0.9, 0.9, prior * 0.9 / (4 + prior), 0.9])
    record.observe([5], hits=0)        # 5: one held, one broke
    assert record.cap([0.9], [5])[0] == pytest.approx((1 + prior * 0.9) / (2 + prior))
    assert record.cap([0.3], [5])[0] == 0.3  # a record of 1 in 2 does not raise it
    record.clear()
    np.testing.assert_array_equal(record.cap([0.9] * 2, [5, 7]), [0.9, 0.9])


def test_auto_stops_its_copies_before_the_token_a_conversion_keeps_changing():
    """An answer that copies names from its prompt but writes another separator after each
    (JSON to YAML): its copies break at the separator, after names of any length. With the
    answer's record of each token, auto drafts the separator less often than with the
    match-length tables alone."""
    from ggspec.drafters.auto import AutoDrafter
    from ggspec.drafters.lookup import LookupDrafter
    from toolfiles import load_tool

    accepted = load_tool("replay_auto").accepted  # the accepted prefix of a greedy draft
    rng = np.random.default_rng(0)
    names = [list(rng.integers(20, 200, size=rng.integers(2, 7))) for _ in range(30)]
    prompt = [1] + [t for name in names for t in [*name, 7]]  # 7: the prompt's separator
    answer = [t for name in names for t in [*name, 8]]      # 8: the answer's

    def separators_drafted(record: bool) -> int:
        auto = AutoDrafter(CPU_CURVE, LookupDrafter(), None, np.zeros(256, dtype=bool))
        if not record:
            auto.copied.cap = lambda chances, tokens: chances
        committed, pos, drafted = list(prompt), 0, 0
        auto.prepare(committed)
        while pos < len(answer):
            draft = auto.propose(committed, min(8, len(answer) - pos - 1), SamplingConfig(temperature=0), None)
            n = accepted(draft.tokens, answer[pos:])
            drafted += 7 in draft.tokens
            auto.accept(draft, list(range(n)))
            committed += answer[pos:pos + n + 1]
            pos += n + 1
        return drafted

    assert separators_drafted(record=True) < separators_drafted(record=False)


def brute_best_plan(costs, copied, model, budget, behind):
    """Every plan's rate from the cost model's own terms, one plan at a time; the first
    best in best_plan's order (copy only, shortest first; then the model after the whole
    copy, then the model alone; a later plan only when strictly better)."""
    def rate(chances, k, prefix):
        gain = 1 + (expected_accepted(chances)[k - 1] if k else 0.0)
        draft = costs.t_draft(max(k - prefix, 0), behind + prefix) if model is not None else 0.0
        return gain / (costs.t_verify(k + 1) + draft + costs.t_rewind(chances)[k])
    copied = copied[:budget]
    best = max(((rate(copied, k, len(copied)), -k) for k in range(len(copied) + 1)))
    plan, r = Plan(lookup=-best[1]), best[0]
    for prefix in sorted({0, len(copied)}, reverse=True) if model is not None else ():
        if prefix == budget:
            continue
        chances = np.concatenate([copied[:prefix], model.chances(budget - prefix)])
        for k in range(prefix + 1, len(chances) + 1):
            if rate(chances, k, prefix) > r:
                plan, r = Plan(lookup=prefix, model=k - prefix), rate(chances, k, prefix)
    return plan, r


@pytest.mark.parametrize("seed", range(100))
def test_best_plan_is_the_best_of_all_plans_one_by_one(seed):
    rng = np.random.default_rng(seed)
    costs = CostModel(np.cumsum(rng.uniform(0.05, 1.0, rng.integers(2, 18))), draft_token=rng.uniform(0, 0.5))
    costs.correction = rng.uniform(0.8, 1.2, costs.max_rows)
    costs.scale, costs.draft_row = rng.uniform(0.5, 2.0), rng.uniform(0, 0.5)
    costs.state_copy, costs.rollback = rng.choice([0.0, 0.0, 0.1]), int(rng.integers(0, 3))
    copied = rng.uniform(0, 1, rng.integers(0, 17)) ** rng.choice([0.2, 1.0])
    model = AcceptanceModel(0.5, 16) if rng.random() < 0.6 else None
    if model is not None:
        model.alpha = rng.uniform(0, 1, 16)
    budget, behind = int(rng.integers(0, 17)), int(rng.integers(1, 4))
    plan, rate = best_plan(costs, copied, model, budget, behind)
    want, want_rate = brute_best_plan(costs, copied, model, budget, behind)
    assert plan == want and rate == pytest.approx(want_rate, rel=1e-12)


def test_cost_model_follows_measured_rounds_and_keeps_the_curve_shape():
    costs = CostModel(np.array([1.0, 1.5, 2.0, 3.0]))
    for _ in range(200):
        costs.observe_verify(1, 2.0)  # the machine (or the context depth) doubled t(1)
    np.testing.assert_allclose(costs.t_verify(np.arange(1, 5)), [2.0, 3.0, 4.0, 6.0], rtol=1e-3)
    assert costs.t_verify(8) == pytest.approx(12.0, rel=1e-3)  # linear beyond the curve


def test_a_survey_times_every_size_up_then_down_and_keeps_each_ones_fastest():
    survey = Survey(4)
    order = []
    while (b := survey.next) is not None:
        order.append(b)
        assert survey.observe(b, b + (0.5 if len(order) <= 4 else 0.0))  # the first pass is slower
    assert order == [1, 2, 3, 4, 4, 3, 2, 1]
    assert survey.curve().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert not survey.observe(2, 0.01) and not survey.observe(5, 0.01)  # all taken; no such size
    assert survey.curve().tolist() == [1.0, 2.0, 3.0, 4.0]


def test_a_survey_takes_timings_of_any_size_and_chooses_by_what_it_has_timed():
    """Rounds time whatever sizes they verify. Until every size is timed twice, the curve
    interpolates between the timed sizes and takes a size above the largest timed one to
    cost as much as it: an untimed size never looks dearer than its timed neighbours."""
    survey = Survey(9)
    assert survey.curve() is None  # nothing to choose by before t(1): a plain round times it
    assert survey.observe(4, 0.3)
    assert survey.curve() is None
    assert survey.observe(1, 0.1)
    np.testing.assert_allclose(survey.curve(), [0.1, 1 / 6, 0.7 / 3, 0.3, 0.3, 0.3, 0.3, 0.3])  # up to 2 x 4 rows
    costs = CostModel()
    costs.follow(survey.curve())
    assert costs.t_verify(9) == pytest.approx(0.3 * 9 / 8)  # beyond: in proportion to the rows
    assert survey.observe(9, 0.5) and survey.observe(4, 0.2) and not survey.observe(4, 0.1)  # twice at most
    np.testing.assert_allclose(survey.curve()[[3, 5, 8]], [0.2, 0.32, 0.5])
    assert survey.next == 2  # what a measurement takes next: the untimed sizes, up
    assert [b for b, _ in survey.done] == [4, 1, 9, 4]


def test_a_survey_beyond_the_dense_sizes_times_every_stride_and_interpolates():
    rows = DENSE_ROWS + 2 * STRIDE + 3
    survey = Survey(rows)
    sizes = []
    while (b := survey.next) is not None and b not in sizes:
        sizes.append(b)
        survey.observe(b, 2.0 * b)
    assert sizes == [*range(1, DENSE_ROWS + 1), DENSE_ROWS + STRIDE, DENSE_ROWS + 2 * STRIDE, rows]
    while (b := survey.next) is not None:
        survey.observe(b, 2.0 * b)
    np.testing.assert_allclose(survey.curve(), 2.0 * np.arange(1, rows + 1))


def test_a_survey_resumed_from_its_timings_goes_on_where_it_stopped():
    first = Survey(5)
    for _ in range(3):
        first.observe(first.next, 0.1 * first.next)
    resumed = Survey(5, first.done)
    assert resumed.done == first.done and resumed.next == 4


def test_a_survey_ends_when_a_curve_covering_it_comes_or_the_machine_changes():
    costs = CostModel()
    costs.survey = Survey(3)
    costs.calibrate(np.ones(2))  # covers fewer rows: the survey goes on
    assert costs.survey is not None
    costs.calibrate(np.ones(3))
    assert costs.survey is None
    costs.survey = Survey(3)
    costs.reset()
    assert costs.survey is None


def test_engine_follows_the_controller(target_path, draft_path, monkeypatch):
    prompt = [VOCAB.bos_id] + list(range(300, 320)) * 3
    with Engine(target_path, draft_path, target_config=BackendConfig(n_ctx=512, n_threads=1)) as eng:
        auto = eng.drafters["auto"]
        eng.prepare()  # calibrates
        monkeypatch.setattr(auto.costs, "observe_verify", lambda *args: None)
        auto.costs.calibrate(np.array([1.0] + [1e3] * 16))
        expensive = eng.generate(prompt, max_tokens=40, sampling=SamplingConfig(temperature=0))
        auto.costs.calibrate(np.full(17, 1.0))
        monkeypatch.setattr(auto.copy_acceptance, "p", np.ones_like(auto.copy_acceptance.p))
        monkeypatch.setattr(auto.model_acceptance, "alpha", np.ones_like(auto.model_acceptance.alpha))
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
    from ggspec.drafters.model import ModelDrafter

    tokens = list(range(200))
    model = SimpleNamespace(ctx=SimpleNamespace(tokens=tokens[:150]), _known=lambda t: t)  # 50 tokens behind
    model.behind = lambda t: ModelDrafter.behind(model, t)
    # a CPU: t(1) 100 ms, t(2) 140 ms, a draft token 40 ms -> 10 ms saved a token at best
    auto = AutoDrafter(CostModel(np.array([0.100, 0.140, 0.20]), draft_token=0.040), LookupDrafter(), model,
                       np.zeros(256, dtype=bool))
    assert auto._explore(tokens) == Plan()  # 48 x 10 ms < 49 more rows x 40 ms
    model.ctx.tokens = tokens[:198]                # 2 behind: one more row, 40 ms
    assert auto._explore(tokens) == Plan(model=1)
    # a GPU: t(1) 20 ms, t(2) 21 ms, a draft token 2 ms -> 8.5 ms saved a token
    auto.costs.calibrate(np.array([0.020, 0.021, 0.022]), draft_token=0.002)
    model.ctx.tokens = tokens[:150]
    assert EXPLORE_EVERY * 0.0085 > 49 * 0.002 and auto._explore(tokens) == Plan(model=1)


def test_draft_model_plans_pay_for_catching_up():
    """A draft model that missed many tokens first decodes them all: a plan that uses it
    pays for that, and the time is learnt per row apart from the time per drafted token."""
    costs = CostModel(np.array([0.100, 0.120, 0.130, 0.140, 0.150]), draft_token=0.010)
    model = AcceptanceModel(0.9, 4)
    assert best_plan(costs, chances(0.0, 0), model, budget=4, behind=1)[0].model > 0
    # 500 unseen tokens at 10 ms a row: 5 s for at most 4 tokens more -> plain decoding
    assert best_plan(costs, chances(0.0, 0), model, budget=4, behind=500)[0] == Plan()
    # measured: a first decode of 501 rows took 1.01 s -> 2 ms a further row
    for _ in range(200):
        costs.observe_draft(3, 1.01 + 2 * 0.010, behind=501, catch_up=1.01)
    assert costs.draft_row == pytest.approx(0.002, rel=0.01)
    assert costs.draft_token == pytest.approx(0.010, rel=0.01)  # not inflated by the catch-up
    assert costs.t_draft(3, 11) == pytest.approx(3 * 0.010 + 10 * 0.002, rel=0.01)
    assert costs.t_draft(0, 11) == 0.0


def test_oracle_drafts_every_copyable_run_at_the_cheapest_size():
    from ggspec.controller import oracle_speedup
    flat = CostModel(np.ones(5))                      # any batch costs one token's time
    assert oracle_speedup(np.zeros(10, dtype=int), flat, 4) == pytest.approx(1.0)
    # 10 tokens all copyable: rounds of 5 (4 drafted + 1) -> 2 rounds instead of 10
    assert oracle_speedup(np.arange(10)[::-1], flat, 4) == pytest.approx(5.0)
    linear = CostModel(np.arange(1.0, 6.0))           # b rows cost b: nothing can gain
    assert oracle_speedup(np.arange(10)[::-1], linear, 4) == pytest.approx(1.0)


# t(b) / t(1) as measured: a 2-core CPU (this project's machines: 16 rows cost less than 15)
# and an H100 (DESIGN.md: nearly flat up to 8 rows, a kernel switch above)
CPU_CURVE = CostModel(np.array([1.0, 1.76, 2.28, 2.85, 3.46, 4.1, 4.96, 6.55, 6.98, 7.45, 8.0, 8.04, 8.75,
                                8.97, 9.48, 7.94, 9.31]))
GPU_CURVE = CostModel(np.array([1.0, 1.28, 1.31, 1.35, 1.42, 1.5, 1.58, 1.63, 1.67, 2.1, 2.1, 2.1, 2.1, 2.1,
                                2.1, 2.1, 2.15]))


@pytest.mark.parametrize("costs, chance, expected", [
    (CPU_CURVE, 0.7, 0),     # a CPU: a fair copy does not pay
    (CPU_CURVE, 0.9, 3),     # a good one pays a short draft (4 rows: a cheap size)
    (CPU_CURVE, 0.99, 15),   # a sure one: the 16-row batch, the cheapest per row
    (GPU_CURVE, 0.5, 3),     # a GPU: even a coin flip pays a short draft
    (GPU_CURVE, 0.7, 5),     # a fair copy stops before the rows get dearer
    (GPU_CURVE, 0.95, 16),   # a good one takes the whole budget
])
def test_chain_length_follows_the_cost_curve(costs, chance, expected):
    plan, _ = best_plan(costs, np.full(16, chance), None, budget=16)
    assert plan == Plan(lookup=expected)


@pytest.mark.parametrize("costs, alternative, expected", [
    (CPU_CURVE, 0.3, []),             # a CPU: an unsure copy is not verified at all
    (GPU_CURVE, 0.05, [0, 1]),        # a GPU: the copy, as a chain (the other source unlikely)
    (GPU_CURVE, 0.3, [0, 1, 2]),      # and the other source's first candidate beside it
])
def test_candidate_tree_follows_the_cost_curve(costs, alternative, expected):
    """A copy of two tokens whose first is right 60% of the time; another source proposes
    a different first token: right `alternative` of the time the copy is wrong."""
    parents = [-1, 0, -1, 2]  # copy: nodes 0, 1; the other source: nodes 2, 3
    chances = np.array([0.6, 0.9, 0.4 * alternative, 0.9])
    nodes, rate = best_tree(parents, chances, costs, budget=8)
    assert nodes.tolist() == expected
    assert rate >= 1 / costs.t_verify(1) - 1e-12  # never worse than plain decoding, by its own estimate


def test_a_new_answer_follows_its_own_evidence_over_earlier_answers():
    acc = MatchAcceptance()
    for _ in range(200):  # earlier answers: copies from the prompt held
        acc.observe(match_len=4, kinds=inside(1), hits=1, where=PROMPT)
    assert acc.chances(4, inside(1), PROMPT)[0] > 0.95
    acc.start()  # this answer: they do not
    before = acc.chances(4, inside(1), PROMPT)[0]
    for _ in range(6):
        acc.observe(match_len=4, kinds=inside(1), hits=0, where=PROMPT)
        acc.observe(match_len=4, kinds=inside(1), hits=1, where=PROMPT)  # keeps the recent rate's row
    assert before > 0.88 and acc.chances(4, inside(1), PROMPT)[0] < 0.75


def test_earlier_answers_are_not_taken_as_certain():
    """After answers whose copies always held, a new answer's first copies are estimated
    below that record (the built-in guess keeps a weight) until this answer confirms it."""
    acc = MatchAcceptance()
    for _ in range(200):
        acc.observe(match_len=20, kinds=inside(1), hits=1, where=PROMPT)
    b = acc.bucket(20)
    learnt, guess = acc.p[1][acc.row][0][b], MATCH_PRIOR[b]
    acc.start()
    first = acc.chances(20, inside(1), PROMPT)[0]
    w, g = MatchAcceptance.ANSWER_PRIOR, MatchAcceptance.GUESS_WEIGHT
    assert learnt > 0.99 and g > 0
    np.testing.assert_allclose(first, (w * learnt + g * guess) / (w + g))
    assert first < 0.97
    for _ in range(20):  # this answer's copies hold too
        acc.observe(match_len=20, kinds=inside(1), hits=1, where=PROMPT)
    assert acc.chances(20, inside(1), PROMPT)[0] == MAX_CHANCE


def test_no_copy_is_priced_as_certain():
    """However many copies held, each copied token keeps a chance of breaking: a long
    chain is priced below its length, so a larger draft_max does not buy a long bet at
    near-certainty."""
    acc = MatchAcceptance()
    for _ in range(500):
        acc.observe(match_len=100, kinds=inside(16), hits=16, where=PROMPT)
    acc.start()
    for _ in range(100):
        acc.observe(match_len=100, kinds=inside(16), hits=16, where=PROMPT)
    assert acc.p[1][acc.row][0][acc.bucket(100)] > 0.99  # what the table learnt
    chances = acc.chances(100, inside(31), PROMPT)
    np.testing.assert_array_equal(chances, np.full(31, MAX_CHANCE))
    assert np.cumprod(chances).sum() < 0.8 * 31
