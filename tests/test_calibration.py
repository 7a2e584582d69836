"""The verification cost calibration: measured once, stored, reused, measured again when
anything that changes the costs changes (tiny models)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from ggspec import BackendConfig, calibration, machine
from ggspec.backend import Context, Model


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

    def counting(ctx, rows):
        calls.append((ctx.model.path.name, rows))
        return real(ctx, rows)

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
    for _ in range(2):
        with Engine(target_path, None, target_config=cfg, progress=False) as eng:
            eng.generate([1, 5, 6, 7], max_tokens=3, sampling=SamplingConfig(temperature=0), spec=SpecConfig("auto"))
            assert eng.costs.calibrated and eng.costs.max_rows == SpecConfig().draft_max + 1
    assert len(measured) == 1


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
