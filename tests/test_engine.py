"""The engine on tiny generated models: exactness against plain llama.cpp decoding,
rollback, stopping, errors."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from ggspec import (BackendConfig, BusyError, ContextOverflowError, Engine, ModelFileError,
                    SamplingConfig, SpecConfig, Stats, VocabMismatchError)
from reference import assert_same_logits, first_divergence, greedy_reference
from tinymodels import VOCAB, write_mismatched_vocab_llama, write_tiny_llama

GREEDY = SamplingConfig(temperature=0)
CFG = BackendConfig(n_ctx=512, n_batch=64, n_threads=1)


def random_prompt(seed: int, n: int = 16) -> list[int]:
    rng = np.random.default_rng(seed)
    return [VOCAB.bos_id] + [int(t) for t in rng.integers(300, VOCAB.n_vocab - 10, n)]


@pytest.fixture(scope="module")
def engine(target_path, draft_path):
    with Engine(target_path, draft_path, target_config=CFG) as e:
        yield e


@pytest.fixture(scope="module")
def far_engine(target_path, other_path):
    with Engine(target_path, other_path, target_config=CFG) as e:
        yield e


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("which", ["engine", "far_engine"])
def test_greedy_speculation_equals_plain_greedy_decoding(request, target_path, which, k):
    eng = request.getfixturevalue(which)
    for seed in range(4):
        prompt = random_prompt(100 * k + seed)
        ref = greedy_reference(target_path, prompt, 40)
        got = eng.generate(prompt, max_tokens=40, sampling=GREEDY, spec=SpecConfig("draft", draft_max=k))
        assert got.stats.draft_tokens > 0
        problem = first_divergence(got.tokens, ref)
        assert problem is None, f"K={k} seed={seed}: {problem}"


def make_verification_cheap(auto, monkeypatch):
    """Make the engine's cost model say that any batch costs one token's time (auto then
    drafts whatever has a chance), until the test ends."""
    t1 = float(auto.costs.t_verify(1))
    monkeypatch.setattr(auto.costs, "curve", np.full(auto.costs.max_rows, t1))
    monkeypatch.setattr(auto.costs, "correction", np.ones(auto.costs.max_rows))
    monkeypatch.setattr(auto.costs, "observe_verify", lambda *args: None)


@pytest.mark.parametrize("method", ["none", "lookup", "auto"])
def test_other_methods_equal_plain_greedy_decoding(engine, target_path, method, monkeypatch):
    # a repetitive prompt so that lookup finds matches
    prompt = [VOCAB.bos_id] + random_prompt(5, 12)[1:] * 4
    if method == "auto":
        engine.prepare(SpecConfig("auto"))  # calibrates
        make_verification_cheap(engine.drafters["auto"], monkeypatch)
    ref = greedy_reference(target_path, prompt, 60)
    got = engine.generate(prompt, max_tokens=60, sampling=GREEDY, spec=SpecConfig(method, draft_max=6))
    assert first_divergence(got.tokens, ref) is None
    if method != "none":
        assert got.stats.draft_tokens > 0


def test_draft_p_min_stops_the_chain_before_the_first_token_the_draft_is_unsure_of(draft_path):
    """At temperature 0 a chain with draft_p_min is the fixed-K chain cut before its first
    token whose probability under the draft (softmax at T = 1) is below p_min: checked
    against the probabilities of a second context fed the same decodes."""
    from ggspec.backend import Context, Model
    from ggspec.drafters.model import ModelDrafter
    p_min, k, cuts = 0.6, 8, []
    with Model(draft_path) as draft, Context(draft, CFG) as ctx, Context(draft, CFG) as ref:
        drafter = ModelDrafter(ctx)
        for seed in range(12):
            prompt = random_prompt(seed)
            drafter.p_min = 0.0
            full = drafter.propose(prompt, k, GREEDY, np.random.default_rng(0)).tokens
            assert len(full) == k
            ref.truncate(0)
            logits = ref.eval(prompt, logits="last")[0]
            tops = []
            for token in full:
                tops.append(1 / np.exp(logits.astype(np.float64) - logits.max()).sum())
                logits = ref.eval([token], logits="last")[0]
            drafter.p_min = p_min
            cut = next((i for i, top in enumerate(tops) if top < p_min), k)
            assert drafter.propose(prompt, k, GREEDY, np.random.default_rng(0)).tokens == full[:cut], seed
            cuts.append(cut)
    assert min(cuts) < k and max(cuts) > 0, cuts  # the threshold cut some chains, not all at once


def test_draft_p_min_is_method_drafts_alone(engine, target_path):
    """A draft_p_min keeps the greedy answer, drafts less than the fixed K, and applies
    to method draft only: auto's draft-model chains are sized by its controller."""
    prompt = random_prompt(21)
    ref = greedy_reference(target_path, prompt, 40)
    fixed = engine.generate(prompt, max_tokens=40, sampling=GREEDY, spec=SpecConfig("draft", draft_max=4))
    unsure = engine.generate(prompt, max_tokens=40, sampling=GREEDY,
                             spec=SpecConfig("draft", draft_max=4, draft_p_min=0.9))
    assert first_divergence(fixed.tokens, ref) is None and first_divergence(unsure.tokens, ref) is None
    assert unsure.stats.draft_tokens < fixed.stats.draft_tokens
    assert engine.drafters["draft"].p_min == 0.9
    engine.generate(prompt, max_tokens=4, sampling=GREEDY, spec=SpecConfig("auto", draft_p_min=0.9))
    assert engine.drafters["draft"].p_min == 0.0


