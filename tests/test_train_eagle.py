"""Training EAGLE-3 drafts: tapped-feature collection, the torch fit with training-time
test, its agreement with the numpy forward, resuming, the report and `ggspec train eagle`."""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner

if os.environ.get("CI") != "true":  # in CI (.ci/run installs the extra): fail, never skip
    pytest.importorskip("torch", reason="needs the train extra: pip install '.[test,train]'")
import torch  # noqa: E402

from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig
from ggspec.backend import Context, Model, layer_input_name
from ggspec.cli import cli
from ggspec.heads.collect import CollectConfig, collect
from ggspec.heads.eagle import load_eagle
from ggspec.heads.fit_eagle import (Batches, EagleDraft, EagleTrainConfig, default_layers, draft_config,
                                    train)
from ggspec.heads.report import chain_tokens, format_eagle_report
from reference import first_divergence, greedy_reference
from test_engine import random_prompt
from test_train import corpus  # noqa: F401  (a fixture)

LAYERS = (0, 1, 1)  # the tiny target has 2 layers
SMALL = EagleTrainConfig(layers=LAYERS, draft_vocab=120, n_ff=64, epochs=3, batch_size=4, seq_len=32,
                         lr=3e-3, heldout=0.25, dtype="f32", checkpoint_every=2)


@pytest.fixture(scope="module")
def features(tmp_path_factory, target_path, corpus):  # noqa: F811
    cfg = CollectConfig(max_tokens=800, window=64, n_threads=1, layers=LAYERS)
    return collect(target_path, corpus, tmp_path_factory.mktemp("work"), cfg, progress=False)


def test_collection_stores_the_tapped_layer_inputs(features, target_path):
    """Each row holds the inputs of the 3 target layers (float16), as a tapped context
    computes them for the window, and the target's argmax."""
    assert features.hidden.dtype == np.float16 and features.hidden.shape == (features.n_rows, 3 * 64)
    start, length, _ = (int(v) for v in features.windows[1])
    ids = features.tokens[start:start + length].tolist()
    with Model(target_path) as m, Context(m, BackendConfig(n_ctx=64, n_batch=64, n_threads=1),
                                          taps=[layer_input_name(i) for i in LAYERS]) as ctx:
        logits = ctx.eval(ids, logits="all")  # a view of llama.cpp's buffer: used inside `with`
        np.testing.assert_array_equal(features.preds[start:start + length], logits.argmax(axis=1))
        np.testing.assert_allclose(features.hidden[start:start + length], ctx.tapped(length), rtol=2e-3, atol=2e-3)
    print(f"collected {features.n_rows / features.seconds:.0f} rows/s", file=sys.stderr)


def test_default_layers_are_eagle3s():
    assert default_layers(28) == (2, 14, 25) and default_layers(2) == (1, 1, 0)


def test_chain_tokens_formula():
    """E = 1 + a1 + a1 a2 + a1 a2 a3 (+ a1 a2 a3^2 beyond the measured steps)."""
    got = chain_tokens([0.8, 0.5, 0.5], depths=(3, 4))
    assert got == pytest.approx({3: 1 + 0.8 + 0.4 + 0.2, 4: 1 + 0.8 + 0.4 + 0.2 + 0.1})


