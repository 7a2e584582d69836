"""Training Medusa heads: labels, gradients, hidden-state collection, a tiny end-to-end run."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

import ggspec.heads.collect
from ggspec.heads import MedusaHeads, TargetFingerprint, load_heads, read_target
from ggspec.backend import Context, Model, layer_input_name
from ggspec.config import BackendConfig
from ggspec.heads.collect import CollectConfig, HiddenStates, collect, plan_prompts
from ggspec.heads.fit import TrainConfig, _forward_backward, _labels, reduced_vocab, train
from ggspec.heads.report import Split, format_report, tree_acceptance
from reference import first_divergence, greedy_reference


def test_labels_and_greedy_chain():
    """Head h at row t learns pred[t+h+1] ("distill") or token[t+h+2] ("corpus"), never
    across a window end; the greedy label exists only while the corpus follows the chain."""
    tokens = np.array([10, 11, 12, 13, 14, 15, 20, 21, 22, 23])
    preds = np.array([11, 12, 99, 14, 15, 16, 21, 22, 23, 24])  # corpus leaves the chain at 3
    windows = np.array([[0, 6, 0], [6, 4, 1]])
    data = HiddenStates(Path("."), np.zeros((10, 4), np.float16), tokens, preds, windows, None, 0.0)
    labels, greedy = _labels(data, 2, "distill")
    np.testing.assert_array_equal(labels[:, 0], [12, 99, 14, 15, 16, -1, 22, 23, 24, -1])
    np.testing.assert_array_equal(labels[:, 1], [99, 14, 15, 16, -1, -1, 23, 24, -1, -1])
    # match[t] = (token t+1 == pred t): True True False True True | True True True
    np.testing.assert_array_equal(greedy[:, 0], [12, 99, -1, 15, 16, -1, 22, 23, 24, -1])
    np.testing.assert_array_equal(greedy[:, 1], [99, -1, -1, 16, -1, -1, 23, 24, -1, -1])
    labels, _ = _labels(data, 2, "corpus")
    np.testing.assert_array_equal(labels[:, 1], [13, 14, 15, -1, -1, -1, 23, -1, -1, -1])


def test_tree_acceptance_counts_the_longest_path_in_the_tree():
    """Zero-residual tied heads over an identity output rank tokens by x itself; the
    labels sit at chosen ranks: rows A (0, 0), B (1, 0), C (0, miss) with top_k = 2.
    acceptance = [[2/3, 1/3], [2/3, 0]] grows (0,), (0, 0), (1,), (1, 0) in that order."""
    h = 8
    x = np.tile(np.arange(h, 0, -1, dtype=np.float16), (3, 1))  # token j has rank j
    greedy = np.array([[0, 0], [1, 0], [0, 5]])
    heads = MedusaHeads(np.zeros((2, 1, h, h)), np.zeros((2, 1, h)), np.eye(h), token_ids=None,
                        tied=True, target=TargetFingerprint("t", h, "v"))
    data = HiddenStates(Path("."), x, np.zeros(3), np.zeros(3), np.array([[0, 3, 0]]), None, 0.0)
    split = Split(np.arange(3), greedy, greedy)
    acceptance, got = tree_acceptance(heads, data, split, sizes=(1, 2, 3, 4), top_k=2)
    np.testing.assert_allclose(acceptance, [[2 / 3, 1 / 3], [2 / 3, 0]])
    np.testing.assert_allclose([got[n] for n in (1, 2, 3, 4)], [2 / 3, 1, 4 / 3, 5 / 3])


def test_reduced_vocab_keeps_the_most_frequent_labels():
    counts = np.bincount([5, 5, 5, 7, 7, 9, 3], minlength=20)
    np.testing.assert_array_equal(reduced_vocab(counts, 2), [5, 7])
    assert reduced_vocab(counts, 0) is None and reduced_vocab(counts, 20) is None


@pytest.mark.parametrize("tied, n_layers", [(True, 1), (False, 2)])
def test_gradients_match_finite_differences(tied, n_layers):
    rng = np.random.default_rng(0)
    nh, d, v, bsz = 2, 5, 7, 4
    x = rng.standard_normal((bsz, d))
    y = np.array([[0, 3], [6, -1], [2, 2], [-1, 5]])
    w = rng.standard_normal((nh, n_layers, d, d)) * 0.5
    b = rng.standard_normal((nh, n_layers, d)) * 0.5
    out = rng.standard_normal((v, d) if tied else (nh, v, d))
    loss, count, grads, _ = _forward_backward(x, y, w, b, out, tied, True)
    assert count == 6
    params = {"w": w, "b": b} | ({} if tied else {"out": out})
    eps = 1e-6
    for name, p in params.items():
        num = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            up = _forward_backward(x, y, w, b, out, tied, False)[0]
            p[i] = old - eps
            down = _forward_backward(x, y, w, b, out, tied, False)[0]
            p[i] = old
            num[i] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grads[name], num, rtol=1e-5, atol=1e-7)


PHRASES = ["def hello(self): return self.value", "the cat and the dog", "import data from time",
           "class World: pass", "for i in range(n): print(i)", "yield little great people",
           "x = list(dict(name=args))"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Files of a few phrases in random order: what follows a token 2+ ahead is learnable
    (and held-out files hold the same phrases)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(12):
        (root / f"f{i:02}.py").write_text("\n".join(rng.choice(PHRASES, 14)) + "\n")
    (root / "binary.bin").write_bytes(b"\0\1\2")  # skipped
    return root


def test_training_reduces_heldout_loss(tmp_path, target_path, corpus):
    work = tmp_path / "work"
    ccfg = CollectConfig(max_tokens=1000, window=64, n_threads=1)
    data = collect(target_path, corpus, work, ccfg, progress=False)
    assert data.hidden.shape == (data.n_rows, 64) and data.n_rows <= 1000
    assert data.counts.sum() > 0  # files beyond max_tokens were counted
    assert len(np.unique(data.windows[:, 2])) >= 5  # several files, binary.bin skipped

    cfg = TrainConfig(n_heads=2, vocab_size=200, epochs=6, batch_size=64, lr=1e-2,
                      heldout=0.25, dtype="f32", checkpoint_every=5)
    ckpt = tmp_path / "ckpt.npz"
    report = train(data, tmp_path / "heads.gguf", cfg, checkpoint=ckpt, progress=False)
    for before, after in zip(report.before, report.after):
        assert after.loss < 0.8 * before.loss, format_report(report)
    assert all(after.top5 > before.top5 for before, after in zip(report.before, report.after))
    assert 0.5 < report.vocab_coverage <= 1.0
    accepted = list(report.trees.values())  # a larger tree never accepts less
    assert accepted == sorted(accepted) and 0 <= accepted[0] <= 1 and accepted[-1] <= 2
    assert "tokens/round" in format_report(report)

    heads = load_heads(report.path, target_path)
    assert (heads.n_heads, heads.vocab_size, heads.tied) == (2, 200, True)
    assert heads.acceptance.shape == (2, 8)  # measured on held-out rows, for the first trees
    ids, _ = heads.propose(np.asarray(data.hidden[0], np.float32), 3)
    assert set(ids.ravel()) <= set(heads.token_ids)

    # resumable: a finished checkpoint is picked up, no step is redone, same heads
    again = train(data, tmp_path / "again.gguf", cfg, checkpoint=ckpt, progress=False)
    np.testing.assert_array_equal(load_heads(again.path, target_path).res_weight, heads.res_weight)
    assert [a.loss for a in again.after] == [a.loss for a in report.after]


def test_collection_resumes(tmp_path, target_path, corpus):
    work = tmp_path / "work"
    cfg = CollectConfig(max_tokens=400, window=64, n_threads=1)
    full = collect(target_path, corpus, work, cfg, progress=False)
    hidden = np.array(full.hidden)
    # pretend it stopped after two windows
    state = json.loads((work / "state.json").read_text())
    state["windows_done"] = 2
    (work / "state.json").write_text(json.dumps(state))
    start = int(full.windows[2, 0])
    mm = np.load(work / "hidden.npy", mmap_mode="r+")
    mm[start:] = 0
    mm.flush()
    del mm
    with pytest.raises(ValueError, match="not finished"):
        HiddenStates.open(work, read_target(target_path))
    resumed = collect(target_path, corpus, work, cfg, progress=False)
    np.testing.assert_allclose(np.array(resumed.hidden), hidden, atol=1e-2)
    with pytest.raises(ValueError, match="other settings"):
        collect(target_path, corpus, work, CollectConfig(max_tokens=400, window=32), progress=False)


@pytest.mark.parametrize("layers", [(), (0, 1, 1)])
def test_answers_are_the_targets_greedy_continuations(tmp_path, target_path, layers):
    """With answers=True the rows are prompt + the target's greedy answer, decoded several
    sequences per llama_decode: each answer equals plain one-sequence greedy decoding, and
    each row's hidden state (with `layers`: the inputs of those layers) equals that of the
    same tokens evaluated alone; with `layers` a window holds the whole prompt."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n\nthe cat\nprint hello\ndef lambda\nyes no\n")
    cfg = CollectConfig(max_tokens=1000, window=96, answers=True, answer_tokens=20, parallel=3,
                        n_threads=1, layers=layers)
    data = collect(target_path, prompts, tmp_path / "work", cfg, progress=False)
    assert sorted(data.windows[:, 2].tolist()) == list(range(5))  # every prompt, each in one window
    assert data.n_rows == int(data.windows[:, 1].sum()) == len(data.tokens) == len(data.hidden)
    assert data.hidden.shape[1] == 64 * max(1, len(layers))
    taps = [layer_input_name(i) for i in layers]
    with Model(target_path) as model, Context(model, BackendConfig(n_ctx=64), embeddings=not taps,
                                              taps=taps) as ctx:
        planned = plan_prompts(model, prompts, cfg)
        for start, length, i in data.windows:
            tokens, prompt = data.tokens[start:start + length].tolist(), planned[i]
            lead = prompt if layers else prompt[-1:]  # (the prompt as context,) its last row,
            assert tokens[:len(lead)] == lead         # then the answer
            assert (data.preds[start:start + len(lead) - 1] == -1).all()  # context: no labels
            answer, last = tokens[len(lead):], int(data.preds[start + length - 1])
            assert len(answer) == 20 or last in model.eog
            got = answer if last in model.eog else answer + [last]
            ref = greedy_reference(target_path, prompt, 21)
            assert first_divergence(got, ref) is None
            ctx.clear()
            ctx.eval(prompt + answer, logits="all")
            rows = ctx.tapped if taps else ctx.hidden
            np.testing.assert_allclose(data.hidden[start:start + length], rows(len(prompt + answer))[-length:],
                                       atol=2e-2, rtol=1e-2)


