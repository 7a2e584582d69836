"""The verification cost calibration: measured once, stored, reused, measured again when
anything that changes the costs changes (tiny models)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from ggspec import BackendConfig, calibration, machine
from ggspec.backend import Context, Model


COPYABLE = [1] + list(range(300, 312)) * 4  # a prompt that lookup copies from


@pytest.fixture
def store(tmp_path, monkeypatch):
    path = tmp_path / calibration.FILE
    monkeypatch.setattr(calibration, "_store", lambda: path)
    monkeypatch.setattr(machine, "busy_since", lambda before: [])  # whatever else runs meanwhile
    return path


@pytest.fixture
def measured(monkeypatch):
    """Count the real measurements."""
    calls = []
    real = calibration.measure

    def counting(ctx, rows, stop=None, survey=None):
        calls.append((ctx.model.path.name, rows))
        return real(ctx, rows, stop, survey)

    monkeypatch.setattr(calibration, "measure", counting)
    return calls


def curve_for(path, cfg=BackendConfig(n_ctx=256, n_threads=1), rows=5):
    with Model(path, cfg) as model, Context(model, cfg) as ctx:
        ctx.eval([1, 2, 3], logits="none")
        return calibration.verify_curve(ctx, rows, progress=False)


def test_measured_once_then_read_from_the_store(store, measured, target_path):
    first = curve_for(target_path)
    assert measured == [("target.gguf", 5)] and first.shape == (5,) and np.all(first > 0)
    again = curve_for(target_path, rows=3)  # fewer rows: the stored curve covers them
    assert len(measured) == 1
    np.testing.assert_array_equal(again, first[:3])
    assert len(json.loads(store.read_text())) == 1


def test_more_rows_than_stored_are_measured(store, measured, target_path):
    curve_for(target_path, rows=3)
    curve_for(target_path, rows=6)
    assert [rows for _, rows in measured] == [3, 6]


@pytest.mark.parametrize("change", ["threads", "gpu_layers", "flash_attn", "batch"])
def test_other_settings_are_measured_again(store, measured, target_path, change):
    base = BackendConfig(n_ctx=256, n_threads=1)
    other = {"threads": BackendConfig(n_ctx=256, n_threads=2),
             "gpu_layers": BackendConfig(n_ctx=256, n_threads=1, n_gpu_layers=0),
             "flash_attn": BackendConfig(n_ctx=256, n_threads=1, flash_attn=False),
             "batch": BackendConfig(n_ctx=256, n_threads=1, n_batch=64)}[change]
    curve_for(target_path, base)
    curve_for(target_path, other)
    curve_for(target_path, other)
    assert len(measured) == 2
    assert len(json.loads(store.read_text())) == 2


def test_a_changed_model_file_is_measured_again(store, measured, target_path, tmp_path):
    copy = tmp_path / "model.gguf"
    shutil.copy(target_path, copy)
    curve_for(copy)
    curve_for(copy)
    assert len(measured) == 1
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten
    curve_for(copy)
    assert len(measured) == 2


def test_another_llama_cpp_build_is_measured_again(store, measured, target_path, tmp_path, monkeypatch):
    """A llama.cpp library rebuilt with other compiler flags reports the same version and
    features, but may run other kernels (on a Xeon, AMX or not): its costs are its own."""
    curve_for(target_path)
    library = Path(llama_cpp._ggml.libggml._name)
    rebuilt = tmp_path / library.name
    shutil.copy(library, rebuilt)
    monkeypatch.setattr(llama_cpp._ggml.libggml, "_name", str(rebuilt))
    curve_for(target_path)
    curve_for(target_path)
    assert len(measured) == 2
    assert len(json.loads(store.read_text())) == 2


def test_a_calibration_taken_while_the_machine_is_busy_is_not_stored(store, measured, target_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setattr(machine, "busy_since", lambda before: ["make (42): 99%"])
    curve_for(target_path)
    assert not store.exists()
    assert "not saving the calibration" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": {"seconds": "fast"}}'])
def test_a_damaged_store_is_ignored_and_rewritten(store, measured, target_path, content):
    store.write_text(content)
    curve_for(target_path)
    curve_for(target_path)
    assert len(measured) == 1
    assert isinstance(json.loads(store.read_text()), dict)


def test_an_engine_reuses_the_stored_calibration(store, measured, target_path):
    from ggspec import Engine, SamplingConfig, SpecConfig
    cfg = BackendConfig(n_ctx=256, n_threads=1)
    for _ in range(2):  # the first engine measures; the second starts from the stored curve
        with Engine(target_path, None, target_config=cfg, progress=False) as eng:
            eng.prepare(SpecConfig("auto", 4))
            eng.generate(COPYABLE, max_tokens=3, sampling=SamplingConfig(temperature=0, ignore_eos=True),
                         spec=SpecConfig("auto", 4))
            assert eng.costs.survey is None and eng.costs.max_rows == 5
    assert measured == [("target.gguf", 5)] and len(json.loads(store.read_text())) == 1


def test_every_size_is_timed_in_each_pass_and_its_fastest_kept(target_path, monkeypatch):
    """Each size alike (t(1) too): PASSES timings, up then down, the fastest kept. Here a
    decode of b rows takes b seconds on a clock that adds 10 s to every first-pass timing."""
    cfg = BackendConfig(n_ctx=256, n_threads=1)
    with Model(target_path, cfg) as model, Context(model, cfg) as ctx:
        ctx.eval([1, 2, 3], logits="none")
        sizes, clock = [], [0.0]
        real_eval = ctx.eval

        def fake_eval(tokens, logits="last"):
            sizes.append(len(tokens))
            clock[0] += len(tokens) + (10.0 if len(sizes) <= 1 + 5 else 0.0)  # warm-up + first pass
            return real_eval(tokens, logits=logits)

        monkeypatch.setattr(ctx, "eval", fake_eval)
        monkeypatch.setattr(calibration.time, "perf_counter", lambda: clock[0])
        curve = calibration.measure(ctx, 5)
        assert ctx.tokens == [1, 2, 3]
    assert calibration.PASSES == 2
    assert sizes == [1, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1]  # warm-up, up, down
    assert curve.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


def engine_corrections(target_path, monkeypatch, remember=True):
    """An engine's cost-model corrections after an auto generation during which no round
    corrected them (so they are what it started from)."""
    from ggspec import Engine, SamplingConfig, SpecConfig
    from ggspec.controller import CostModel
    monkeypatch.setattr(CostModel, "observe_verify", lambda self, rows, seconds: None)
    cfg = BackendConfig(n_ctx=256, n_threads=1)
    with Engine(target_path, None, target_config=cfg, progress=False, remember=remember) as eng:
        eng.prepare(SpecConfig("auto"))  # (rounds that observe nothing would never finish a survey)
        eng.generate([1, 5, 6, 7], max_tokens=3, sampling=SamplingConfig(temperature=0), spec=SpecConfig("auto"))
        return eng.costs.correction.copy()


def stored_entry(store):
    (entry,) = json.loads(store.read_text()).values()
    return entry


def store_corrections(store, target_path, monkeypatch, make):
    """Let an engine calibrate and store its curve, then replace the stored corrections by
    make(entry); returns what was stored."""
    engine_corrections(target_path, monkeypatch)
    data = json.loads(store.read_text())
    for entry in data.values():
        entry["correction"] = make(entry)
    store.write_text(json.dumps(data))
    return stored_entry(store)["correction"]


def test_the_cost_models_corrections_are_stored_and_the_next_engine_starts_from_them(store, target_path,
                                                                                     monkeypatch):
    first = engine_corrections(target_path, monkeypatch)
    entry = stored_entry(store)
    assert entry["correction"] == [1.0] * len(entry["seconds"]) and np.all(first == 1.0)
    refined = store_corrections(store, target_path, monkeypatch,  # (as rounds deep in a context would teach)
                                lambda e: np.linspace(0.9, 1.3, len(e["seconds"])).tolist())
    np.testing.assert_array_equal(engine_corrections(target_path, monkeypatch), refined)
    np.testing.assert_array_equal(stored_entry(store)["correction"], refined)


@pytest.mark.parametrize("bad", [[float("nan")] * 17, [1.0, 2.0], [-1.0] * 17, "x"])
def test_stored_corrections_that_do_not_fit_are_ignored(store, target_path, monkeypatch, bad):
    store_corrections(store, target_path, monkeypatch, lambda e: bad)
    assert np.all(engine_corrections(target_path, monkeypatch) == 1.0)


def test_an_engine_that_does_not_remember_neither_reads_nor_writes_corrections(store, target_path, monkeypatch):
    stored = store_corrections(store, target_path, monkeypatch, lambda e: [1.5] * len(e["seconds"]))
    assert np.all(engine_corrections(target_path, monkeypatch, remember=False) == 1.0)
    assert stored_entry(store)["correction"] == stored


def test_corrections_learnt_while_other_processes_were_busy_are_not_stored(store, target_path, monkeypatch):
    stored = store_corrections(store, target_path, monkeypatch, lambda e: [1.5] * len(e["seconds"]))
    monkeypatch.setattr(machine, "busy_since", lambda before: ["make (42): 99%"])
    from ggspec import Engine, SamplingConfig, SpecConfig
    with Engine(target_path, None, target_config=BackendConfig(n_ctx=256, n_threads=1), progress=False) as eng:
        eng.generate([1, 5, 6, 7], max_tokens=3, sampling=SamplingConfig(temperature=0), spec=SpecConfig("auto"))
    assert stored_entry(store)["correction"] == stored


def test_what_was_stored_for_model_files_that_are_gone_is_dropped(store, measured, target_path, tmp_path):
    gone = tmp_path / "gone.gguf"
    shutil.copy(target_path, gone)
    curve_for(gone)
    store.write_text(json.dumps({**json.loads(store.read_text()), "older": {"seconds": [0.1]}}))
    gone.unlink()
    curve_for(target_path)  # the next store
    kept = json.loads(store.read_text())
    assert len(kept) == 2 and "older" in kept  # (entries stored before "files" was kept stay)
    assert [entry["files"] for key, entry in kept.items() if key != "older"] == [[str(os.path.realpath(target_path))]]


def test_prepare_measures_what_the_first_generation_would_measure_first(store, measured, target_path, draft_path):
    """Engine.prepare(), called while an application waits for its user, measures the
    target's curve for the spec's draft_max and the draft model's token; the generation
    after it measures nothing and starts from that curve."""
    from ggspec import Engine, SamplingConfig, SpecConfig
    cfg = BackendConfig(n_ctx=256, n_threads=1)
    with Engine(target_path, draft_path, target_config=cfg, progress=False) as eng:
        eng.prepare(SpecConfig("auto", 6))
        assert sorted(measured) == [("draft.gguf", 1), ("target.gguf", 7)]
        assert eng.costs.calibrated and eng.costs.max_rows == 7 and eng.costs.draft_token > 0
        curve = eng.costs.curve.copy()
        eng.generate([1, 5, 6, 7], max_tokens=3, sampling=SamplingConfig(temperature=0), spec=SpecConfig("auto", 6))
        assert len(measured) == 2
        np.testing.assert_array_equal(eng.costs.curve, curve)
    assert len(json.loads(store.read_text())) == 2


@pytest.mark.parametrize("method", ["none", "lookup", "draft"])
def test_prepare_measures_nothing_for_methods_that_do_not_choose_by_cost(store, measured, target_path, draft_path,
                                                                          method):
    from ggspec import Engine, SpecConfig
    with Engine(target_path, draft_path, target_config=BackendConfig(n_ctx=256, n_threads=1), progress=False,
                spec=SpecConfig(method)) as eng:
        eng.prepare()
        assert measured == [] and not eng.costs.calibrated and not store.exists()


def slowed(monkeypatch, ctx, seconds, on_decode=lambda n: None):
    """Every decode of `ctx` takes `seconds` more; on_decode(count) runs before each."""
    real, count = ctx.eval, [0]

    def slow_eval(tokens, logits="last"):
        count[0] += 1
        on_decode(count[0])
        time.sleep(seconds)
        return real(tokens, logits=logits)

    monkeypatch.setattr(ctx, "eval", slow_eval)


def test_cancel_stops_prepare_and_the_next_generation_goes_on_with_its_timings(store, measured, target_path,
                                                                                monkeypatch):
    from ggspec import Engine, SamplingConfig, SpecConfig
    with Engine(target_path, None, target_config=BackendConfig(n_ctx=256, n_threads=1), progress=False) as eng:
        slowed(monkeypatch, eng.ctx, 0.0, lambda n: eng.cancel() if n == 4 else None)  # (1: the warm-up)
        eng.prepare(SpecConfig("auto", 4))
        assert measured == [("target.gguf", 5)]  # begun, then stopped
        assert eng.ctx.tokens == []
        assert [b for b, _ in eng.costs.survey.done] == [1, 2, 3]
        assert [b for b, _ in stored_entry(store)["survey"]["done"]] == [1, 2, 3]
        np.testing.assert_array_equal(eng.costs.curve, eng.costs.survey.curve())  # chosen by meanwhile
        taken = list(eng.costs.survey.done)
        rounds = rounds_of(monkeypatch, eng.ctx)
        eng.generate(COPYABLE, max_tokens=40, sampling=SamplingConfig(temperature=0, ignore_eos=True),
                     spec=SpecConfig("auto", 4))
        assert len(measured) == 1 and eng.costs.survey.done[:3] == taken
        assert_timings_are_the_rounds(eng.costs.survey.done[3:], rounds)


def test_a_generation_asked_for_during_prepare_stops_it_and_its_rounds_take_the_rest(store, measured, target_path,
                                                                                    monkeypatch):
    """The chat's first message, typed while prepare() measures: its answer waits for one
    decode, not for the whole measurement."""
    from ggspec import Engine, SamplingConfig, SpecConfig
    with Engine(target_path, None, target_config=BackendConfig(n_ctx=256, n_threads=1), progress=False) as eng:
        started = threading.Event()
        slowed(monkeypatch, eng.ctx, 0.05, lambda n: started.set() if n == 3 else None)
        thread = threading.Thread(target=eng.prepare, args=(SpecConfig("auto", 16),))  # 35 decodes: 1.75 s at least
        thread.start()
        assert started.wait(10)
        t0, first = time.monotonic(), []
        eng.generate(COPYABLE, max_tokens=40, sampling=SamplingConfig(temperature=0, ignore_eos=True),
                     spec=SpecConfig("auto", 16), on_text=lambda piece: first.append(time.monotonic()) and None)
        thread.join(10)
        assert not thread.is_alive() and first[0] - t0 < 1.0
        assert measured == [("target.gguf", 17)]  # no second measurement: the rounds went on with the first
        assert eng.costs.calibrated or len(eng.costs.survey.done) > 3


def test_close_from_another_thread_stops_prepare_at_once(store, target_path, monkeypatch):
    """A chat left during its first measurement: close() waits for one decode, not for
    the whole measurement, and the preparing thread ends without an error."""
    from ggspec import Engine, SpecConfig
    from ggspec.errors import EngineClosedError
    eng = Engine(target_path, None, target_config=BackendConfig(n_ctx=256, n_threads=1), progress=False)
    started, errors = threading.Event(), []
    slowed(monkeypatch, eng.ctx, 0.05, lambda n: started.set())

    def prepare():
        try:
            eng.prepare(SpecConfig("auto", 16))  # 35 decodes: 1.75 s at least
        except Exception as e:  # noqa: BLE001  (the test reports it)
            errors.append(e)

    thread = threading.Thread(target=prepare)
    thread.start()
    assert started.wait(10)
    t0 = time.monotonic()
    eng.close()
    waited = time.monotonic() - t0
    thread.join(10)
    assert not thread.is_alive() and errors == [] and waited < 1.0
    assert not store.exists() or "seconds" not in stored_entry(store)  # (a survey under way at most)
    with pytest.raises(EngineClosedError):
        eng.prepare(SpecConfig("auto"))




def rounds_of(monkeypatch, ctx) -> list[list[int]]:
    """The tokens of every decode of `ctx` that asks for all its rows' logits
    (verifications and measurements), in order."""
    rounds, real = [], ctx.eval

    def recording(tokens, logits="last"):
        if logits == "all":
            rounds.append(list(tokens))
        return real(tokens, logits=logits)

    monkeypatch.setattr(ctx, "eval", recording)
    return rounds


def assert_timings_are_the_rounds(timings: list[tuple[int, float]], rounds: list[list[int]]) -> None:
    """Each timing a survey took is of one of `rounds` (rounds_of), in order."""
    rest = iter(rounds)
    assert all(any(b == len(r) for r in rest) for b, _ in timings), (timings, [len(r) for r in rounds])


def test_a_first_generation_times_its_own_rounds_and_equals_plain_greedy_decoding(store, measured,
                                                                                   target_path, monkeypatch):
    """No stored curve: no decode of filler, before the first token or after. The first
    round is plain (it times t(1)); the rounds after it draft what the controller chooses
    by the sizes timed so far, and their timings are the survey's. The answer is the
    target's own."""
    from ggspec import Engine, SamplingConfig, SpecConfig
    from reference import greedy_reference
    greedy = SamplingConfig(temperature=0, ignore_eos=True)
    with Engine(target_path, None, target_config=BackendConfig(n_ctx=256, n_threads=1), progress=False) as eng:
        rounds, proposed, propose = rounds_of(monkeypatch, eng.ctx), [], eng.drafters["auto"].propose

        def recording(*args):
            proposed.append(propose(*args))
            return proposed[-1]

        monkeypatch.setattr(eng.drafters["auto"], "propose", recording)
        got = eng.generate(COPYABLE, max_tokens=40, sampling=greedy, spec=SpecConfig("auto", 4))
        assert measured == [] and len(rounds[0]) == 1 and max(map(len, rounds)) > 1
        assert [r[1:] for r in rounds] == [d.tokens for d in proposed]  # the drafts verified as proposed
        survey = eng.costs.survey
        assert survey.done[0][0] == 1
        assert_timings_are_the_rounds(survey.done, rounds)
        np.testing.assert_array_equal(eng.costs.curve, survey.curve())
    ref = greedy_reference(target_path, COPYABLE, 40, n_ctx=256, ignore_eog=True, stop_at_eog=False)
    assert got.tokens == ref.tokens
    assert stored_entry(store)["survey"]["done"] == [list(t) for t in survey.done]


