"""Method `medusa` in the engine: heads from a GGUF file propose trees that the target
verifies in one batch; exact unless typical acceptance is asked for."""

from __future__ import annotations

import numpy as np
import pytest

import ggspec.engine
from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig
from ggspec.heads import MedusaHeads, read_target, save_heads
from reference import first_divergence, greedy_reference
from test_engine import random_prompt

CFG = BackendConfig(n_ctx=512, n_batch=64, n_threads=1)


@pytest.fixture(scope="module")
def heads_path(tmp_path_factory, target_path):
    """Three tied heads with small random residual layers over the full vocabulary."""
    info = read_target(target_path)
    rng = np.random.default_rng(0)
    h = info.fingerprint.embedding_length
    w = rng.standard_normal((3, 1, h, h)).astype(np.float32) * 0.05
    heads = MedusaHeads(w, np.zeros((3, 1, h), np.float32), info.output_rows(None), token_ids=None, tied=True,
                        target=info.fingerprint)
    return save_heads(tmp_path_factory.mktemp("heads") / "heads.gguf", heads, dtype="f32")


@pytest.fixture(scope="module")
def medusa_engine(target_path, heads_path):
    with Engine(target_path, None, target_config=CFG, heads=heads_path) as e:
        e.prepare(SpecConfig("medusa"))  # calibrates
        e.generate(random_prompt(1), max_tokens=2, spec=SpecConfig("medusa"))
        yield e


def fix_costs(costs, curve, monkeypatch):
    """Make the engine's cost model report `curve` (seconds by rows) until the test ends."""
    monkeypatch.setattr(costs, "curve", np.asarray(curve, dtype=np.float64))
    monkeypatch.setattr(costs, "correction", np.ones(len(curve)))
    monkeypatch.setattr(costs, "scale", 1.0)
    monkeypatch.setattr(costs, "observe_verify", lambda *args: None)


@pytest.fixture
def free_trees(medusa_engine, monkeypatch):
    """Make verification look free, so that every round drafts a full tree."""
    medusa = medusa_engine.drafters["medusa"]
    fix_costs(medusa.costs, np.full(33, medusa.costs.t_verify(1)), monkeypatch)  # any tree costs one token
    monkeypatch.setattr(medusa, "acceptance", np.full_like(medusa.acceptance, 0.9))
    monkeypatch.setattr(medusa, "head_seconds", 0.0)  # (and evaluating the heads costs nothing)
    return medusa


@pytest.mark.parametrize("seed", range(4))
def test_greedy_medusa_equals_plain_greedy_decoding(medusa_engine, free_trees, target_path, seed):
    prompt = random_prompt(70 + seed)
    ref = greedy_reference(target_path, prompt, 40)
    got = medusa_engine.generate(prompt, max_tokens=40, sampling=SamplingConfig(temperature=0),
                                 spec=SpecConfig("medusa", draft_max=12))
    assert first_divergence(got.tokens, ref) is None
    assert got.stats.draft_rounds >= 5  # (random heads: the trees shrink as they miss)


def test_medusa_trees_shrink_to_nothing_when_verification_is_expensive(medusa_engine, monkeypatch):
    fix_costs(medusa_engine.costs, [1.0] + [1e3] * 32, monkeypatch)
    got = medusa_engine.generate(random_prompt(81), max_tokens=20, spec=SpecConfig("medusa"))
    assert got.stats.draft_rounds == 0


