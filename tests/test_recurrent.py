"""Targets and drafts whose memory is a recurrent state (tiny Mamba and LFM2 models): a
rejected draft is undone through llama.cpp's rollback slots (LFM2) or by restoring a
saved state and replaying the kept tokens (Mamba; LFM2 without slots), and the output
stays exactly the target's."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig
from ggspec.backend import Context, Model
from ggspec.controller import AcceptanceModel, CostModel, best_plan
from reference import assert_same_logits, first_divergence, greedy_reference
from test_engine import exact_first_two, make_verification_cheap, random_prompt, sample_first_two
from tinymodels import VOCAB, write_tiny_recurrent

GREEDY = SamplingConfig(temperature=0)
CFG = BackendConfig(n_ctx=512, n_batch=64, n_threads=1)
ARCHS = ("mamba", "lfm2")


@pytest.fixture(scope="module")
def models(tiny_dir) -> dict[str, str]:
    """arch -> target path, and arch + "-draft" -> a draft for it (the target plus noise)."""
    out = {}
    for arch in ARCHS:
        out[arch] = str(write_tiny_recurrent(tiny_dir / f"{arch}.gguf", arch))
        out[f"{arch}-draft"] = str(write_tiny_recurrent(tiny_dir / f"{arch}-draft.gguf", arch, noise=0.15))
    return out


@pytest.fixture(scope="module")
def engines(models):
    """arch -> an engine with that recurrent target and its recurrent draft."""
    with Engine(models["mamba"], models["mamba-draft"], target_config=CFG, progress=False) as m, \
            Engine(models["lfm2"], models["lfm2-draft"], target_config=CFG, progress=False) as l:
        yield {"mamba": m, "lfm2": l}


def test_recurrent_and_hybrid_models_are_detected_at_load(models, target_path):
    with Model(models["mamba"]) as mamba, Model(models["lfm2"]) as lfm2, Model(target_path) as llama:
        assert mamba.recurrent and lfm2.recurrent and not llama.recurrent
        # llama.cpp offers rollback slots for LFM2, not for Mamba
        with Context(mamba, CFG, rollback=4) as a, Context(lfm2, CFG, rollback=4) as b:
            assert (a.n_rs_seq, b.n_rs_seq) == (0, 4)
        with pytest.raises(ValueError, match="recurrent state, which cannot branch"):
            Context(mamba, CFG, n_seq_max=2)


def fresh_logits(model: Model, tokens: list[int]) -> np.ndarray:
    with Context(model, CFG) as ctx:
        return ctx.eval(tokens, logits="last")[0].copy()


@pytest.mark.parametrize("arch,rollback", [("mamba", 0), ("mamba", 8), ("lfm2", 0), ("lfm2", 8)])
def test_a_partially_accepted_draft_leaves_the_state_of_a_fresh_prefill(models, arch, rollback):
    """Verify k drafts, keep the pending token and a of them: the next token's logits
    equal a fresh context's on the same tokens."""
    tokens = random_prompt(1, 60)
    with Model(models[arch]) as model, Context(model, CFG, rollback=rollback) as ctx:
        ctx.eval(tokens[:20], logits="none")
        for k, a in [(5, 2), (5, 0), (5, 5), (3, 1), (1, 0), (8, 7), (6, 3)]:
            n = len(ctx.tokens)
            ctx.checkpoint(k + 1, 1)
            saved = ctx._saved_at == n
            # LFM2 with slots rolls back without saving; everything else saves
            assert saved == (rollback == 0 or arch == "mamba")
            ctx.eval(tokens[n:n + k + 1], logits="all")
            ctx.truncate(n + a + 1)
            assert ctx.tokens == tokens[:n + a + 1]
            got = ctx.eval([tokens[n + a + 1]], logits="last")[0].copy()
            want = fresh_logits(model, tokens[:n + a + 2])
            assert_same_logits(got, want, err_msg=f"k={k} a={a}")


@pytest.mark.parametrize("arch", ARCHS)
def test_cutting_where_nothing_was_saved_replays_from_the_start(models, arch):
    tokens = random_prompt(2, 40)
    with Model(models[arch]) as model, Context(model, CFG) as ctx:
        ctx.eval(tokens, logits="none")
        assert ctx.sync(tokens[:25] + [7, 8]) == 25  # no state was saved: cleared and replayed
        got = ctx.eval([tokens[25]], logits="last")[0].copy()
        assert_same_logits(got, fresh_logits(model, tokens[:26]))