def test_a_survey_the_rounds_complete_is_stored_as_the_curve(store, measured, target_path):
    """Rounds of any method time the sizes they verify; when every size has its timings,
    the curve is stored and chosen by, and the survey ends."""
    from ggspec import Engine, SamplingConfig, SpecConfig
    greedy = SamplingConfig(temperature=0, ignore_eos=True)
    with Engine(target_path, None, target_config=BackendConfig(n_ctx=256, n_threads=1), progress=False) as eng:
        eng.generate(COPYABLE, max_tokens=1, sampling=greedy, spec=SpecConfig("auto", 1))  # one plain round
        assert [b for b, _ in eng.costs.survey.done] == [1]
        eng.generate(COPYABLE, max_tokens=30, sampling=greedy, spec=SpecConfig("lookup", 1))  # rounds of 1-2 rows
        assert eng.costs.survey is None and eng.costs.max_rows == 2 and measured == []
        np.testing.assert_array_equal(eng.costs.curve, stored_entry(store)["seconds"])
    assert "survey" not in stored_entry(store)


def test_a_seeded_sampled_first_generation_samples_what_plain_decoding_samples(store, target_path):
    from ggspec import Engine, SamplingConfig, SpecConfig
    sampling = SamplingConfig(temperature=0.8, seed=3, ignore_eos=True)
    with Engine(target_path, None, target_config=BackendConfig(n_ctx=256, n_threads=1), progress=False) as eng:
        surveyed = eng.generate(COPYABLE, max_tokens=30, sampling=sampling, spec=SpecConfig("auto", 4))
        assert len(eng.costs.survey.done) > 1 and surveyed.stats.draft_tokens > 0
        plain = eng.generate(COPYABLE, max_tokens=30, sampling=sampling, spec=SpecConfig("none"))
    assert surveyed.tokens == plain.tokens


