"""Medusa head files (format, validation, fingerprint) and their numpy evaluation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from ggspec.backend import Context, Model
from ggspec.config import BackendConfig
from ggspec.errors import ModelFileError
from ggspec.heads import (MedusaHeads, load_heads, out_weight_name, read_target, res_bias_name,
                          res_weight_name, save_heads, silu, vocab_hash)
from tinymodels import VOCAB, write_mismatched_vocab_llama, write_tiny_llama

H = 64  # the tiny models' hidden size


def random_heads(target_path, *, n_heads=3, n_layers=2, vocab=40, tied=False, seed=0,
                 reduced=True) -> MedusaHeads:
    info = read_target(target_path)
    rng = np.random.default_rng(seed)
    token_ids = np.sort(rng.choice(info.n_vocab, vocab, replace=False)).astype(np.int32) if reduced else None
    v = vocab if reduced else info.n_vocab
    w = rng.standard_normal((n_heads, n_layers, H, H)).astype(np.float32) / np.sqrt(H)
    b = rng.standard_normal((n_heads, n_layers, H)).astype(np.float32) * 0.1
    out = info.output_rows(token_ids) if tied else rng.standard_normal((n_heads, v, H)).astype(np.float32)
    return MedusaHeads(w, b, out, token_ids=token_ids, tied=tied, target=info.fingerprint)


def reference_logits(heads: MedusaHeads, x: np.ndarray) -> np.ndarray:
    """Straightforward per-head evaluation in float64: (n_heads, V)."""
    x = x.astype(np.float64)
    rows = []
    for h in range(heads.n_heads):
        r = x
        for l in range(heads.n_layers):
            r = r + silu(heads.res_weight[h, l].astype(np.float64) @ r + heads.res_bias[h, l])
        out = heads.out_weight if heads.tied else heads.out_weight[h]
        rows.append(out.astype(np.float64) @ r)
    return np.stack(rows)


# --- format ----------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_f32_is_exact(tmp_path, target_path, tied):
    heads = random_heads(target_path, tied=tied)
    path = save_heads(tmp_path / "h.gguf", heads, dtype="f32")
    back = load_heads(path, target_path)
    assert (back.n_heads, back.n_layers, back.hidden, back.vocab_size, back.tied) == (3, 2, H, 40, tied)
    np.testing.assert_array_equal(back.token_ids, heads.token_ids)
    np.testing.assert_array_equal(back.res_weight, heads.res_weight)
    np.testing.assert_array_equal(back.res_bias, heads.res_bias)
    np.testing.assert_array_equal(back.out_weight, heads.out_weight)
    assert back.target == heads.target
    if tied:  # no output matrix on disk: rows of the target's output.weight
        names = {t.name for t in gguf.GGUFReader(path).tensors}
        assert not any(".out." in n for n in names)
        np.testing.assert_array_equal(back.out_weight, read_target(target_path).output_rows(heads.token_ids))


@pytest.mark.parametrize("dtype, tol", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_round_trip_low_precision(tmp_path, target_path, dtype, tol):
    heads = random_heads(target_path)
    back = load_heads(save_heads(tmp_path / "h.gguf", heads, dtype=dtype), target_path)
    for a, b in ((back.res_weight, heads.res_weight), (back.out_weight, heads.out_weight)):
        assert a.dtype == np.float32
        assert np.abs(a - b).max() <= tol * np.abs(b).max()
    np.testing.assert_array_equal(back.res_bias, heads.res_bias)  # biases stay F32
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "h.gguf").tensors}
    assert types[res_weight_name(0, 0)].name == dtype.upper()
    assert types[res_bias_name(0, 0)] == gguf.GGMLQuantizationType.F32


def test_full_vocabulary_needs_no_token_ids(tmp_path, target_path):
    heads = random_heads(target_path, reduced=False, n_layers=1)
    path = save_heads(tmp_path / "h.gguf", heads, dtype="f32")
    assert gguf.GGUFReader(path).get_field("medusa.token_ids") is None
    back = load_heads(path, target_path)
    assert back.token_ids is None and back.vocab_size == VOCAB.n_vocab
    ids, _ = back.propose(np.ones(H, np.float32), 4)
    assert ids.max() < VOCAB.n_vocab


def test_vocab_hash_is_the_token_texts(target_path):
    """The fingerprint's hash of the GGUF array equals the hash of llama.cpp's token texts."""
    fp = read_target(target_path).fingerprint
    with Model(target_path) as m:
        assert fp.vocab_hash == vocab_hash(m.token_text(i) for i in range(m.n_vocab))
        assert (fp.architecture, fp.embedding_length) == ("llama", m.n_embd)
    assert fp.vocab_hash == vocab_hash(t.encode() for t in VOCAB.tokens)


def test_fingerprint_mismatch_is_refused(tmp_path, target_path):
    path = save_heads(tmp_path / "h.gguf", random_heads(target_path), dtype="f32")
    other_vocab = write_mismatched_vocab_llama(tmp_path / "mismatch.gguf")
    with pytest.raises(ModelFileError, match="another target.*vocabulary hash") as e:
        load_heads(path, other_vocab)
    theirs = read_target(other_vocab).fingerprint.vocab_hash
    mine = read_target(target_path).fingerprint.vocab_hash
    assert theirs in str(e.value) and mine in str(e.value) and str(path) in str(e.value)
    wider = write_tiny_llama(tmp_path / "wide.gguf", n_embd=128, n_head=4)
    with pytest.raises(ModelFileError, match="embedding length is 64 but .* has 128"):
        load_heads(path, wider)


# --- malformed files -------------------------------------------------------------------

def write_raw(path, tensors: dict, *, arch="medusa", n_heads=1, n_layers=1, vocab=8,
              tied=False, drop_key=None, target_path=None, extra_arrays=None):
    """A head file written by hand: any tensors (name -> array, or (raw, qtype))."""
    fp = read_target(target_path).fingerprint
    w = gguf.GGUFWriter(path, arch)
    kv = {"medusa.head_count": n_heads, "medusa.residual_layer_count": n_layers,
          "medusa.embedding_length": H, "medusa.vocab_size": vocab}
    for k, v in kv.items():
        if k != drop_key:
            w.add_uint32(k, v)
    w.add_array("medusa.token_ids", list(range(10, 10 + vocab)))
    w.add_bool("medusa.tied", tied)
    w.add_string("medusa.target.architecture", fp.architecture)
    w.add_uint32("medusa.target.embedding_length", fp.embedding_length)
    w.add_string("medusa.target.vocab_hash", fp.vocab_hash)
    for key, values in (extra_arrays or {}).items():
        w.add_array(key, values)
    for name, a in tensors.items():
        if isinstance(a, tuple):
            w.add_tensor(name, a[0], raw_dtype=a[1])
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def good_tensors(vocab=8):
    return {res_weight_name(0, 0): np.zeros((H, H), np.float32),
            res_bias_name(0, 0): np.zeros(H, np.float32),
            out_weight_name(0): np.ones((vocab, H), np.float32)}


def test_hand_written_file_loads(tmp_path, target_path):
    heads = load_heads(write_raw(tmp_path / "ok.gguf", good_tensors(), target_path=target_path), target_path)
    np.testing.assert_array_equal(heads.token_ids, np.arange(10, 18))


def test_truncated_file(tmp_path, target_path):
    path = save_heads(tmp_path / "h.gguf", random_heads(target_path), dtype="f32")
    data = path.read_bytes()
    for keep in (len(data) - 100, len(data) // 2, 30, 3):
        bad = tmp_path / f"cut{keep}.gguf"
        bad.write_bytes(data[:keep])
        with pytest.raises(ModelFileError, match=r"truncated|not a GGUF") as e:
            load_heads(bad, target_path)
        assert str(bad) in str(e.value)


@pytest.mark.parametrize("name, array, pattern", [
    (res_weight_name(0, 0), np.zeros((H, H + 1), np.float32), r"shape \(64, 65\), expected \(64, 64\)"),
    (res_bias_name(0, 0), np.zeros(H - 1, np.float32), r"shape \(63,\), expected \(64,\)"),
    (out_weight_name(0), np.zeros((9, H), np.float32), r"shape \(9, 64\), expected \(8, 64\)"),
])
def test_wrong_shape(tmp_path, target_path, name, array, pattern):
    tensors = good_tensors() | {name: array}
    path = write_raw(tmp_path / "bad.gguf", tensors, target_path=target_path)
    with pytest.raises(ModelFileError, match=pattern) as e:
        load_heads(path, target_path)
    assert str(path) in str(e.value) and name in str(e.value)


def test_wrong_dtype(tmp_path, target_path):
    q4 = gguf.GGMLQuantizationType.Q4_0
    raw = gguf.quants.quantize(np.zeros((H, H), np.float32), q4)
    cases = {res_weight_name(0, 0): (raw, q4),
             res_bias_name(0, 0): (gguf.quants.quantize(np.zeros(H, np.float32),
                                                        gguf.GGMLQuantizationType.Q8_0),
                                   gguf.GGMLQuantizationType.Q8_0),
             out_weight_name(0): np.zeros((8, H), np.int32)}
    for name, a in cases.items():
        path = write_raw(tmp_path / "bad.gguf", good_tensors() | {name: a}, target_path=target_path)
        with pytest.raises(ModelFileError, match=f"{name} has type .*, expected one of"):
            load_heads(path, target_path)


def test_missing_tensor_key_and_extra_tensor(tmp_path, target_path):
    tensors = good_tensors()
    del tensors[res_bias_name(0, 0)]
    path = write_raw(tmp_path / "a.gguf", tensors, target_path=target_path)
    with pytest.raises(ModelFileError, match="missing tensor medusa.0.res.0.bias"):
        load_heads(path, target_path)
    path = write_raw(tmp_path / "b.gguf", good_tensors(), tied=True, target_path=target_path)
    with pytest.raises(ModelFileError, match="unexpected tensor .medusa.0.out.weight."):
        load_heads(path, target_path)
    path = write_raw(tmp_path / "c.gguf", good_tensors(), drop_key="medusa.vocab_size",
                     target_path=target_path)
    with pytest.raises(ModelFileError, match="missing metadata key medusa.vocab_size"):
        load_heads(path, target_path)
    path = write_raw(tmp_path / "d.gguf", good_tensors(), n_heads=2, target_path=target_path)
    with pytest.raises(ModelFileError, match="missing tensor medusa.1.res.0.weight: 2 heads of 1 residual "
                                             "layers and an output need 6 tensors, the file holds 3"):
        load_heads(path, target_path)
    renamed = {k.replace("res.0", "res.1"): v for k, v in good_tensors().items()}
    path = write_raw(tmp_path / "e.gguf", renamed, target_path=target_path)
    with pytest.raises(ModelFileError, match="unexpected tensor .medusa.0.res.1.bias."):
        load_heads(path, target_path)


# loads a head file in a process of bounded memory; prints the error
HOSTILE_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from ggspec.errors import ModelFileError
from ggspec.heads import load_heads
try:
    load_heads(sys.argv[1], sys.argv[2])
except ModelFileError as e:
    print(e)
"""