def test_draft_equal_to_target_accepts_every_draft_token(target_path):
    with Engine(target_path, target_path, target_config=CFG) as eng:
        got = eng.generate(random_prompt(1), max_tokens=50, sampling=GREEDY, spec=SpecConfig("draft", draft_max=5))
    assert got.stats.draft_tokens >= 40
    assert got.stats.accepted_tokens == got.stats.draft_tokens
    assert got.stats.position_accepted == got.stats.position_proposed


def test_kv_cache_after_many_rejections_matches_a_fresh_prefill(far_engine, target_path):
    prompt = random_prompt(3)
    got = far_engine.generate(prompt, max_tokens=60, sampling=SamplingConfig(temperature=1.0, seed=4),
                              spec=SpecConfig("draft", draft_max=6))
    assert got.stats.draft_tokens - got.stats.accepted_tokens > 20
    committed = prompt + got.tokens
    ctx = far_engine.ctx
    assert ctx.tokens == committed[:-1]
    cached = ctx.eval([committed[-1]], logits="last")[0].copy()
    # the reference feeds the committed tokens one per decode, as plain decoding would
    fresh = greedy_reference(target_path, prompt, 1, forced=got.tokens).logits[0]
    assert_same_logits(cached, fresh)


END = VOCAB.n_vocab  # outcome "generation ended": an end-of-generation token, or none left
# (for a target with a larger vocabulary, the outcome after its last token)


def exact_first_two(target_path, prompt, temperature, top_k):
    """Exact marginals of the first two outcomes under softmax(top-k(l) / T), with every
    end-of-generation token folded into the outcome n_vocab (and that again after it)."""
    def warp(logits):
        keep = np.argsort(logits)[::-1][:top_k] if top_k else np.arange(len(logits))
        p = np.zeros(len(logits) + 1)
        z = logits[keep] / temperature
        p[keep] = np.exp(z - z.max())
        p[-1] = p[list(VOCAB.eog_ids)].sum()
        p[list(VOCAB.eog_ids)] = 0
        return p / p.sum()

    p1 = warp(greedy_reference(target_path, prompt, 1).logits[0])
    p2 = np.zeros_like(p1)
    end = len(p1) - 1
    p2[end] = p1[end]
    for x in np.flatnonzero(p1[:end]):
        p2 += p1[x] * warp(greedy_reference(target_path, prompt + [int(x)], 1).logits[0])
    return p1, p2