@pytest.mark.parametrize("method", ["lookup", "draft", "auto"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_equals_plain_greedy_decoding(engines, models, arch, method, monkeypatch):
    engine = engines[arch]
    prompt = [VOCAB.bos_id] + random_prompt(5, 12)[1:] * 4  # repeats, for lookup
    if method == "auto":
        engine.prepare(SpecConfig("auto"))  # calibrates
        make_verification_cheap(engine.drafters["auto"], monkeypatch)
    rejected = 0
    for seed, p in enumerate([prompt, random_prompt(6), random_prompt(7)]):
        ref = greedy_reference(models[arch], p, 60)
        got = engine.generate(p, max_tokens=60, sampling=GREEDY, spec=SpecConfig(method, draft_max=6))
        assert first_divergence(got.tokens, ref) is None, f"prompt {seed}: {first_divergence(got.tokens, ref)}"
        rejected += got.stats.draft_tokens - got.stats.accepted_tokens
    assert rejected > 0, "no draft was rejected: nothing was undone"


def test_a_recurrent_draft_model_for_an_attention_target(target_path, models):
    """The draft model's own state is undone after each rejection, too."""
    with Engine(target_path, models["mamba"], target_config=CFG, progress=False) as engine:
        for seed in range(3):
            prompt = random_prompt(20 + seed)
            ref = greedy_reference(target_path, prompt, 40)
            got = engine.generate(prompt, max_tokens=40, sampling=GREEDY, spec=SpecConfig("draft", draft_max=4))
            assert got.stats.draft_tokens > got.stats.accepted_tokens
            assert first_divergence(got.tokens, ref) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_tokens_follow_the_target_distribution(engines, models, arch):
    n = 10_000
    prompt = random_prompt(14, 6)  # no outcome above 0.5 here, for both models: many rejections
    sampling = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    exact = exact_first_two(models[arch], prompt, 0.9, 0)
    stats = sample_first_two(engines[arch], prompt, n, sampling, SpecConfig("draft", draft_max=3), exact)
    assert stats.draft_tokens - stats.accepted_tokens > n / 10  # many rejections were undone


@pytest.mark.parametrize("arch", ARCHS)
def test_the_state_after_many_rejections_matches_a_fresh_prefill(engines, models, arch):
    engine = engines[arch]
    prompt = random_prompt(3)
    got = engine.generate(prompt, max_tokens=60, sampling=SamplingConfig(temperature=1.0, seed=4),
                          spec=SpecConfig("draft", draft_max=6))
    assert got.stats.draft_tokens - got.stats.accepted_tokens > 10
    committed = prompt + got.tokens
    assert engine.ctx.tokens == committed[:-1]
    cached = engine.ctx.eval([committed[-1]], logits="last")[0].copy()
    fresh = greedy_reference(models[arch], prompt, 1, forced=got.tokens).logits[0]
    assert_same_logits(cached, fresh)


def test_a_state_that_cannot_be_saved_falls_back_to_plain_decoding(models, monkeypatch, capfd):
    prompt = [VOCAB.bos_id] + random_prompt(5, 12)[1:] * 4
    ref = greedy_reference(models["mamba"], prompt, 40)
    with Engine(models["mamba"], None, target_config=CFG, progress=False) as engine:
        monkeypatch.setattr(llama_cpp, "llama_state_seq_get_data_ext", lambda *args: 0)
        got = engine.generate(prompt, max_tokens=40, sampling=GREEDY, spec=SpecConfig("lookup", draft_max=4))
        assert not engine.ctx.can_rewind
        again = engine.generate(prompt, max_tokens=40, sampling=GREEDY, spec=SpecConfig("lookup", draft_max=4))
    assert first_divergence(got.tokens, ref) is None and again.tokens == got.tokens
    assert again.stats.draft_tokens == 0
    err = capfd.readouterr().err
    assert err.count("could not save the recurrent state") == 1 and "decoding without drafts" in err


def test_a_state_llama_cpp_cannot_size_is_known_at_load(models, monkeypatch):
    monkeypatch.setattr(llama_cpp, "llama_state_seq_get_size_ext", lambda *args: 0)
    with Model(models["mamba"]) as model, Context(model, CFG) as ctx:
        assert not ctx.can_rewind


def test_tree_drafts_are_refused_for_a_recurrent_target(models):
    with pytest.raises(ValueError, match="no tree drafts"):
        Engine(models["mamba"], None, target_config=CFG, max_tree_paths=4, progress=False)


def costs_with_copies(state_copy: float, rollback: int = 0) -> CostModel:
    costs = CostModel(np.linspace(1.0, 2.0, 17) * 1e-2)  # t(1) = 10 ms ... t(17) = 20 ms
    costs.state_copy, costs.rollback = state_copy, rollback
    return costs


def test_expected_rewind_cost_by_chain_length():
    chances = np.array([0.9, 0.5, 0.8])
    costs = costs_with_copies(0.004)
    t = costs.t_verify(np.arange(1, 4))
    # exactly a accepted, a < k: (1 - 0.9), 0.9 (1 - 0.5), 0.45 (1 - 0.8)
    stop = np.array([0.1, 0.45, 0.09])
    want = [0.0] + [0.004 + np.sum(stop[:k] * (0.004 + t[:k])) for k in (1, 2, 3)]
    np.testing.assert_allclose(costs.t_rewind(chances), want)
    assert np.all(costs_with_copies(0.0).t_rewind(chances) == 0)
    # rollback slots undo chains of up to 2 tokens for free
    np.testing.assert_allclose(costs_with_copies(0.004, rollback=2).t_rewind(chances), [0, 0, 0, want[3]])


def test_the_controller_drafts_less_when_undoing_costs_more():
    model = AcceptanceModel(0.6, 16)
    lookup = np.full(8, 0.6)
    free, _ = best_plan(costs_with_copies(0.0), lookup, model, 8)
    cheap, _ = best_plan(costs_with_copies(0.001), lookup, model, 8)
    dear, _ = best_plan(costs_with_copies(0.05), lookup, model, 8)
    assert free.total >= cheap.total > 0
    assert dear.total == 0  # a save per round costs more than a draft can win
