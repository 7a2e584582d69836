"""The tiny GGUF models of tests/tinymodels.py load and behave in real llama.cpp.

Everything here goes through llama-cpp-python's low-level C API, so these tests also pin
down the llama.cpp behaviour that the engine relies on.
"""

import ctypes
import os
import time

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from tinymodels import (  # noqa: E402
    CHATML,
    DEFAULT_LOGIT_SCALE,
    MISMATCH_TOKEN_ID,
    VOCAB,
    write_mismatched_vocab_llama,
    write_tiny_llama,
)

from ggspec import weights  # noqa: E402
from ggspec.gguffile import read_header  # noqa: E402


@llama_cpp.llama_log_callback
def _quiet(level, text, user_data):
    pass


llama_cpp.llama_log_set(_quiet, ctypes.c_void_p())  # _quiet stays referenced at module level
llama_cpp.llama_backend_init()

NOISES = (0.05, 0.1, 0.3)


class Tiny:
    """A model and one context (n_ctx 512, one sequence), freed context first."""

    def __init__(self, path, n_ctx=512):
        self.model = self.ctx = None
        mparams = llama_cpp.llama_model_default_params()
        keep = weights.place(mparams, read_header(path))  # the kernels the engine's load chose
        self.model = llama_cpp.llama_model_load_from_file(os.fsencode(path), mparams)
        del keep
        if not self.model:
            raise RuntimeError(f"cannot load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = 1  # tiny matrices: threads only add sync
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self.close()
            raise RuntimeError(f"cannot create a context for {path}")

    def close(self):
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def clear(self):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, tokens, pos0):
        """Decode tokens at positions pos0.. in sequence 0; logits of every row, (n, n_vocab)."""
        n = len(tokens)
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i] = t
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            llama_cpp.llama_batch_free(batch)
        rows = [
            np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
            for i in range(n)
        ]
        return np.array(rows)  # copies: the views die with the next decode

    def tokenize(self, text, add_special=True, parse_special=False):
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_special, parse_special)
        assert n >= 0
        return list(buf[:n])

    def piece(self, token, lstrip=0, special=False):
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), lstrip, special)
        assert n >= 0
        return buf.raw[:n]

    def detokenize(self, tokens, errors="strict"):
        """Text of tokens without BOS and without the SPM space prefix of the first word."""
        out = b""
        for t in tokens:
            if t == VOCAB.bos_id:
                continue
            out += self.piece(t, lstrip=0 if out else 1)
        return out.decode(errors=errors)

    def greedy(self, prompt, n):
        self.clear()
        logits = self.decode(prompt, 0)[-1]
        out = []
        for i in range(n):
            out.append(int(np.argmax(logits)))
            logits = self.decode(out[-1:], len(prompt) + i)[0]
        return out


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    p = {"target": write_tiny_llama(d / "target.gguf", seed=0)}
    for noise in NOISES:
        p[noise] = write_tiny_llama(d / f"draft{noise}.gguf", base=p["target"], noise=noise, seed=1)
    p["fresh"] = write_tiny_llama(d / "fresh.gguf", seed=123)
    p["one_layer"] = write_tiny_llama(d / "one_layer.gguf", seed=5, n_layer=1)
    p["no_template"] = write_tiny_llama(d / "no_template.gguf", chat_template=None)
    p["mismatch"] = write_mismatched_vocab_llama(d / "mismatch.gguf")
    return p


@pytest.fixture(scope="module")
def target(paths):
    with Tiny(paths["target"]) as m:
        yield m


def random_text_tokens(n, seed=0):
    normal = [i for i, t in enumerate(VOCAB.types) if t == 1]
    return [VOCAB.bos_id] + list(np.random.default_rng(seed).choice(normal, n - 1))


