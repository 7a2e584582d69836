"""EAGLE-3 drafts in llama.cpp's eagle3 format: files ggspec writes load in llama.cpp, the
numpy forward matches llama.cpp's own eagle3 graph on the same file, malformed files fail
with one line."""

from __future__ import annotations

import ctypes

import gguf
import llama_cpp
import numpy as np
import pytest

from ggspec.backend import Model
from ggspec.errors import ModelFileError
from ggspec.heads.eagle import TENSORS, load_eagle
from tinymodels import write_tiny_eagle, write_tiny_llama


@pytest.fixture(scope="module")
def eagle_path(tmp_path_factory, target_path):
    return str(write_tiny_eagle(tmp_path_factory.mktemp("eagle") / "eagle.gguf", target_path,
                                draft_vocab=40))


def test_written_file_loads_in_llama_cpp_and_round_trips(eagle_path, target_path, tmp_path):
    with Model(eagle_path, heads=True) as m:  # llama_model_load_from_file accepts it
        assert m.metadata("general.architecture") == "eagle3"
        assert m.metadata("eagle3.target_hidden_size") == "64"
    heads = load_eagle(eagle_path, target_path)
    again = write_tiny_eagle(tmp_path / "again.gguf", target_path, draft_vocab=40)
    back = load_eagle(again, target_path)
    for attr in set(TENSORS.values()):
        a, b = getattr(heads.w, attr), getattr(back.w, attr)
        assert (a is None and b is None) or np.array_equal(a, b), attr
    assert heads.cfg == back.cfg and heads.vocab_size == 40 and heads.d2t.shape == (40,)


class _LlamaEagle:
    """llama.cpp's eagle3 decoder graph on the same file: rows carry a token and g."""

    def __init__(self, model: Model, n_ctx: int = 64):
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max, p.kv_unified = n_ctx, 16, 16, 4, True
        self.ctx = llama_cpp.llama_init_from_model(model.handle, p)
        self.batch = llama_cpp.llama_batch_init(16, 0, 4)
        self.n_vocab = model.n_vocab

    def decode(self, tokens, g, positions, seqs):
        n, b = len(tokens), self.batch
        embd = np.ascontiguousarray(g, dtype=np.float32)
        b.n_tokens, b.embd = n, embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        for i in range(n):
            b.token[i], b.pos[i], b.logits[i] = int(tokens[i]), int(positions[i]), 1
            b.n_seq_id[i] = len(seqs[i])
            for j, s in enumerate(seqs[i]):
                b.seq_id[i][j] = s
        assert llama_cpp.llama_decode(self.ctx, b) == 0
        b.embd = None  # the batch does not own it
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(n, self.n_vocab)).copy()

    def close(self):
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


@pytest.mark.parametrize("draft_vocab,norm_before_residual", [(40, False), (None, True)])
def test_numpy_forward_matches_llama_cpp_graph(tmp_path, target_path, draft_vocab, norm_before_residual):
    """A 5-row prefix, then one tree depth of 3 nodes (two siblings, one grandchild) seen
    through sequence ids by llama.cpp and through the visibility mask by numpy: the same
    logits within 0.02 on a logit scale of about 10 (llama.cpp keeps its KV cache in F16)."""
    path = write_tiny_eagle(tmp_path / "e.gguf", target_path, draft_vocab=draft_vocab,
                            norm_before_residual=norm_before_residual, seed=3)
    heads = load_eagle(path, target_path)
    rng = np.random.default_rng(0)
    n_vocab = heads.embd.shape[0]
    with Model(path, heads=True) as model:
        ref = _LlamaEagle(model)
        try:
            toks = rng.integers(0, n_vocab, 5)
            g = heads.fuse(rng.standard_normal((5, 3 * heads.cfg.target_hidden)))
            got1 = ref.decode(toks, g, range(5), [[0]] * 5)
            for s in (1, 2):
                llama_cpp.llama_memory_seq_cp(llama_cpp.llama_get_memory(ref.ctx), 0, s, -1, -1)
            cache = heads.new_cache(16)
            z1, pre = heads.step(cache, toks, g, np.arange(5), np.tril(np.ones((5, 5), bool)))
            # depth 1: two siblings after the prefix; depth 2: a child of the first
            tree_toks = rng.integers(0, n_vocab, 3)
            tree_g = np.stack([pre[-1], pre[-1], pre[-1] * 0.5])
            got2 = ref.decode(tree_toks, tree_g, [5, 5, 6], [[1], [2], [1]])
            visible = np.zeros((3, 8), bool)
            visible[:, :5] = True
            visible[0, 5] = visible[1, 6] = True
            visible[2, [5, 7]] = True
            z2, _ = heads.step(cache, tree_toks, tree_g, np.array([5, 5, 6]), visible)
        finally:
            ref.close()
    for got, z in ((got1, z1), (got2, z2)):
        want = np.full(got.shape, -np.inf, np.float32)
        want[:, heads.target_ids(np.arange(heads.vocab_size))] = z
        assert (np.isfinite(got) == np.isfinite(want)).all()
        fin = np.isfinite(got)
        assert np.abs(got[fin] - want[fin]).max() < 0.02, np.abs(got[fin] - want[fin]).max()
        assert np.abs(want[fin]).max() > 3