@pytest.fixture(scope="module")
def trained(features, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "eagle.gguf"
    return train(features, out, SMALL, progress=False)


def test_training_reduces_heldout_loss(trained):
    report = trained
    assert len(report.after) == 5  # steps 1..5 measured, 3 trained
    for before, after in zip(report.before[:3], report.after[:3]):
        assert after.loss < 0.7 * before.loss, format_eagle_report(report)
        assert after.top1 > before.top1
    assert 0.5 < report.vocab_coverage <= 1.0
    depths = list(report.chains.values())
    assert list(report.chains) == [3, 4, 5] and depths == sorted(depths) and 1 < depths[0] <= 4
    assert report.flops_per_row > 0 and "depth 3 ->" in format_eagle_report(report)


def test_written_file_loads_and_numpy_matches_torch(trained, features, target_path):
    """llama.cpp loads the file; heads/eagle.py's numpy forward over the draft's KV cache
    gives the torch model's logits for steps 1, 2, 3 of every row of a chunk (step k+1 of
    row P sees the step-1 rows <= P and its own earlier steps, at position P + k)."""
    with Model(str(trained.path), heads=True) as m:
        assert m.metadata("general.architecture") == "eagle3"
    heads = load_eagle(trained.path, target_path)
    assert heads.vocab_size == 120 and heads.cfg.target_layers == LAYERS and heads.cfg.n_ff == 64
    # the torch model from the written weights (f32)
    cfg = draft_config(features.target, SMALL)
    used = np.arange(features.target.n_vocab)
    model = EagleDraft(cfg, 120, torch.from_numpy(heads.embd.copy()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(np.array(getattr(heads.w, name))))
    batches = Batches.of(features, np.array([0]), 24, used, np.zeros(len(used), np.int64))
    batch = batches.get(np.array([0]), 3)
    feats, tokens = batch.features, batch.tokens
    with torch.no_grad():
        want = [z[0].numpy() for z in model(feats, tokens, 3)]
    t = 24
    cache = heads.new_cache(3 * t)
    g = heads.fuse(feats[0].numpy())
    for k in range(3):
        visible = np.zeros((t, (k + 1) * t), dtype=bool)
        visible[:, :t] = np.tri(t, dtype=bool)
        for m in range(1, k + 1):
            visible[np.arange(t), m * t + np.arange(t)] = True
        logits, g = heads.step(cache, tokens[0, :, k].numpy(), g, np.arange(t) + k, visible)
        np.testing.assert_allclose(logits, want[k], rtol=1e-3, atol=1e-3 * np.abs(want[k]).max())


def _stop_after(monkeypatch, n: int) -> None:
    """Interrupt training at its n-th optimizer step, as Ctrl-C would."""
    calls = {"n": 0}
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_resume_after_interruption_equals_an_uninterrupted_run(features, tmp_path, target_path, monkeypatch):
    cfg = dataclasses.replace(SMALL, epochs=1, steps=6)
    whole = train(features, tmp_path / "whole.gguf", cfg, checkpoint=tmp_path / "a.pt", progress=False)
    with monkeypatch.context() as mp:
        _stop_after(mp, 5)  # steps 1-4 done and checkpointed, step 5 interrupted
        with pytest.raises(KeyboardInterrupt):
            train(features, tmp_path / "cut.gguf", cfg, checkpoint=tmp_path / "b.pt", progress=False)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 4
    resumed = train(features, tmp_path / "cut.gguf", cfg, checkpoint=tmp_path / "b.pt", progress=False)
    a, b = load_eagle(whole.path, target_path), load_eagle(resumed.path, target_path)
    for f in dataclasses.fields(a.w):
        x, y = getattr(a.w, f.name), getattr(b.w, f.name)
        assert (x is None and y is None) or np.allclose(x, y, rtol=1e-5, atol=1e-6), f.name
    assert [s.loss for s in resumed.after] == pytest.approx([s.loss for s in whole.after], rel=1e-5)


def test_cli_trains_a_draft_on_the_targets_answers_that_decodes_exactly(target_path, tmp_path):
    """Self-distillation on the target's greedy answers to prompts (their rows as context)."""
    out, prompts = tmp_path / "eagle.gguf", tmp_path / "prompts.txt"
    prompts.write_text("hello world\nthe cat\nprint hello\ndef lambda\nyes no\nimport data\n"
                       "class World\nfor i in range\n")
    args = ["train", "eagle", target_path, "--prompts", str(prompts), "-o", str(out), "-n", "600",
            "--window", "96", "--answer-tokens", "24", "--parallel", "4", "-t", "1", "--layers", "0,1,1",
            "--draft-vocab", "100", "--ff", "64", "--steps", "6", "-b", "4", "--seq-len", "32",
            "--held-out", "0.25", "--dtype", "q8_0", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert "greedy chains on held-out rows" in result.stderr and "step  top-1" in result.stderr
    assert (tmp_path / "eagle.gguf.work" / "eagle-checkpoint.pt").exists()
    cfg = BackendConfig(n_ctx=512, n_batch=64, n_threads=1)
    with Engine(target_path, None, target_config=cfg, eagle=str(out), tree_nodes=8) as e:
        prompt = random_prompt(5)
        e.prepare(SpecConfig("eagle"))  # calibrates
        got = e.generate(prompt, max_tokens=40, sampling=SamplingConfig(temperature=0),
                         spec=SpecConfig("eagle", draft_max=8))
    assert first_divergence(got.tokens, greedy_reference(target_path, prompt, 40)) is None
    assert got.stats.draft_rounds >= 5


def test_features_beyond_float16_are_refused(features, tmp_path):
    hidden = np.array(features.hidden)
    hidden[3, 5] = np.inf  # what float16 storage makes of an activation above 65504
    with pytest.raises(ValueError, match="beyond float16's range"):
        train(dataclasses.replace(features, hidden=hidden), tmp_path / "e.gguf", SMALL, progress=False)


def test_cli_errors_are_one_line(target_path, tmp_path, monkeypatch):
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n  \n")
    cases = [
        (["--corpus", str(empty)], "no text found in"),
        (["--prompts", str(empty / "blank.txt")], "no prompts found in"),
        ([], "exactly one of --corpus"),
    ]
    for extra, message in cases:
        r = runner.invoke(cli, ["train", "eagle", target_path, "-o", str(tmp_path / "e.gguf"), "-q",
                                "--layers", "0,1,1", *extra])
        assert r.exit_code != 0 and message in r.output, r.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    r = runner.invoke(cli, ["train", "eagle", str(bad), "--corpus", str(empty), "-o", str(tmp_path / "e.gguf")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "bad.gguf" in r.output, r.output
    r = runner.invoke(cli, ["train", "eagle", target_path, "--corpus", str(empty), "-o", "e.gguf",
                            "--layers", "0,1,5"])
    assert r.exit_code == 1 and "outside the target's layers 0..1" in r.output, r.output
    # no torch: one line naming the extra
    monkeypatch.delitem(sys.modules, "ggspec.heads.fit_eagle")
    monkeypatch.setitem(sys.modules, "torch", None)
    r = runner.invoke(cli, ["train", "eagle", target_path, "--corpus", str(empty), "-o", "e.gguf"])
    assert r.exit_code == 1 and "pip install 'ggspec[train]'" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    with pytest.raises(ImportError):
        importlib.import_module("ggspec.heads.fit_eagle")
