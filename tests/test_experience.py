"""What the controller learnt is remembered on disk: a new engine with the same model files
starts from it (ggspec.experience); other files, remember=False, or estimates that do not
fit leave the starting guesses."""

from __future__ import annotations

import json

import numpy as np

from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig, experience
from test_engine import random_prompt

CFG = BackendConfig(n_ctx=512, n_batch=64, n_threads=1)
GREEDY = SamplingConfig(temperature=0)


def _learn(engine: Engine) -> np.ndarray:
    """Answer a prompt that repeats itself with auto; the copy estimates it then holds."""
    prompt = random_prompt(3, 12) * 4
    engine.generate(prompt, max_tokens=24, sampling=GREEDY, spec=SpecConfig("auto"))
    return np.array(engine.drafters["auto"].copy_acceptance.p)


def test_a_new_engine_starts_from_what_the_last_one_learnt(target_path, draft_path, experience_store):
    with Engine(target_path, None, target_config=CFG) as first:
        fresh = np.array(first.drafters["auto"].copy_acceptance.p)
        learnt = _learn(first)
    assert not np.allclose(fresh, learnt)
    with Engine(target_path, None, target_config=CFG) as second:
        np.testing.assert_array_equal(second.drafters["auto"].copy_acceptance.p, learnt)
    with Engine(target_path, None, target_config=CFG, remember=False) as apart:
        np.testing.assert_array_equal(apart.drafters["auto"].copy_acceptance.p, fresh)
    with Engine(target_path, draft_path, target_config=CFG) as other:  # other files: other key
        np.testing.assert_array_equal(other.drafters["auto"].copy_acceptance.p, fresh)
    assert len(json.loads(experience_store.read_text())) == 1


def test_plain_decoding_stores_nothing_and_remember_false_writes_nothing(target_path, experience_store):
    with Engine(target_path, None, target_config=CFG) as eng:
        eng.generate(random_prompt(4), max_tokens=4, spec=SpecConfig("none"))
    assert not experience_store.exists()
    with Engine(target_path, None, target_config=CFG, remember=False) as eng:
        _learn(eng)
    assert not experience_store.exists()


def test_estimates_that_do_not_fit_are_ignored(target_path, experience_store):
    with Engine(target_path, None, target_config=CFG) as eng:
        fresh = np.array(eng.drafters["auto"].copy_acceptance.p)
        _learn(eng)
        key = eng.files_key
    data = json.loads(experience_store.read_text())
    data[key]["auto"]["copy_acceptance"]["p"] = [[0.5]]  # another shape
    experience_store.write_text(json.dumps(data))
    with Engine(target_path, None, target_config=CFG) as eng:
        np.testing.assert_array_equal(eng.drafters["auto"].copy_acceptance.p, fresh)
    experience_store.write_text("not json")
    with Engine(target_path, None, target_config=CFG) as eng:
        np.testing.assert_array_equal(eng.drafters["auto"].copy_acceptance.p, fresh)
        _learn(eng)  # and the unreadable file is replaced
    assert key in json.loads(experience_store.read_text())


def test_what_was_kept_for_files_that_are_gone_is_dropped(target_path, tmp_path, experience_store):
    gone = tmp_path / "gone.gguf"
    gone.write_bytes(b"x")
    experience_store.write_text(json.dumps({"old": {"files": [str(gone)], "auto": {}},
                                            "kept": {"files": [target_path], "auto": {}}}))
    gone.unlink()
    with Engine(target_path, None, target_config=CFG) as eng:
        _learn(eng)
        key = eng.files_key
    assert sorted(json.loads(experience_store.read_text())) == sorted(["kept", key])


def test_the_key_changes_with_the_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a")
    one = experience.key([f, None])
    f.write_bytes(b"ab")
    assert experience.key([f, None]) != one and experience.key([f, f]) != experience.key([f, None])


def test_what_generations_learn_is_stored_at_most_every_so_often_and_at_close(target_path, experience_store,
                                                                            monkeypatch):
    import ggspec.engine
    with Engine(target_path, None, target_config=CFG) as eng:
        _learn(eng)
        assert not experience_store.exists()  # no answer waits for a file write
        monkeypatch.setattr(ggspec.engine, "REMEMBER_EVERY", 0.0)
        learnt = _learn(eng)  # the first unstored generation is now old enough
        stored = json.loads(experience_store.read_text())[eng.files_key]["auto"]["copy_acceptance"]["p"]
        np.testing.assert_array_equal(stored, learnt)
        monkeypatch.setattr(ggspec.engine, "REMEMBER_EVERY", 3600.0)
        last = _learn(eng)
        assert not np.array_equal(last, learnt)
    stored = json.loads(experience_store.read_text())[eng.files_key]["auto"]["copy_acceptance"]["p"]
    np.testing.assert_array_equal(stored, last)  # stored when the engine closed
