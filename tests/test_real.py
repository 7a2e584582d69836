"""End to end on the real default pair (Qwen2.5-Coder 1.5B target, 0.5B draft), pulled
through the registry on first use. About a minute on a 2-core CPU."""

from __future__ import annotations

import pytest

from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig, hub
from reference import first_divergence, greedy_reference

pytestmark = pytest.mark.real

# batched and single-token Q4_K_M kernels round differently (measured on a 2-core x86 CPU: the
# logit gap between two top-5 tokens moves by 0.13 median, 0.41 max): an argmax whose top-2
# logit gap is below this may flip between them, and then the continuations may part
REAL_NEAR_TIE = 0.5
MEDUSA_TOKENS_PER_ROUND = 1.4  # shipped heads, 8-node trees: measured 1.96 here (earlier heads: 1.41)
EAGLE_TOKENS_PER_ROUND = 1.3  # shipped EAGLE-3 draft, 16-node trees: measured 1.64 on bench code
PROMPTS = {
    "code": "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.",
    "prose": "Explain in a short paragraph why the sky is blue.",
    "edit": "Rename the variable x to total in this code:\n\ndef f(items):\n    x = 0\n"
            "    for i in items:\n        x += i\n    return x\n",
}


@pytest.fixture(scope="module")
def engine():
    target, draft = hub.pull("qwen2.5-coder-1.5b"), hub.pull("qwen2.5-coder-0.5b")
    with Engine(str(target), str(draft), target_config=BackendConfig(n_ctx=1024)) as e:
        yield e


@pytest.mark.parametrize("name", PROMPTS)
def test_greedy_speculation_equals_plain_greedy_decoding(engine, name):
    prompt = engine.tokenize([{"role": "user", "content": PROMPTS[name]}])
    ref = greedy_reference(str(engine.target.path), prompt, 128, n_ctx=1024, n_threads=2)
    got = engine.generate(prompt, max_tokens=128, sampling=SamplingConfig(temperature=0),
                          spec=SpecConfig("draft", draft_max=4))
    problem = first_divergence(got.tokens, ref, REAL_NEAR_TIE)
    assert problem is None, f"{name}: {problem}"
    n_same = next((i for i, (a, b) in enumerate(zip(got.tokens, ref.tokens)) if a != b), len(got.tokens))
    print(f"{name}: {n_same}/{len(ref.tokens)} tokens identical before any near-tie; "
          f"acceptance {got.stats.acceptance_rate:.2f}")
    if name == "code":
        assert got.stats.acceptance_rate >= 0.6


@pytest.mark.parametrize("method,shipped,nodes,least", [
    ("medusa", dict(heads="default"), 8, MEDUSA_TOKENS_PER_ROUND),
    ("eagle", dict(eagle="default"), 16, EAGLE_TOKENS_PER_ROUND),
])
def test_shipped_heads_draft_trees_the_target_accepts(method, shipped, nodes, least):
    """Greedy decoding with the shipped Medusa heads (`--heads default`) or EAGLE-3 draft
    (`--eagle default`) and fixed-size trees equals plain greedy decoding, and commits
    clearly more than one token a round (heads that learnt nothing commit 1.0; `least` is
    below what the shipped files measured)."""
    target = hub.pull("qwen2.5-coder-1.5b")
    with Engine("qwen2.5-coder-1.5b", None, target_config=BackendConfig(n_ctx=1024),
                tree_nodes=nodes, **shipped) as e:
        prompt = e.tokenize([{"role": "user", "content": PROMPTS["code"]}])
        ref = greedy_reference(str(target), prompt, 96, n_ctx=1024, n_threads=2)
        e.prepare(SpecConfig(method, draft_max=nodes))  # (a first answer would take the timings in its rounds)
        got = e.generate(prompt, max_tokens=96, sampling=SamplingConfig(temperature=0),
                         spec=SpecConfig(method, draft_max=nodes))
    problem = first_divergence(got.tokens, ref, REAL_NEAR_TIE)
    assert problem is None, problem
    per_round = len(got.tokens) / got.stats.rounds
    print(f"{method}, {nodes}-node trees: {per_round:.2f} tokens per round")
    assert per_round >= least