@pytest.mark.parametrize("method,top_k", [("draft", 0), ("lookup", 8), ("none", 0)])
def test_sampled_tokens_follow_the_target_distribution(engine, target_path, method, top_k):
    n = 20_000
    base = random_prompt(9, 6)
    # lookup drafts only where the suffix repeats: repeat the prompt so it always drafts
    prompt = base + base[1:] if method == "lookup" else base
    sampling = dict(temperature=0.9, top_k=top_k, top_p=1.0, min_p=0.0)
    p1, p2 = exact_first_two(target_path, prompt, 0.9, top_k)
    stats = sample_first_two(engine, prompt, n, sampling, SpecConfig(method, draft_max=3), (p1, p2))
    assert stats.draft_tokens > n / 2 if method != "none" else stats.draft_tokens == 0


def test_sampled_tokens_follow_the_target_distribution_when_the_draft_stops_unsure(engine, target_path):
    """With draft_p_min the draft stops by its own distribution q alone, before drawing
    on: the tokens it keeps are still draws from q, as speculative sampling needs. Here its
    first token is always confident enough and the second depends on the first."""
    n = 20_000
    prompt = random_prompt(9, 6)
    sampling = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    exact = exact_first_two(target_path, prompt, 0.9, 0)
    spec = SpecConfig("draft", draft_max=3, draft_p_min=0.35)
    sample_first_two(engine, prompt, n, sampling, spec, exact, max_tokens=4)

    def drafted(spec):
        return sum(engine.generate(prompt, max_tokens=4, spec=spec, sampling=SamplingConfig(**sampling, seed=seed))
                   .stats.draft_tokens for seed in range(500))

    assert 0 < drafted(spec) < drafted(SpecConfig("draft", draft_max=3))  # it stopped some chains, not all


def sample_first_two(engine, prompt, n, sampling: dict, spec, exact, *, seeded: bool = True,
                     max_tokens: int = 2) -> Stats:
    """Generate n times (seeds 0..n-1, or unseeded); check the first two outcomes'
    frequencies against the exact marginals; return the summed stats."""
    end = len(exact[0]) - 1
    counts = np.zeros((2, end + 1))
    total = Stats()
    for seed in range(n):
        got = engine.generate(prompt, max_tokens=max_tokens, spec=spec,
                              sampling=SamplingConfig(**sampling, seed=seed if seeded else None))
        outcomes = (got.tokens + [end, end])[:2]
        counts[0, outcomes[0]] += 1
        counts[1, outcomes[1]] += 1
        total = total + got.stats
    for row, p in zip(counts / n, exact):
        assert np.all(row[p == 0] == 0), "a sample fell outside the target's support"
        assert_frequencies_match(row, p, n)
    return total


def assert_frequencies_match(freq: np.ndarray, p: np.ndarray, n: int) -> None:
    """Each outcome expected at least 10 times, and all rarer outcomes pooled into one
    bin, lies within 6 sigma of its exact probability (the normal approximation of the
    binomial is poor for outcomes expected only a few times)."""
    common = n * p >= 10
    f = np.append(freq[common], freq[~common].sum())
    q = np.append(p[common], p[~common].sum())
    sigma = np.sqrt(q * (1 - q) / n)
    z = np.abs(f - q) / np.maximum(sigma, 1 / n)
    assert z.max() < 6, f"{z.max():.1f} sigma off the exact target probability"


@pytest.mark.parametrize("method", ["auto", "draft", "lookup", "none"])
def test_seeded_runs_are_reproducible(engine, method):
    prompt = random_prompt(11)

    def run(seed):
        return engine.generate(prompt, max_tokens=30, sampling=SamplingConfig(temperature=1.0, seed=seed),
                               spec=SpecConfig(method, draft_max=4)).tokens

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_with_a_seed_auto_and_lookup_commit_what_plain_sampling_does(engine):
    prompt = [VOCAB.bos_id] + random_prompt(21, 10)[1:] * 3
    sampling = SamplingConfig(temperature=0.8, seed=3)
    plain = engine.generate(prompt, max_tokens=40, sampling=sampling, spec=SpecConfig("none"))
    for method in ("auto", "lookup"):
        got = engine.generate(prompt, max_tokens=40, sampling=sampling, spec=SpecConfig(method))
        assert got.tokens == plain.tokens, method