def test_files_are_small_and_load_fast(paths):
    for p in paths.values():
        assert os.path.getsize(p) < 1_000_000
    t0 = time.perf_counter()
    with Tiny(paths["target"]) as m:
        t1 = time.perf_counter()
        tokens = random_text_tokens(64)
        m.decode(tokens, 0)  # warm-up: the first decode allocates the compute buffers
        m.clear()
        t2 = time.perf_counter()
        m.decode(tokens, 0)
        t3 = time.perf_counter()
        m.decode([5], 64)
        t4 = time.perf_counter()
    print(f"\nsize {os.path.getsize(paths['target'])} B, load {1e3 * (t1 - t0):.1f} ms, "
          f"64-token prefill {1e3 * (t3 - t2):.2f} ms, 1 token {1e3 * (t4 - t3):.2f} ms")
    assert t1 - t0 < 1.0


def test_vocab_facts(target):
    assert target.n_vocab == VOCAB.n_vocab
    assert llama_cpp.llama_vocab_bos(target.vocab) == VOCAB.bos_id
    assert llama_cpp.llama_vocab_eos(target.vocab) == VOCAB.eos_id
    assert llama_cpp.llama_vocab_eot(target.vocab) == VOCAB.im_end_id
    for i in (0, 1, 2, 3, 100, VOCAB.n_vocab - 1):
        assert llama_cpp.llama_vocab_get_text(target.vocab, i).decode() == VOCAB.tokens[i]


