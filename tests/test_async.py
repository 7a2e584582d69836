"""Asynchronous drafting: the draft model drafts the next round in a worker thread while
the target verifies. Exactness as for the synchronous path, the worker's lifecycle, and
the controller's choice."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from click.testing import CliRunner

from ggspec import BackendConfig, DecodeError, Engine, SamplingConfig, SpecConfig
from ggspec.bench import Variant, async_split_variants
from ggspec.cli import cli
from ggspec.controller import EXPLORE_EVERY, Overlap
from reference import first_divergence, greedy_reference
from test_engine import END, assert_frequencies_match, exact_first_two, random_prompt

GREEDY = SamplingConfig(temperature=0)
CFG = BackendConfig(n_ctx=512, n_batch=64, n_threads=1)
AHEAD = "ggspec-draft-ahead"


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == AHEAD]


@pytest.fixture(scope="module")
def engine(target_path, draft_path):
    with Engine(target_path, draft_path, target_config=CFG) as e:
        yield e


@pytest.fixture(scope="module")
def far_engine(target_path, other_path):
    with Engine(target_path, other_path, target_config=CFG) as e:
        yield e


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("which", ["engine", "far_engine"])
def test_greedy_drafting_ahead_equals_plain_greedy_decoding(request, target_path, which, k):
    eng = request.getfixturevalue(which)
    ahead = used = 0
    for seed in range(4):
        prompt = random_prompt(100 * k + seed)
        ref = greedy_reference(target_path, prompt, 40)
        got = eng.generate(prompt, max_tokens=40, sampling=GREEDY,
                           spec=SpecConfig("draft", draft_max=k, async_draft=True))
        problem = first_divergence(got.tokens, ref)
        assert problem is None, f"K={k} seed={seed}: {problem}"
        ahead += got.stats.ahead_rounds
        used += got.stats.ahead_drafts
    assert ahead > 20
    if which == "engine" and k <= 2:
        assert used > 5  # the worker's drafts were used, not only thrown away
    assert not workers()


def test_sampled_tokens_drafted_ahead_follow_the_target_distribution(engine, target_path):
    """K=1, 4 tokens: the first round verifies d1 while the worker drafts the draft
    model's guess g for the target's next token and then e1; when d1 is accepted and the
    target's token is g, round two verifies e1 with the q it was drawn from. Given the
    first token, the next two must follow the target exactly."""
    n = 20_000
    prompt = random_prompt(9, 6)
    sampling = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    spec = SpecConfig("draft", draft_max=1, async_draft=True)
    used = 0
    outcomes = np.zeros((n, 3), dtype=int)  # END: generation ended before
    for seed in range(n):
        got = engine.generate(prompt, max_tokens=4, spec=spec, sampling=SamplingConfig(**sampling, seed=seed))
        outcomes[seed] = (got.tokens + [END] * 3)[:3]
        used += got.stats.ahead_drafts
    first = np.bincount(outcomes[:, 0][outcomes[:, 0] != END]).argmax()
    given = outcomes[outcomes[:, 0] == first]
    assert used > n / 20 and len(given) > 1000
    p2, p3 = exact_first_two(target_path, prompt + [int(first)], 0.9, 0)
    for col, p in ((1, p2), (2, p3)):
        freq = np.bincount(given[:, col], minlength=len(p)) / len(given)
        assert np.all(freq[p == 0] == 0), "a sample fell outside the target's support"
        assert_frequencies_match(freq, p, len(given))