@pytest.fixture(scope="module")
def eog_model(tiny_dir, target_path):
    """The target, changed to end the answer right after the token that greedy decoding of
    random_prompt(12) writes at position 7; returns (path, prompt, where that token first
    comes in the answer)."""
    prompt = random_prompt(12)
    tokens = greedy_reference(target_path, prompt, 20).tokens
    path = write_tiny_llama(tiny_dir / "eog.gguf", seed=0, eog_after=[tokens[7]])
    return str(path), prompt, tokens.index(tokens[7])


def test_end_of_generation_token_stops(eog_model, target_path):
    path, prompt, first = eog_model
    ref = greedy_reference(target_path, prompt, 20)
    with Engine(path, path, target_config=CFG) as eng:
        got = eng.generate(prompt, max_tokens=40, sampling=GREEDY, spec=SpecConfig("draft", draft_max=4))
    assert got.finish_reason == "stop"
    assert got.tokens == ref.tokens[:first + 1]
    # every draft is accepted (the draft model is the target), but drafts past the end are not output
    stats = got.stats
    assert stats.accepted_tokens < len(got.tokens) and sum(stats.position_accepted) == stats.accepted_tokens


@pytest.mark.parametrize("method", ["none", "lookup", "draft", "auto"])
def test_ignore_eos_generates_past_the_end_as_masked_greedy_decoding(eog_model, method):
    path, prompt, first = eog_model
    stopped = greedy_reference(path, prompt, 40)
    ref = greedy_reference(path, prompt, 40, ignore_eog=True)
    assert len(stopped.tokens) == first + 1 and len(ref.tokens) == 40  # the model would end there
    sampling = SamplingConfig(temperature=0, ignore_eos=True)
    # the draft model is the target itself: masked like the target, it proposes no end token
    with Engine(path, path, target_config=CFG) as eng:
        got = eng.generate(prompt, max_tokens=40, sampling=sampling, spec=SpecConfig(method, draft_max=4))
        ended = eng.generate(prompt, max_tokens=40, sampling=GREEDY, spec=SpecConfig(method, draft_max=4))
    assert ended.finish_reason == "stop" and ended.tokens == stopped.tokens
    assert got.finish_reason == "length"
    assert first_divergence(got.tokens, ref) is None
    if method == "draft":
        assert got.stats.draft_tokens > 0 and got.stats.accepted_tokens == got.stats.draft_tokens


@pytest.mark.parametrize("method", ["none", "draft"])
def test_ignore_eos_samples_from_the_target_without_its_end_tokens(eog_model, method):
    path, prompt, first = eog_model
    at_end = prompt + greedy_reference(path, prompt, first + 1).tokens  # the end token is next
    logits = greedy_reference(path, at_end, 1).logits[0]
    assert np.argmax(logits) in VOCAB.eog_ids
    logits[list(VOCAB.eog_ids)] = -np.inf
    p = np.exp((logits - logits.max()) / 0.9)
    p /= p.sum()
    n = 4000
    counts = np.zeros(len(p))
    sampling = SamplingConfig(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, ignore_eos=True)
    drafted = 0
    with Engine(path, path, target_config=CFG) as eng:
        for seed in range(n):
            got = eng.generate(at_end, max_tokens=3, sampling=replace(sampling, seed=seed),
                               spec=SpecConfig(method, draft_max=2))
            counts[got.tokens[0]] += 1
            drafted += got.stats.draft_tokens
    assert_frequencies_match(counts / n, p, n)
    assert drafted > n if method == "draft" else drafted == 0


@pytest.mark.parametrize("method", ["none", "draft"])
def test_stop_string_spanning_tokens_ends_the_text(target_path, method):
    # the target drafts for itself: every draft is accepted, so the stop string ends
    # inside a round's accepted tokens
    with Engine(target_path, target_path, target_config=CFG) as engine:
        prompt = random_prompt(13)
        full = engine.generate(prompt, max_tokens=40, sampling=GREEDY)
        pieces = [engine.target.token_bytes(t).decode() for t in full.tokens]
        start = len("".join(pieces[:10]))
        stop = full.text[start - 2:start + 3]  # spans the boundary between tokens 9 and 10
        got = engine.generate(prompt, max_tokens=40, sampling=GREEDY, stop=[stop],
                              spec=SpecConfig(method, draft_max=6))
        ends = next(n for n in range(len(full.tokens)) if stop in engine.target.detokenize(full.tokens[:n]))
    assert got.finish_reason == "stop"
    assert got.text == full.text[:full.text.index(stop)]
    assert stop not in got.text
    assert got.tokens == full.tokens[:ends]  # up to the token that completes the stop string
    committed = got.stats.accepted_tokens + got.stats.rounds
    assert committed == len(got.tokens) if method == "none" else committed > len(got.tokens)  # (mid-round)