def test_a_survey_an_answer_leaves_unfinished_is_stored_and_the_next_engine_goes_on_with_it(store, measured,
                                                                                           target_path, monkeypatch):
    from ggspec import Engine, SamplingConfig, SpecConfig
    greedy = SamplingConfig(temperature=0, ignore_eos=True)
    cfg = BackendConfig(n_ctx=256, n_threads=1)
    with Engine(target_path, None, target_config=cfg, progress=False) as eng:
        eng.generate(COPYABLE, max_tokens=3, sampling=greedy, spec=SpecConfig("auto", 4))
        done = eng.costs.survey.done
    saved = stored_entry(store)["survey"]
    assert saved["rows"] == 5 and saved["done"] == [list(t) for t in done] and done[0][0] == 1
    with Engine(target_path, None, target_config=cfg, progress=False) as eng:
        rounds = rounds_of(monkeypatch, eng.ctx)
        eng.generate(COPYABLE, max_tokens=40, sampling=greedy, spec=SpecConfig("auto", 4))
        assert eng.costs.survey.done[:len(done)] == done and measured == []
        assert_timings_are_the_rounds(eng.costs.survey.done[len(done):], rounds)


def test_survey_timings_taken_while_other_processes_were_busy_are_dropped(store, target_path, monkeypatch):
    from ggspec import Engine, SamplingConfig, SpecConfig
    monkeypatch.setattr(machine, "busy_since", lambda before: ["make (42): 99%"])
    with Engine(target_path, None, target_config=BackendConfig(n_ctx=256, n_threads=1), progress=False) as eng:
        eng.generate(COPYABLE, max_tokens=3, sampling=SamplingConfig(temperature=0), spec=SpecConfig("auto", 4))
        assert eng.costs.survey.done == []
    assert not store.exists()


