"""tools/replay_auto.py's replay on a small synthetic recording: an answer that copies its
prompt and one that copies nothing, at a CPU-like curve."""

from __future__ import annotations

import json

import numpy as np
import pytest

from toolfiles import load_tool

replay_auto = load_tool("replay_auto")


def recording() -> dict:
    rng = np.random.default_rng(0)
    text = rng.integers(10, 500, size=150).tolist()
    curve = [1.0, 1.7, 2.3, 2.8, 3.5, 4.1, 4.8, 6.6, 7.0, 7.3, 7.6, 7.9, 8.2, 8.5, 8.8, 8.9, 9.5]
    return {"copy": {"prompt": [1, *text], "output": text[:120]},
            "new": {"prompt": [2, 3], "output": rng.integers(500, 1000, size=80).tolist()},
            "_curve": curve, "_line_ends": [], "_n_vocab": 1000}


def test_replay_gains_on_a_copy_and_keeps_level_on_new_text():
    ratios, means = replay_auto.replay(recording(), 16, 2)
    (copy, copy_known), (new, new_known) = ratios["copy"], ratios["new"]
    assert 1.3 < copy <= copy_known
    assert new == new_known == 1.0  # nothing to copy: every round plain
    assert len(means) == 1 and copy > means[0] > 1.0


def test_random_orders_are_seeded():
    data = recording()
    ratios, means = replay_auto.replay(data, 16, 2, orders=3, seed=1)
    assert len(means) == 3
    assert replay_auto.replay(data, 16, 2, orders=3, seed=1) == (ratios, means)


def test_each_order_starts_from_the_starting_guesses():
    """One answer in every order: the runs differ only if one carried what another learnt."""
    data = recording()
    del data["new"]
    means = replay_auto.replay(data, 16, 2, orders=3)[1]
    assert means[0] > 1.3 and means == [means[0]] * 3


def test_a_replay_can_start_from_stored_experience(tmp_path):
    """--experience: each answer starts from the copy estimates an engine stored (the latest
    entry), not the starting guesses; a file without them is refused with a message."""
    data = recording()
    del data["new"]
    learnt = replay_auto.AutoDrafter(replay_auto.CostModel(np.array(data["_curve"])), replay_auto.LookupDrafter(),
                                     None, np.zeros(data["_n_vocab"], dtype=bool))
    for _ in range(5):  # copies of the prompt held, again and again
        replay_auto.replay_answer(learnt, data["copy"], np.array(data["_curve"]), 16)
    path = tmp_path / "experience.json"
    old = {"copy_acceptance": replay_auto.MatchAcceptance().state()}
    path.write_text(json.dumps({"a": {"saved": 1.0, "auto": old}, "b": {"saved": 2.0, "auto": learnt.state()}}))
    start = replay_auto.stored_estimates(str(path))
    assert start == learnt.copy_acceptance.state()
    guessed = replay_auto.replay(data, 16, 1, fresh=True)[0]["copy"][0]
    experienced = replay_auto.replay(data, 16, 1, fresh=True, start=start)[0]["copy"][0]
    assert experienced > guessed
    path.write_text(json.dumps({"a": {"saved": 1.0, "files": []}}))
    with pytest.raises(SystemExit, match="holds no estimates"):
        replay_auto.stored_estimates(str(path))
    path.write_text(json.dumps({"a": {"saved": 1.0, "auto": {"copy_acceptance": {"p": [1.0]}}}}))
    with pytest.raises(SystemExit, match="do not fit"):
        replay_auto.stored_estimates(str(path))


def test_llama_cpp_ngram_cache_replays_copies_of_the_prompt_and_nothing_else():
    data = recording()
    curve = np.array(data["_curve"])
    assert replay_auto.ngram_cache(data["copy"], curve) > 1.2  # 3- and 4-grams seen once in the prompt draft
    assert replay_auto.ngram_cache(data["new"], curve) == 1.0  # nothing seen: every round plain


def test_llama_cpp_ngram_cache_never_counts_n_grams_across_two_updates():
    """As llama.cpp: each update counts the tokens added since the last on their own, so an
    answer that repeats itself one committed token at a time is never drafted (auto's
    lookup follows it)."""
    data = recording()
    loop = {"prompt": [2, 3], "output": [7, 8, 9, 4] * 20}
    assert replay_auto.ngram_cache(loop, np.array(data["_curve"])) == 1.0
    ratios, _ = replay_auto.replay({"loop": loop, **{k: v for k, v in data.items() if k.startswith("_")}}, 16, 1)
    assert ratios["loop"][0] > 1.2
    # the same repetition in the prompt is counted (one update) and drafted
    assert replay_auto.ngram_cache({"prompt": [2, 3, *[7, 8, 9, 4] * 3], "output": [7, 8, 9, 4] * 20},
                                   np.array(data["_curve"])) > 1.2