def test_max_tokens_and_stream_pieces(engine):
    prompt = random_prompt(14)
    gen = engine.stream(prompt, max_tokens=25, sampling=GREEDY)
    pieces = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as done:
            result = done.value
            break
    assert result.finish_reason == "length"
    assert len(result.tokens) == 25
    assert "".join(pieces) == result.text == engine.target.detokenize(result.tokens)


def test_callback_can_stop_and_keeps_what_was_generated(engine):
    seen = []
    got = engine.generate(random_prompt(15), max_tokens=100, sampling=GREEDY,
                          on_text=lambda piece: seen.append(piece) or len(seen) >= 5)
    assert got.finish_reason == "cancelled"
    assert 5 <= len(got.tokens) < 100
    assert got.text == "".join(seen)


def test_reaching_the_context_end_finishes_with_length(target_path, draft_path):
    with Engine(target_path, draft_path, target_config=BackendConfig(n_ctx=256, n_threads=1)) as eng:
        prompt = random_prompt(16, 230)
        got = eng.generate(prompt, max_tokens=100, sampling=GREEDY)
    assert got.finish_reason == "length"
    assert 0 < len(got.tokens) <= 256 - len(prompt) + 1


@pytest.mark.parametrize("method", ["lookup", "draft", "auto"])
def test_every_method_fills_the_context_as_plain_decoding_does(target_path, method):
    """At the context's end every method stops where plain decoding does: with the cache
    full (n_ctx tokens) and one more token drawn from its last row. The draft model is the
    target itself, so method draft's drafts are accepted up to the last cell."""
    cfg = BackendConfig(n_ctx=256, n_threads=1)
    prompt = random_prompt(16, 70)
    prompt = prompt + prompt[1:] * 2  # (repeats itself: lookup and auto draft up to the end)
    greedy = SamplingConfig(temperature=0, ignore_eos=True)
    with Engine(target_path, target_path, target_config=cfg) as eng:
        plain = eng.generate(prompt, max_tokens=100, sampling=greedy, spec=SpecConfig("none"))
        eng.ctx.truncate(0)
        got = eng.generate(prompt, max_tokens=100, sampling=greedy, spec=SpecConfig(method, draft_max=4))
    assert len(plain.tokens) == 256 + 1 - len(prompt) and plain.finish_reason == "length"
    assert got.tokens == plain.tokens and got.finish_reason == "length"
    if method == "draft":
        assert got.stats.accepted_tokens > 0


def test_prompt_longer_than_the_context_names_both_numbers(target_path):
    with Engine(target_path, None, target_config=BackendConfig(n_ctx=256)) as eng:
        with pytest.raises(ContextOverflowError, match=r"301 tokens.*256"):
            eng.generate(random_prompt(17, 300))


def test_second_caller_gets_busy_error_or_waits(engine):
    gen = engine.stream(random_prompt(18), max_tokens=10, sampling=GREEDY)
    next(gen)  # the first generation now holds the engine
    with pytest.raises(BusyError):
        engine.generate(random_prompt(19), max_tokens=2, wait=False)
    done = []
    waiter = threading.Thread(target=lambda: done.append(engine.generate(random_prompt(19), max_tokens=2)))
    waiter.start()
    waiter.join(0.2)
    assert not done  # still waiting for the lock
    gen.close()
    waiter.join(10)
    assert done and len(done[0].tokens) == 2


@pytest.mark.parametrize("bad", [
    dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0), dict(seed=-3),
])
def test_invalid_sampling_parameters_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingConfig(**bad)


@pytest.mark.parametrize("bad", [dict(draft_max=0), dict(draft_max=100), dict(method="magic")])
def test_invalid_speculation_parameters_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SpecConfig(**bad)