def test_prepare_measures_at_once_what_a_stored_survey_had_begun(store, measured, target_path):
    from ggspec import Engine, SamplingConfig, SpecConfig
    cfg = BackendConfig(n_ctx=256, n_threads=1)
    with Engine(target_path, None, target_config=cfg, progress=False) as eng:
        eng.generate(COPYABLE, max_tokens=3, sampling=SamplingConfig(temperature=0), spec=SpecConfig("auto", 4))
    with Engine(target_path, None, target_config=cfg, progress=False) as eng:
        eng.prepare(SpecConfig("auto", 4))
        assert measured == [("target.gguf", 5)] and eng.costs.calibrated and eng.costs.survey is None
    assert len(stored_entry(store)["seconds"]) == 5 and "survey" not in stored_entry(store)


def test_other_methods_decode_as_asked_while_a_survey_is_under_way(store, target_path, monkeypatch):
    from ggspec import Engine, SamplingConfig, SpecConfig
    greedy = SamplingConfig(temperature=0, ignore_eos=True)
    with Engine(target_path, None, target_config=BackendConfig(n_ctx=256, n_threads=1), progress=False) as eng:
        eng.generate(COPYABLE, max_tokens=1, sampling=greedy, spec=SpecConfig("auto", 4))
        rounds = rounds_of(monkeypatch, eng.ctx)
        eng.generate(COPYABLE, max_tokens=10, sampling=greedy, spec=SpecConfig("none"))
        assert [len(r) for r in rounds] == [1] * 10 and [b for b, _ in eng.costs.survey.done] == [1, 1]