def test_decode_logits_and_spread(target):
    tokens = random_text_tokens(100)
    target.clear()
    logits = target.decode(tokens, 0)
    assert logits.shape == (100, VOCAB.n_vocab)
    assert np.isfinite(logits).all()
    assert (logits[:, sorted(VOCAB.special_ids)] == 0).all()  # special tokens never predicted
    std = logits.std(axis=1)
    top2 = np.sort(logits, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p_top = (p / p.sum(axis=1, keepdims=True)).max(axis=1)
    print(f"\nlogit std over vocab {std.mean():.2f} (scale {DEFAULT_LOGIT_SCALE}), "
          f"max {logits.max(axis=1).mean():.2f}, top-2 gap median {np.median(gap):.2f} "
          f"min {gap.min():.3f}, p(top) at T=1 median {np.median(p_top):.2f}")
    assert 0.7 * DEFAULT_LOGIT_SCALE < std.mean() < 1.3 * DEFAULT_LOGIT_SCALE
    assert np.mean(gap > 0.05) > 0.9  # clear greedy winners
    assert 0.3 < np.median(p_top) < 0.9  # confident and uncertain positions, not one-hot
    assert len(set(np.argmax(logits, axis=1))) > 20  # the context matters


def test_single_token_decode_matches_batched_prefill(target):
    tokens = random_text_tokens(48, seed=1)
    target.clear()
    batched = target.decode(tokens, 0)
    target.clear()
    k = 32
    stepped = [target.decode(tokens[:k], 0)[-1]]
    stepped += [target.decode([t], k + i)[0] for i, t in enumerate(tokens[k:])]
    diff = np.abs(np.array(stepped) - batched[k - 1:]).max()
    print(f"\nmax |single-token - batched| logit difference {diff:.2e}")
    assert diff < 1e-3


def test_tokenize_round_trip(target):
    toks = target.tokenize("Hello world")
    assert toks == [VOCAB.bos_id, VOCAB.token_to_id["▁Hello"], VOCAB.token_to_id["▁world"]]
    assert target.detokenize(toks) == "Hello world"
    for text in ("def f(x):\n    return x + 1", "The cat, the dog! 42", "a  b"):
        assert target.detokenize(target.tokenize(text)) == text


def test_multibyte_characters(target):
    euro = target.tokenize("€", add_special=False)
    assert euro == [VOCAB.token_to_id["▁"], VOCAB.token_to_id["€"]]
    assert target.detokenize(target.tokenize("5 € 日本")) == "5 € 日本"
    # "ü" is no piece: byte fallback, one byte per token, joined only as bytes
    u = target.tokenize("ü", add_special=False)
    assert u[1:] == [VOCAB.byte_ids[0xC3], VOCAB.byte_ids[0xBC]]
    assert [target.piece(t) for t in u[1:]] == [b"\xc3", b"\xbc"]
    assert target.detokenize(u) == "ü"
    assert target.detokenize(target.tokenize("naïve 😀")) == "naïve 😀"


def test_end_of_generation_tokens(target):
    for t in (VOCAB.eos_id, VOCAB.im_end_id):
        assert llama_cpp.llama_vocab_is_eog(target.vocab, t)
    for t in (VOCAB.bos_id, VOCAB.im_start_id, VOCAB.token_to_id["▁the"], VOCAB.byte_ids[10]):
        assert not llama_cpp.llama_vocab_is_eog(target.vocab, t)
    toks = target.tokenize("<|im_start|>user\nhi<|im_end|>", add_special=False, parse_special=True)
    assert toks[0] == VOCAB.im_start_id and toks[-1] == VOCAB.im_end_id
    assert target.piece(VOCAB.im_end_id) == b""
    assert target.piece(VOCAB.im_end_id, special=True) == b"<|im_end|>"


def test_chat_template(target, paths):
    assert llama_cpp.llama_model_chat_template(target.model, None).decode() == CHATML
    with Tiny(paths["no_template"]) as m:
        assert llama_cpp.llama_model_chat_template(m.model, None) is None


def _agreement(target, other, tokens):
    target.clear()
    other.clear()
    a = target.decode(tokens, 0).argmax(axis=1)
    b = other.decode(tokens, 0).argmax(axis=1)
    return float(np.mean(a == b))


def test_draft_agrees_with_base(target, paths):
    tokens = random_text_tokens(200, seed=2)
    rates = {}
    for name in (*NOISES, "fresh", "one_layer"):
        with Tiny(paths[name]) as m:
            rates[name] = _agreement(target, m, tokens)
    print("\nargmax agreement with the target on a random continuation:", rates)
    assert rates[0.05] > 0.7
    assert rates[0.1] > 0.5
    assert rates[0.05] > rates[0.1] > rates[0.3]
    assert rates["fresh"] < 0.05 and rates["one_layer"] < 0.05


def test_greedy_draft_chain_agreement(target, paths):
    """Along the target's own greedy continuation (what a draft must predict)."""
    prompt = target.tokenize("def hello(self):")
    out = target.greedy(prompt, 100)
    tokens = prompt + out
    with Tiny(paths[0.1]) as m:
        rate = _agreement(target, m, tokens)
    print(f"\nnoise 0.1 draft, greedy continuation agreement {rate:.2f}: "
          f"{target.detokenize(out, errors='replace')!r}")
    assert rate > 0.4


def test_base_shape_must_match(paths, tmp_path):
    with pytest.raises(ValueError, match="n_layer"):
        write_tiny_llama(tmp_path / "x.gguf", base=paths["target"], n_layer=3)


def test_other_shapes_share_the_vocabulary(target, paths):
    with Tiny(paths["one_layer"]) as m:
        assert m.n_vocab == target.n_vocab
        assert m.tokenize("Hello world") == target.tokenize("Hello world")
        assert np.isfinite(m.decode(random_text_tokens(16), 0)).all()


def test_mismatched_vocabulary(target, paths):
    with Tiny(paths["mismatch"]) as m:
        assert m.n_vocab == target.n_vocab
        texts = [llama_cpp.llama_vocab_get_text(m.vocab, i).decode() for i in range(m.n_vocab)]
    differ = [i for i, t in enumerate(texts) if t != VOCAB.tokens[i]]
    assert differ == [MISMATCH_TOKEN_ID]


def test_eog_trigger(paths, tmp_path):
    """eog_after=[t]: <|im_end|> right after t, otherwise the same greedy output."""
    prompt = [VOCAB.bos_id, VOCAB.token_to_id["▁def"]]
    with Tiny(paths["target"]) as m:
        plain = m.greedy(prompt, 30)
    trigger = plain[10]
    first = plain.index(trigger)
    p = write_tiny_llama(tmp_path / "eog.gguf", seed=0, eog_after=[trigger])
    with Tiny(p) as m:
        out = m.greedy(prompt, first + 2)
        logits = m.decode([trigger], len(prompt) + first + 2)[0]
    assert out[: first + 1] == plain[: first + 1]
    assert out[first + 1] == VOCAB.im_end_id
    print(f"\nEOG logit after the trigger {logits[VOCAB.im_end_id]:.1f}, "
          f"next best {np.sort(logits)[-2]:.1f}")