@pytest.mark.parametrize("key", ["n_heads", "n_layers", "both"])
def test_huge_counts_are_checked_against_the_tensors_first(tmp_path, target_path, key):
    """head_count / residual_layer_count of 2^32 - 1 in a file of three tensors: one clear
    error at once, in bounded memory (they used to drive loops and allocations first)."""
    huge = 2**32 - 1
    counts = {"n_heads": huge} if key == "n_heads" else {"n_layers": huge} if key == "n_layers" else \
        {"n_heads": huge, "n_layers": huge}
    path = write_raw(tmp_path / "huge.gguf", good_tensors(), target_path=target_path, **counts)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", HOSTILE_CHILD, str(path), target_path], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"head file {path}: missing tensor ") and "the file holds 3" in proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1


def test_not_a_head_file(tmp_path, target_path):
    with pytest.raises(ModelFileError, match="architecture is 'llama', expected 'medusa'"):
        load_heads(target_path, target_path)
    with pytest.raises(ModelFileError, match="head file not found"):
        load_heads(tmp_path / "nope.gguf", target_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load_heads(junk, target_path)
    path = save_heads(tmp_path / "h.gguf", random_heads(target_path), dtype="f32")
    with pytest.raises(ModelFileError, match="target model file not found"):
        load_heads(path, tmp_path / "missing-target.gguf")


def test_measured_acceptance_round_trips_and_is_validated(tmp_path, target_path):
    heads = random_heads(target_path)
    acc = np.random.default_rng(5).uniform(size=(3, 8))
    path = save_heads(tmp_path / "h.gguf", MedusaHeads(
        heads.res_weight, heads.res_bias, heads.out_weight, token_ids=heads.token_ids,
        tied=False, target=heads.target, acceptance=acc), dtype="f32")
    back = load_heads(path, target_path)
    np.testing.assert_allclose(back.acceptance, acc, rtol=1e-6)
    np.testing.assert_allclose(back.restrict(n_heads=2).acceptance, acc[:2], rtol=1e-6)
    assert load_heads(save_heads(tmp_path / "none.gguf", heads, dtype="f32"), target_path).acceptance is None
    with pytest.raises(ValueError, match="acceptance"):
        MedusaHeads(heads.res_weight, heads.res_bias, heads.out_weight, token_ids=heads.token_ids,
                    tied=False, target=heads.target, acceptance=acc * 2)
    for values, ok in (([0.5, 0.25, 0.1], True), ([1.5], False), ([0.5, -0.1], False)):
        path = write_raw(tmp_path / "acc.gguf", good_tensors(), target_path=target_path,
                         extra_arrays={"medusa.acceptance": values})
        if ok:
            np.testing.assert_allclose(load_heads(path, target_path).acceptance, [values])
        else:
            with pytest.raises(ModelFileError, match="medusa.acceptance"):
                load_heads(path, target_path)


def test_token_ids_out_of_range(tmp_path, target_path):
    info = read_target(target_path)
    heads = random_heads(target_path)
    bad = MedusaHeads(heads.res_weight, heads.res_bias, heads.out_weight,
                      token_ids=heads.token_ids + info.n_vocab, tied=False, target=heads.target)
    path = save_heads(tmp_path / "h.gguf", bad, dtype="f32")
    with pytest.raises(ModelFileError, match="ids outside the target vocabulary"):
        load_heads(path, target_path)


# --- evaluation ------------------------------------------------------------------------

@pytest.mark.parametrize("tied, n_layers", [(False, 1), (False, 2), (True, 1), (True, 3)])
def test_propose_equals_per_head_reference(target_path, tied, n_layers):
    heads = random_heads(target_path, tied=tied, n_layers=n_layers, seed=n_layers)
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.standard_normal(H).astype(np.float32) * 3
        ref = reference_logits(heads, x)                                   # (nh, V)
        np.testing.assert_allclose(heads.logits(x[None])[0], ref, rtol=1e-4, atol=1e-4)
        ids, logprobs = heads.propose(x, 5)
        assert ids.shape == logprobs.shape == (heads.n_heads, 5)
        ref_rows = np.argsort(-ref, axis=1)[:, :5]
        np.testing.assert_array_equal(ids, heads.token_ids[ref_rows])
        ref_lp = ref - np.log(np.exp(ref - ref.max(1, keepdims=True)).sum(1, keepdims=True)) - ref.max(1, keepdims=True)
        np.testing.assert_allclose(logprobs, np.take_along_axis(ref_lp, ref_rows, 1), atol=1e-4)
        assert (np.diff(logprobs, axis=1) <= 0).all()


def test_zero_tied_heads_are_the_target_next_token_predictor(target_path):
    """With zero residual weights a tied head is the target's output layer on x."""
    info = read_target(target_path)
    z = np.zeros((2, 1, H, H), np.float32)
    heads = MedusaHeads(z, z[..., 0], info.output_rows(), token_ids=None, tied=True,
                        target=info.fingerprint)
    x = np.random.default_rng(0).standard_normal(H).astype(np.float32)
    ids, _ = heads.propose(x, 3)
    want = np.argsort(-(info.output_rows() @ x))[:3]
    np.testing.assert_array_equal(ids, [want, want])


def test_bad_arguments(target_path):
    heads = random_heads(target_path)
    with pytest.raises(ValueError, match="top_k"):
        heads.propose(np.zeros(H), 0)
    with pytest.raises(ValueError, match="res_bias"):
        MedusaHeads(heads.res_weight, heads.res_bias[:, :1], heads.out_weight,
                    token_ids=heads.token_ids, tied=False, target=heads.target)
    with pytest.raises(ValueError, match="token_ids"):
        MedusaHeads(heads.res_weight, heads.res_bias, heads.out_weight,
                    token_ids=heads.token_ids[:3], tied=False, target=heads.target)
    with pytest.raises(ValueError, match="dtype"):
        save_heads("x.gguf", heads, dtype="q4_0")


# --- hidden states from llama.cpp ------------------------------------------------------

def test_hidden_state_times_output_weight_is_the_logits(target_path):
    """The embeddings of a pooling-NONE context are the input of the output layer."""
    info = read_target(target_path)
    with Model(target_path) as m, Context(m, BackendConfig(n_ctx=64, n_batch=64, n_threads=1),
                                          embeddings=True) as ctx:
        tokens = m.tokenize("def hello world(): return the cat and the dog", add_special=True)
        logits = ctx.eval(tokens, logits="all").copy()
        hidden = ctx.hidden(len(tokens)).copy()
    recon = hidden @ info.output_rows().T
    np.testing.assert_allclose(recon, logits, atol=1e-3 * np.abs(logits).max())
    np.testing.assert_array_equal(recon.argmax(1), logits.argmax(1))


def test_embeddings_context_returns_the_rows_asked_for(target_path):
    """llama.cpp outputs every row of an embeddings context; decode still returns the
    logits of the rows that asked, like a context without embeddings."""
    cfg = BackendConfig(n_ctx=64, n_batch=64, n_threads=1)
    with Model(target_path) as m:
        tokens = m.tokenize("def hello world(): return the cat", add_special=True)
        want = np.zeros(len(tokens), np.int8)
        want[[2, -1]] = 1
        got = {}
        for emb in (False, True):
            with Context(m, cfg, embeddings=emb) as ctx:
                got[emb] = ctx.decode(tokens, range(len(tokens)), None, want).copy()
                ctx.clear()
                last = ctx.eval(tokens, logits="last")
                np.testing.assert_allclose(last[0], got[emb][1], atol=1e-4)
    assert got[True].shape == (2, m.n_vocab)
    np.testing.assert_allclose(got[True], got[False], atol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_restrict_keeps_the_first_heads_and_rows(target_path, tied):
    heads = random_heads(target_path, tied=tied, n_heads=3, vocab=40)
    small = heads.restrict(n_heads=2, vocab_size=10)
    assert (small.n_heads, small.vocab_size) == (2, 10)
    np.testing.assert_array_equal(small.token_ids, heads.token_ids[:10])
    x = np.random.default_rng(3).standard_normal(H).astype(np.float32)
    np.testing.assert_allclose(small.logits(x[None])[0], heads.logits(x[None])[0, :2, :10], rtol=1e-5)
    with pytest.raises(ValueError, match="restrict"):
        heads.restrict(n_heads=4)


# --- the real default target (marked `real`: pulled through the registry) ---------------

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "heads" / "qwen2.5-coder-1.5b-medusa.gguf"
REAL_NEAR_TIE = 0.5  # llama.cpp quantizes activations for Q4_K/Q6_K products


@pytest.mark.real
def test_real_hidden_state_times_output_weight_is_the_logits():
    from ggspec import hub
    target = hub.pull("qwen2.5-coder-1.5b")
    info = read_target(target)
    with Model(target) as m, Context(m, BackendConfig(n_ctx=128, n_batch=128, n_threads=2),
                                     embeddings=True) as ctx:
        tokens = m.tokenize("import os\nimport sys\n\n\ndef main(argv):\n    for arg in argv:\n"
                            "        print(arg)\n    return 0\n", add_special=True)
        logits = ctx.eval(tokens, logits="all").copy()
        hidden = ctx.hidden(len(tokens)).copy()
    recon = hidden @ info.output_rows().T                                  # (n, 151936)
    # measured: max |difference| 0.38 on logits up to 24; one of 25 argmaxes a near-tie
    assert np.abs(recon - logits).max() < 1.0
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > REAL_NEAR_TIE
    np.testing.assert_array_equal(recon.argmax(1)[clear], logits.argmax(1)[clear])


@pytest.mark.real
def test_shipped_heads_load_for_the_default_target():
    from ggspec import hub
    heads = load_heads(SHIPPED, hub.pull("qwen2.5-coder-1.5b"))
    assert heads.tied and heads.hidden == 1536 and heads.n_heads >= 3
    ids, logprobs = heads.propose(np.ones(1536, np.float32), 4)
    assert ids.shape == (heads.n_heads, 4) and (logprobs <= 0).all()


def test_truncated_target_is_refused(tmp_path, target_path):
    data = Path(target_path).read_bytes()
    cut = tmp_path / "cut-target.gguf"
    cut.write_bytes(data[:len(data) - 1000])
    with pytest.raises(ModelFileError, match="truncated"):
        read_target(cut)
    cut.write_bytes(data[:5000])
    with pytest.raises(ModelFileError, match="truncated"):
        read_target(cut)