def test_missing_model_file_names_the_path(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(ModelFileError, match="nope.gguf"):
        Engine(str(path), None)


def test_non_gguf_file_names_the_path(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello")
    with pytest.raises(ModelFileError, match="not a GGUF file.*notes.gguf"):
        Engine(str(path), None)


def test_truncated_model_file_names_the_path(tmp_path, target_path):
    path = tmp_path / "cut.gguf"
    data = open(target_path, "rb").read()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelFileError, match="cut.gguf"):
        Engine(str(path), None)


def test_draft_with_another_vocabulary_is_refused(tmp_path, target_path):
    path = write_mismatched_vocab_llama(tmp_path / "mismatch.gguf")
    with pytest.raises(VocabMismatchError, match=r"token \d+"):
        Engine(target_path, str(path))


def test_chat_messages_use_the_models_template(engine):
    messages = [{"role": "user", "content": "hello world"}]
    tokens = engine.tokenize(messages)
    expected = engine.target.tokenize("<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n")
    assert tokens == expected
    assert VOCAB.im_start_id in tokens


@pytest.mark.parametrize("pair,n", [("same vocabulary", 20_000), ("target larger", 10_000)])
def test_auto_without_a_seed_samples_the_target_distribution(request, pair, n, monkeypatch):
    """Unseeded auto drafts with speculative sampling: lookup tokens as one-hot q, then the
    draft model's own q. Force plans that draft every round and check the law."""
    engine = request.getfixturevalue({"same vocabulary": "engine", "target larger": "wide_target_engine"}[pair])
    target_path = str(engine.target.path)
    auto = engine.drafters["auto"]
    # "t t t" at the end: lookup proposes one token ("t"), which the draft model extends
    prompt = random_prompt(22, 6) + [400, 400, 400]
    engine.prepare(SpecConfig("auto"))  # calibrates
    costs = auto.costs
    t1 = float(costs.t_verify(1))
    monkeypatch.setattr(costs, "curve", np.full(costs.max_rows, t1))  # verifying costs one token
    monkeypatch.setattr(costs, "correction", np.ones(costs.max_rows))
    monkeypatch.setattr(costs, "scale", 1.0)
    monkeypatch.setattr(costs, "draft_token", t1 / 10)
    monkeypatch.setattr(costs, "draft_row", 0.0)  # catching up on each new prompt costs nothing
    monkeypatch.setattr(auto.copy_acceptance, "chances", lambda length, kinds, where: np.full(len(kinds), 0.9))
    monkeypatch.setattr(auto.model_acceptance, "alpha", np.full_like(auto.model_acceptance.alpha, 0.9))
    for model in (costs, auto.copy_acceptance, auto.model_acceptance):  # and stays so
        for name in ("observe", "observe_verify", "observe_draft"):
            if hasattr(model, name):
                monkeypatch.setattr(model, name, lambda *args: None)
    exact = exact_first_two(target_path, prompt, 0.9, 0)
    sampling = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    stats = sample_first_two(engine, prompt, n, sampling, SpecConfig("auto", draft_max=2), exact,
                             seeded=False, max_tokens=3)
    assert stats.draft_tokens > n
    assert stats.controller["plans"].get("lookup=1,model=1", 0) > 0  # the last run drafted a mixed chain


@pytest.mark.parametrize("method", ["lookup", "auto"])
def test_long_copied_chains_equal_plain_greedy_decoding(engine, target_path, method, monkeypatch):
    """Copies followed over many rounds, drafted 15 at a time (auto with copying made to
    look sure and verification cheap), commit exactly the target's greedy tokens."""
    prompt = [VOCAB.bos_id] + random_prompt(31, 40)[1:] * 3
    if method == "auto":
        auto = engine.drafters["auto"]
        engine.prepare(SpecConfig("auto"))  # calibrates
        make_verification_cheap(auto, monkeypatch)
        monkeypatch.setattr(auto.copy_acceptance, "chances", lambda length, kinds, where: np.full(len(kinds), 0.99))
    ref = greedy_reference(target_path, prompt, 80)
    got = engine.generate(prompt, max_tokens=80, sampling=GREEDY, spec=SpecConfig(method, draft_max=15))
    assert first_divergence(got.tokens, ref) is None
    assert got.stats.draft_tokens > 0
    if method == "auto":
        assert max(n for n, count in enumerate(got.stats.position_proposed) if count) == 14  # 15-token chains


# Vocabularies of different sizes: llama.cpp pairs a draft with a target up to 128 tokens
# apart (Qwen2.5-7B has 152,064 tokens, the 0.5B draft 151,936). The extra tokens here are
# ordinary tokens that the larger model predicts like any other.
VOCAB_PAIRS = {"target larger": ("wide_target_path", "draft_path"),
               "draft larger": ("target_path", "wide_draft_path")}


@pytest.fixture(scope="module")
def wide_target_path(tiny_dir) -> str:
    """The target's weights for the shared vocabulary, and 64 more tokens."""
    return str(write_tiny_llama(tiny_dir / "wide-target.gguf", seed=0, extra_tokens=64))


@pytest.fixture(scope="module")
def wide_draft_path(tiny_dir, target_path) -> str:
    return str(write_tiny_llama(tiny_dir / "wide-draft.gguf", base=target_path, noise=0.1, seed=1, extra_tokens=64))


@pytest.fixture(scope="module")
def wide_target_engine(wide_target_path, draft_path):
    with Engine(wide_target_path, draft_path, target_config=CFG) as e:
        yield e


@pytest.mark.parametrize("pair", VOCAB_PAIRS)
def test_vocabularies_of_different_sizes_keep_greedy_exact(request, pair):
    target, draft = (request.getfixturevalue(name) for name in VOCAB_PAIRS[pair])
    extra_seen = 0
    with Engine(target, draft, target_config=CFG) as eng:
        assert abs(eng.target.n_vocab - eng.draft.n_vocab) == 64
        for method in ("draft", "auto"):
            for seed in range(12):
                prompt = random_prompt(300 + seed)
                ref = greedy_reference(target, prompt, 60)
                got = eng.generate(prompt, max_tokens=60, sampling=GREEDY, spec=SpecConfig(method, draft_max=4))
                problem = first_divergence(got.tokens, ref)
                assert problem is None, f"{method} seed={seed}: {problem}"
                extra_seen += sum(t >= VOCAB.n_vocab for t in got.tokens)
    if pair == "target larger":
        assert extra_seen > 0  # the draft had to read tokens it lacks


@pytest.mark.parametrize("pair", VOCAB_PAIRS)
def test_vocabularies_of_different_sizes_keep_the_target_distribution(request, pair):
    target, draft = (request.getfixturevalue(name) for name in VOCAB_PAIRS[pair])
    prompt = random_prompt(9, 6)
    sampling = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    exact = exact_first_two(target, prompt, 0.9, 0)
    with Engine(target, draft, target_config=CFG) as eng:
        stats = sample_first_two(eng, prompt, 20_000, sampling, SpecConfig("draft", draft_max=3), exact)
    assert stats.draft_tokens > 10_000


def test_a_draft_with_a_larger_vocabulary_never_proposes_a_token_the_target_lacks(target_path, wide_draft_path):
    from ggspec.backend import Context, Model
    from ggspec.drafters.model import ModelDrafter
    hot = SamplingConfig(temperature=3.0, top_k=0, top_p=1.0, min_p=0.0)
    with Model(wide_draft_path) as draft, Context(draft, CFG) as ctx:
        def proposed(drafter):
            rng = np.random.default_rng(0)
            drafts = [drafter.propose(random_prompt(seed), 4, hot, rng) for seed in range(50)]
            return [t for d in drafts for t in d.tokens], max(int(ids.max()) for d in drafts for ids, _ in d.q)

        tokens, top = proposed(ModelDrafter(ctx))  # the draft's own vocabulary
        assert max(tokens) >= VOCAB.n_vocab and top >= VOCAB.n_vocab
        tokens, top = proposed(ModelDrafter(ctx, n_vocab=VOCAB.n_vocab))  # the target's
        assert max(tokens) < VOCAB.n_vocab and top < VOCAB.n_vocab