def test_typical_acceptance_runs_only_when_asked(medusa_engine, free_trees, monkeypatch):
    calls = []
    real = ggspec.engine.accept_tree_typical
    monkeypatch.setattr(ggspec.engine, "accept_tree_typical", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompt = random_prompt(82)
    medusa_engine.generate(prompt, max_tokens=20, spec=SpecConfig("medusa"))
    assert not calls
    got = medusa_engine.generate(prompt, max_tokens=20, sampling=SamplingConfig(temperature=0.8, seed=3),
                                 spec=SpecConfig("medusa", typical=True))
    assert got.stats.draft_rounds > 0 and len(calls) == got.stats.draft_rounds


def test_medusa_is_refused_without_heads(target_path):
    with Engine(target_path, None, target_config=CFG) as eng:
        with pytest.raises(ValueError, match="medusa"):
            eng.generate(random_prompt(83), spec=SpecConfig("medusa"))


def test_auto_takes_head_trees_when_they_pay_and_stays_exact(medusa_engine, free_trees, target_path):
    prompt = random_prompt(90)
    ref = greedy_reference(target_path, prompt, 30)
    got = medusa_engine.generate(prompt, max_tokens=30, sampling=SamplingConfig(temperature=0),
                                 spec=SpecConfig("auto"))
    assert first_divergence(got.tokens, ref) is None
    assert got.stats.controller["plans"].get("medusa", 0) > 0


def test_sampled_medusa_follows_the_target_distribution(medusa_engine, free_trees, target_path, monkeypatch):
    from test_engine import exact_first_two, sample_first_two
    prompt = random_prompt(91, 6)
    exact = exact_first_two(target_path, prompt, 0.9, 0)
    monkeypatch.setattr(free_trees, "_learn", lambda *args: None)  # keep drafting full trees
    fix_costs(free_trees.costs, np.full(33, 1.0), monkeypatch)  # a second per verification: heads are free
    sampling = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    # round one is plain (it yields the hidden state); round two verifies a tree for token two
    stats = sample_first_two(medusa_engine, prompt, 20_000, sampling, SpecConfig("medusa"), exact, max_tokens=4)
    assert stats.draft_rounds >= 20_000


def test_fixed_tree_nodes_draft_that_many_whatever_the_cost(target_path, heads_path, monkeypatch):
    with Engine(target_path, None, target_config=CFG, heads=heads_path, tree_nodes=6) as eng:
        prompt = random_prompt(95)
        eng.prepare(SpecConfig("medusa"))  # calibrates
        medusa = eng.drafters["medusa"]
        fix_costs(eng.costs, [1.0] + [1e3] * 32, monkeypatch)
        sizes, propose = [], medusa.propose

        def spy(tokens, budget, *args):
            draft = propose(tokens, budget, *args)
            sizes.append((len(draft.tokens), budget))
            return draft

        monkeypatch.setattr(medusa, "propose", spy)
        got = eng.generate(prompt, max_tokens=30, sampling=SamplingConfig(temperature=0),
                           spec=SpecConfig("medusa", draft_max=16))
    assert first_divergence(got.tokens, greedy_reference(target_path, prompt, 30)) is None
    assert len(sizes) > 5 and all(n == min(6, budget) for n, budget in sizes[1:])  # round 1: no hidden state yet
    with pytest.raises(ValueError, match="tree nodes"):
        Engine(target_path, None, target_config=CFG, heads=heads_path, tree_nodes=33)


def test_head_trees_are_sized_by_the_cost_curve(medusa_engine, monkeypatch):
    """A GPU-like curve (flat to 8 rows) buys a tree from heads that are right 60% of the
    time at depth one; a CPU-like curve (each row costs 0.7 of a token) buys none."""
    medusa = medusa_engine.drafters["medusa"]
    medusa_engine.generate(random_prompt(97), max_tokens=2, spec=SpecConfig("medusa"))  # a hidden state
    monkeypatch.setattr(medusa, "acceptance", np.full_like(medusa.acceptance, 0.6) / np.arange(1, medusa.top_k + 1))
    monkeypatch.setattr(medusa, "head_seconds", 0.0)
    fix_costs(medusa.costs, [1.0] + [1.3] * 8 + [2.1] * 24, monkeypatch)
    gpu_nodes, _ = medusa.plan(32)
    fix_costs(medusa.costs, 1.0 + 0.7 * np.arange(33), monkeypatch)
    cpu_nodes, _ = medusa.plan(32)
    assert gpu_nodes >= 2 and cpu_nodes == 0


def test_auto_copy_trees_beside_heads_leave_the_heads_estimates_alone(medusa_engine, target_path, monkeypatch):
    """With heads loaded, `auto` may verify a tree of copied continuations: the heads see
    its verification (their hidden state follows every round) and learn nothing from it."""
    medusa, auto = medusa_engine.drafters["medusa"], medusa_engine.drafters["auto"]
    monkeypatch.setattr(medusa, "plan", lambda budget, tokens=(): (0, 0.0))  # no head trees: copies only
    fix_costs(medusa_engine.costs, np.full(33, 1.0), monkeypatch)  # a tree costs what one row does
    before = medusa.acceptance.copy()
    base = random_prompt(99, 8)
    prompt = base + [5] + base + [6] + base + [7] + base  # the same text three times, going on differently
    got = medusa_engine.generate(prompt, max_tokens=12, sampling=SamplingConfig(temperature=0),
                                 spec=SpecConfig("auto"))
    assert any(not isinstance(p, str) and p.paths > 1 for p in auto.plans)
    np.testing.assert_array_equal(medusa.acceptance, before)
    assert first_divergence(got.tokens, greedy_reference(target_path, prompt, 12)) is None


def test_typical_acceptance_on_the_command_line_goes_with_heads_only(target_path, heads_path):
    from test_cli import TINY, invoke
    base = ["run", "-m", target_path, "--no-draft", *TINY, "-n", "6", "-t", "0.8", "-s", "1", "--json"]
    got = invoke(*base, "--heads", heads_path, "--method", "medusa", "--typical", "hello")
    assert got.exit_code == 0, got.output
    assert invoke(*base, "--heads", heads_path, "--method", "auto", "--typical", "hello").exit_code == 0
    refused = invoke(*base, "--heads", heads_path, "--method", "lookup", "--typical", "hello")
    assert refused.exit_code != 0 and "--typical applies to Medusa and EAGLE trees, not to method lookup" in refused.stderr


def test_medusa_heads_given_as_a_model_are_named_in_one_line(target_path, heads_path):
    from test_cli import TINY, assert_one_line_error, invoke
    for args in (["run", "-m", heads_path, *TINY, "hello"], ["run", "-m", target_path, "-d", heads_path, *TINY, "hello"],
                 ["info", heads_path]):
        assert_one_line_error(invoke(*args), "holds Medusa heads for a target model", "--heads FILE")