def test_answer_collection_resumes(tmp_path, target_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nthe cat\nprint hello\ndef lambda\n")
    cfg = CollectConfig(max_tokens=1000, window=96, answers=True, answer_tokens=12, parallel=2,
                        n_threads=1)
    work = tmp_path / "work"
    full = collect(target_path, prompts, work, cfg, progress=False)
    hidden, tokens = np.array(full.hidden), full.tokens.copy()  # the files get rewritten
    # pretend it stopped once two answers were on disk
    state = json.loads((work / "state.json").read_text())
    state["windows_done"] = 2
    (work / "state.json").write_text(json.dumps(state))
    np.save(work / "windows.npy", full.windows[:2])
    with pytest.raises(ValueError, match="not finished"):
        HiddenStates.open(work, read_target(target_path))
    resumed = collect(target_path, prompts, work, cfg, progress=False)
    assert sorted(resumed.windows[:, 2].tolist()) == sorted(full.windows[:, 2].tolist())
    for start, length, i in full.windows:
        (s2, l2, _), = resumed.windows[resumed.windows[:, 2] == i]
        assert l2 == length
        np.testing.assert_array_equal(resumed.tokens[s2:s2 + l2], tokens[start:start + length])
        np.testing.assert_allclose(resumed.hidden[s2:s2 + l2], hidden[start:start + length],
                                   atol=2e-2)


class Killed(BaseException):
    """Stands for the process being killed (not an Exception: nothing may catch it)."""


@pytest.mark.parametrize("where", ["between files", "inside a file"])
def test_answer_collection_killed_while_writing_resumes(tmp_path, target_path, monkeypatch, where):
    """A kill after the second answer's windows.npy is written but before the state file
    records it, or halfway through writing preds.npy: collecting again completes, with the
    rows of an uninterrupted collection."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nthe cat\nprint hello\ndef lambda\n")
    cfg = CollectConfig(max_tokens=1000, window=96, answers=True, answer_tokens=12, parallel=2,
                        n_threads=1)
    full = collect(target_path, prompts, tmp_path / "full", cfg, progress=False)
    calls = []
    if where == "between files":  # the third state written (after creation and one answer)
        real_dumps = json.dumps

        def dumps(obj, **kwargs):
            calls.append(obj)
            if len(calls) == 3:
                raise Killed
            return real_dumps(obj, **kwargs)

        monkeypatch.setattr(ggspec.heads.collect.json, "dumps", dumps)
    else:  # the third preds.npy written (at creation, answer 1, answer 2) stops halfway
        real_save = np.save

        def save(file, arr, *args, **kwargs):
            if Path(getattr(file, "name", file)).name.startswith("preds.npy"):
                calls.append(file)
            if len(calls) < 3:
                return real_save(file, arr, *args, **kwargs)
            buf = io.BytesIO()
            real_save(buf, arr, *args, **kwargs)
            half = buf.getvalue()[:len(buf.getvalue()) // 2]
            if isinstance(file, (str, os.PathLike)):
                Path(file).write_bytes(half)
            else:
                file.write(half)
            raise Killed

        monkeypatch.setattr(np, "save", save)
    work = tmp_path / "work"
    with pytest.raises(Killed):
        collect(target_path, prompts, work, cfg, progress=False)
    monkeypatch.undo()
    resumed = collect(target_path, prompts, work, cfg, progress=False)
    assert sorted(resumed.windows[:, 2].tolist()) == [0, 1, 2, 3]
    for start, length, i in full.windows:
        (s2, l2, _), = resumed.windows[resumed.windows[:, 2] == i]
        assert l2 == length
        np.testing.assert_array_equal(resumed.tokens[s2:s2 + l2], full.tokens[start:start + length])


def test_bad_config():
    with pytest.raises(ValueError, match="labels"):
        TrainConfig(labels="teacher")
    with pytest.raises(ValueError, match="window"):
        CollectConfig(window=8)
    with pytest.raises(ValueError, match="answer_tokens"):
        CollectConfig(window=64, answers=True, answer_tokens=64)
    with pytest.raises(ValueError, match="parallel"):
        CollectConfig(answers=True, parallel=0)
    with pytest.raises(ValueError, match="max_tokens"):
        CollectConfig(max_tokens=10)


def test_cli_trains_medusa_heads(tmp_path, target_path, corpus):
    from click.testing import CliRunner
    from ggspec.cli import cli

    out = tmp_path / "h.gguf"
    r = CliRunner().invoke(cli, ["train", "medusa", target_path, "--corpus", str(corpus), "-o", str(out),
                                 "-n", "300", "--window", "64", "-t", "1", "--heads", "2",
                                 "--vocab-size", "50", "-e", "1", "-q"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out) and "head  top-1" in r.stderr
    assert load_heads(out, target_path).n_heads == 2
    assert (tmp_path / "h.gguf.work" / "checkpoint.npz").exists()
    r = CliRunner().invoke(cli, ["train", "medusa", target_path, "--corpus", str(tmp_path / "nope"),
                                 "-o", str(tmp_path / "x.gguf"), "-q"])
    assert r.exit_code == 2 and "does not exist" in r.output, r.output