def _rewrite(src, dst, *, drop_key=None, set_key=None, drop_tensor=None, tensor=None):
    """A copy of draft file src (eagle3, eagle1) with one key or tensor changed."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", drop_key):
            continue
        if set_key and f.name == set_key[0]:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    if set_key:
        name, value, vtype = set_key
        sub = gguf.GGUFValueType.INT32 if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, value, vtype, sub_type=sub)
    for t in r.tensors:
        if t.name == drop_tensor:
            continue
        data = np.array(t.data)
        if tensor and t.name == tensor[0]:
            data = tensor[1]
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type if data.dtype == np.int64 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_malformed_files_fail_with_one_line(eagle_path, target_path, tmp_path, tiny_dir):
    A = gguf.GGUFValueType.ARRAY
    cases = [
        (dict(drop_key="eagle3.target_layers"), "missing metadata key eagle3.target_layers"),
        (dict(set_key=("eagle3.target_layers", [0, 1], A)), "must hold 3 layer ids"),
        (dict(set_key=("eagle3.target_layers", [0, 1, 2], A)), r"target layers \[0, 1, 2\] outside the target.s layers 0..1"),
        (dict(drop_tensor="blk.0.attn_q.weight"), "missing tensor blk.0.attn_q.weight"),
        (dict(tensor=("fc.weight", np.zeros((64, 100), np.float32))), r"tensor fc.weight has shape \(64, 100\)"),
        (dict(tensor=("d2t", np.full(40, 5000, np.int64))), "d2t holds ids outside the target vocabulary"),
        (dict(tensor=("d2t", np.zeros(40, np.int64))), "d2t maps two draft rows to one target token"),
        (dict(drop_tensor="d2t"), "no d2t to map them"),
        (dict(tensor=("blk.0.ffn_norm.weight", np.full(64, np.nan, np.float32))), "NaN"),
    ]
    for i, (change, message) in enumerate(cases):
        bad = _rewrite(eagle_path, tmp_path / f"bad{i}.gguf", **change)
        with pytest.raises(ModelFileError, match=message) as e:
            load_eagle(bad, target_path)
        assert "\n" not in str(e.value)
    other = write_tiny_llama(tiny_dir / "other_vocab.gguf", seed=0, extra_tokens=3)
    with pytest.raises(ModelFileError, match="made for another target"):
        load_eagle(eagle_path, other)
    with pytest.raises(ModelFileError, match="expected 'eagle3'"):
        load_eagle(target_path, target_path)


def test_taps_copy_layer_inputs_of_every_row(target_path):
    """The input of layer 0 is the token embedding; the input of layer n (after the last
    layer), RMS-normed with output_norm, is the hidden state llama.cpp returns as the
    embedding; a tree decode gives one row per node."""
    from ggspec.backend import Context, layer_input_name
    from ggspec.config import BackendConfig
    from ggspec.heads.nn import rms_norm
    from ggspec.heads.target import read_target
    from ggspec.tree import Tree

    with Model(target_path) as m:
        info = read_target(m)
        n = info.n_layer
        taps = [layer_input_name(i) for i in (0, 1, n)]
        with Context(m, BackendConfig(n_ctx=128, n_batch=32), taps=taps, embeddings=True,
                     n_seq_max=4) as c:
            ids = m.tokenize("hello world, this is a test")
            c.eval(ids, logits="all")
            f = c.tapped(len(ids)).copy()
            hidden = c.hidden(len(ids)).copy()
            c.eval_tree([5, 6, 7, 8], Tree((-1, -1, 0)))  # pending token and 3 nodes
            assert c.tapped(4).shape == (4, 3 * m.n_embd)
            np.testing.assert_array_equal(c.tapped(4)[:, :m.n_embd],
                                          info.rows(info.token_embd, np.array([5, 6, 7, 8])))
        with Context(m, BackendConfig(n_ctx=128, n_batch=32)) as plain:
            with pytest.raises(RuntimeError, match="without taps"):
                plain.tapped(1)
    d = m.n_embd
    np.testing.assert_array_equal(f[:, :d], info.rows(info.token_embd, np.array(ids)))
    out_norm = np.ones(d, np.float32)  # tinymodels writes output_norm = 1
    np.testing.assert_allclose(rms_norm(f[:, 2 * d:], out_norm, 1e-5), hidden, atol=2e-3)
    assert not np.allclose(f[:, d:2 * d], f[:, :d])


@pytest.mark.parametrize("kind,rel", [(dict(draft_vocab=40), 0.01),
                                      (dict(draft_vocab=300, own_embd=False, dtype="q8_0"), 0.03),
                                      (dict(own_embd=False, own_output=False, norm_before_fc=True,
                                            norm_before_residual=True), 0.01)])
def test_numpy_and_llama_paths_agree(tmp_path, target_path, kind, rel):
    """The two evaluators on the same file and inputs: a committed prefix, a rewind, then
    a tree of three depths (siblings apart, a grandchild under the second node). Fused
    features, logits and pre-norm outputs agree within 1% of their scale (llama.cpp keeps
    its KV cache in F16), 3% with Q8_0 weights (llama.cpp quantizes the activations that
    meet them to 8 bits too; numpy multiplies in float32), and the greedy tree
    (each node's best child) is the same."""
    from contextlib import ExitStack

    from ggspec.backend import Context
    from ggspec.config import BackendConfig
    from ggspec.heads.eagle_paths import open_path

    path = write_tiny_eagle(tmp_path / "e.gguf", target_path, seed=5, **kind)
    heads = load_eagle(path, target_path)
    rng = np.random.default_rng(1)
    cfg = BackendConfig(n_ctx=128, n_batch=16, n_threads=1)
    with ExitStack() as stack:
        target = stack.enter_context(Model(target_path, cfg))
        ctx = stack.enter_context(Context(target, cfg, n_seq_max=4))
        paths = [open_path(name, heads, path, cfg, ctx, stack, 4, 3) for name in ("numpy", "llama")]
        assert [p.name for p in paths] == ["numpy", "llama"]
        features = rng.standard_normal((20, 3 * heads.cfg.target_hidden)).astype(np.float32)
        g = [p.fuse(features) for p in paths]
        _close(*g, rel)
        toks = rng.integers(0, heads.embd.shape[0], 21)
        outs = [[p.commit(toks[:20], g[0], np.arange(20)),           # 20 rows: two batches of 16
                 p.commit(toks[9:13], g[0][8:12], np.arange(8, 12))]  # a rewind to position 8
                for p in paths]
        frontier = [np.stack([o[-1][1]] * 4) for o in outs]
        parents = np.full(4, -1)
        for d in range(3):
            tree_toks = rng.integers(0, heads.embd.shape[0], 4)
            step = [p.expand(tree_toks, f, 12 + d, parents) for p, f in zip(paths, frontier)]
            outs = [o + [s] for o, s in zip(outs, step)]
            assert np.array_equal(*(s[0].argmax(1) for s in step))     # the same greedy children
            frontier = [s[1] for s in step]
            parents = np.array([1, 1, 0, 3])
        for p in paths:
            p.end_tree()
        for a, b in zip(*outs):
            _close(a[0], b[0], rel)
            _close(a[1], b[1], rel)


def _close(a, b, rel):
    fin = np.isfinite(a)
    assert np.array_equal(fin, np.isfinite(b))
    scale = np.abs(a[fin]).max()
    assert np.abs(a[fin] - b[fin]).max() <= rel * scale, (np.abs(a[fin] - b[fin]).max(), scale)