def test_a_survey_for_more_rows_than_the_stored_curve_is_stored_beside_it(store, measured, target_path):
    from ggspec import Engine, SamplingConfig, SpecConfig
    greedy = SamplingConfig(temperature=0, ignore_eos=True)
    cfg = BackendConfig(n_ctx=256, n_threads=1)
    with Engine(target_path, None, target_config=cfg, progress=False) as eng:
        eng.prepare(SpecConfig("auto", 2))
        curve = eng.costs.curve.copy()
        eng.generate(COPYABLE, max_tokens=1, sampling=greedy, spec=SpecConfig("auto", 4))
        survey = eng.costs.survey
        assert survey.done == [(b, curve[b - 1]) for b in (1, 1, 2, 2, 3, 3)]  # begun from the curve
        np.testing.assert_array_equal(survey.curve(), [*curve, curve[2], curve[2]])
        eng.generate(COPYABLE, max_tokens=20, sampling=greedy, spec=SpecConfig("lookup", 4))  # rounds of 5 rows
        assert len(survey.done) > 6
    entry = stored_entry(store)
    assert len(entry["seconds"]) == 3 and entry["survey"]["rows"] == 5 and len(entry["survey"]["done"]) > 6
    with Engine(target_path, None, target_config=cfg, progress=False) as eng:
        eng.generate(COPYABLE, max_tokens=3, sampling=greedy, spec=SpecConfig("auto", 2))  # the stored curve
        assert eng.costs.calibrated and eng.costs.max_rows == 3
        eng.generate(COPYABLE, max_tokens=40, sampling=greedy, spec=SpecConfig("auto", 4))  # the survey goes on
        assert eng.costs.max_rows == 5 and measured == [("target.gguf", 3)]
        eng.prepare(SpecConfig("auto", 4))  # and ends
    assert len(stored_entry(store)["seconds"]) == 5 and "survey" not in stored_entry(store)


def test_a_stored_survey_goes_on_for_another_draft_max(store, target_path):
    """The timings are per size: a survey stored for K = 4 goes on for K = 8."""
    from ggspec import Engine, SamplingConfig, SpecConfig
    greedy = SamplingConfig(temperature=0, ignore_eos=True)
    cfg = BackendConfig(n_ctx=256, n_threads=1)
    with Engine(target_path, None, target_config=cfg, progress=False) as eng:
        eng.generate(COPYABLE, max_tokens=3, sampling=greedy, spec=SpecConfig("auto", 4))
        done = eng.costs.survey.done
    with Engine(target_path, None, target_config=cfg, progress=False) as eng:
        eng.generate(COPYABLE, max_tokens=1, sampling=greedy, spec=SpecConfig("auto", 8))
        assert eng.costs.survey.rows == 9 and eng.costs.survey.done[:len(done)] == done


@pytest.mark.parametrize("damage", [{"done": [["a", 0.1]]}, {"done": [[1, -1.0]], "rows": 5}, "x", {"rows": 5}])
def test_a_damaged_stored_survey_is_started_again(store, target_path, damage):
    from ggspec import Engine, SamplingConfig, SpecConfig
    greedy = SamplingConfig(temperature=0, ignore_eos=True)
    cfg = BackendConfig(n_ctx=256, n_threads=1)
    with Engine(target_path, None, target_config=cfg, progress=False) as eng:
        eng.generate(COPYABLE, max_tokens=3, sampling=greedy, spec=SpecConfig("auto", 4))
    data = json.loads(store.read_text())
    for entry in data.values():
        entry["survey"] = damage
    store.write_text(json.dumps(data))
    with Engine(target_path, None, target_config=cfg, progress=False) as eng:
        eng.generate(COPYABLE, max_tokens=3, sampling=greedy, spec=SpecConfig("auto", 4))
        done = eng.costs.survey.done
        assert done[0][0] == 1 and len(done) <= 3 and all(s > 0 for _, s in done)  # from its start
    assert stored_entry(store)["survey"]["done"] == [list(t) for t in done]
