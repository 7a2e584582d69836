"""Tiny but real llama-architecture GGUF models for fast tests.

`write_tiny_llama` writes a random-weight llama model (a few hundred KB) that llama.cpp
loads and decodes in milliseconds. Every model written here shares one SPM vocabulary
(`VOCAB`), so any two of them form a valid target/draft pair:

    target = write_tiny_llama(tmp / "target.gguf", seed=0)
    draft = write_tiny_llama(tmp / "draft.gguf", base=target, noise=0.1, seed=1)  # similar
    other = write_tiny_llama(tmp / "other.gguf", seed=7, n_layer=1)               # unrelated

Weights are scaled so that the logits over the vocabulary have a standard deviation of
about `logit_scale` (default 3): greedy argmax has a clear winner (median top-2 gap ≈ 1.5,
far above float noise) while sampling at temperature 1 is not one-hot (median top
probability ≈ 0.6, from ≈ 0.25 to ≈ 1 across positions). Like a real model, each token
pushes up one "successor" token by a random amount, so some positions are confident and
some are not; byte tokens get half the logit spread, so output is mostly whole pieces.

A draft made from `base` with relative `noise` agrees with the base's argmax on about
90% / 80% / 65% / 25% of positions for noise 0.02 / 0.05 / 0.1 / 0.3 (random text); a
model with another seed or shape on about 0%.

Embedding channel 0 is reserved as an end-of-generation trigger: no layer reads or writes
it, and only the tokens in `eog_after` carry a (tiny) value there, which the output layer
maps to a large logit of `eog_id`. So `eog_after=[t]` makes the model emit `eog_id` right
after token t and changes nothing else (up to float noise); by default no special token is
ever predicted (their output rows are zero, i.e. logit exactly 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Collection

import gguf
import numpy as np

CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_ENGLISH = (
    "the a an and of to in is it that for on with as was he she they we you I be this are "
    "or by from at not but have has had one all can will there their what so if out up "
    "about who when which do hello world Hello World The cat dog time day good new first "
    "last long great little old big small next young man woman year way thing people say "
    "see make go know take come think look want give use find tell ask work seem feel try "
    "leave call very just also only then now here more most some any no yes my your our"
)
_PYTHON = (
    "def return import class self print None True False range else elif while lambda "
    "yield try except pass len list dict str int x y i n value result data name args"
)
_FRAGMENTS = "ing ed er ly es tion th he in on an re at en or ll"
_SYMBOLS = list(".,!?:;'\"()[]{}=+-*/_#<>%&@") + ["==", "()", "):", "->", "\u2581="]
_MULTIBYTE = ["é", "€", "日", "本", "日本"]
_SPACE = "\u2581"  # SentencePiece's word-boundary marker, printed as a space


@dataclass(frozen=True)
class Vocab:
    """The one vocabulary shared by every tiny model: ids, texts, types and special ids."""

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]
    unk_id: int
    bos_id: int
    eos_id: int
    im_start_id: int
    im_end_id: int
    byte_ids: tuple[int, ...]  # byte_ids[b] is the id of <0xBB>
    token_to_id: dict[str, int] = field(repr=False, compare=False)

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    @property
    def eog_ids(self) -> frozenset[int]:
        return frozenset((self.eos_id, self.im_end_id))

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset((self.unk_id, self.bos_id, self.eos_id, self.im_start_id, self.im_end_id))


def _build_vocab() -> Vocab:
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256

    words = [_SPACE + w for w in (_ENGLISH + " " + _PYTHON).split()]
    pieces = [_SPACE, _SPACE * 2, _SPACE * 4, *_FRAGMENTS.split(), *_SYMBOLS, *_MULTIBYTE, *words]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces += [chr(c) for c in range(ord("0"), ord("9") + 1)]
    # SPM merges adjacent pieces pairwise: keep the vocabulary closed under prefixes so
    # that every piece is reachable (e.g. "▁the" via "▁t", "▁th").
    closed: dict[str, None] = {}
    for p in pieces:
        for k in range(1, len(p) + 1):
            closed.setdefault(p[:k])
    normal = sorted(closed, key=len)  # stable: shorter pieces first, higher score
    tokens += normal
    types += [T.NORMAL] * len(normal)
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [T.CONTROL, T.CONTROL]

    n_fixed = 3 + 256
    scores = [0.0] * n_fixed + [-float(i) for i in range(len(normal))] + [0.0, 0.0]
    token_to_id = {t: i for i, t in enumerate(tokens)}
    assert len(token_to_id) == len(tokens), "duplicate token text"
    return Vocab(
        tokens=tuple(tokens),
        scores=tuple(scores),
        types=tuple(int(t) for t in types),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        im_start_id=token_to_id["<|im_start|>"],
        im_end_id=token_to_id["<|im_end|>"],
        byte_ids=tuple(range(3, 3 + 256)),
        token_to_id=token_to_id,
    )


VOCAB = _build_vocab()

# write_mismatched_vocab_llama changes the text of this token ("▁world") by default.
MISMATCH_TOKEN_ID = VOCAB.token_to_id[_SPACE + "world"]

_DEFAULTS = dict(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_ctx=512)
_HPARAM_KEYS = dict(
    n_layer="llama.block_count",
    n_embd="llama.embedding_length",
    n_head="llama.attention.head_count",
    n_head_kv="llama.attention.head_count_kv",
    n_ff="llama.feed_forward_length",
    n_ctx="llama.context_length",
)
DEFAULT_LOGIT_SCALE = 3.0
_EOG_TRIGGER_VALUE = 1e-2  # tiny: changes the trigger token's RMS norm by ~1e-6
_EOG_LOGIT = 50.0  # the EOG logit after a trigger token, far above all others
_BYTE_LOGIT_FACTOR = 0.5  # byte tokens: logit std logit_scale / 2, rarely the argmax
_SUCCESSOR_BONUS = 5.0  # the largest successor push, in units of logit_scale
_RMS_EPS = 1e-5


def write_tiny_llama(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_layer: int | None = None,
    n_embd: int | None = None,
    n_head: int | None = None,
    n_head_kv: int | None = None,
    n_ff: int | None = None,
    n_ctx: int | None = None,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    base: str | os.PathLike[str] | None = None,
    noise: float = 0.0,
    chat_template: str | None = CHATML,
    eog_after: Collection[int] = (),
    eog_id: int | None = None,
    extra_tokens: int = 0,
) -> Path:
    """Write a random llama model with the shared `VOCAB` to `path` and return the path.

    Shapes default to n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_ctx=512.
    `logit_scale` is the standard deviation of the logits over the vocabulary.
    With `base` (a file written by this function) the weights are base's, shapes included
    (passing a different shape raises ValueError), and every weight is multiplied by
    `1 + noise * N(0, 1)` (seeded by `seed`); `logit_scale`, `eog_after` and `eog_id` are
    then base's.
    `eog_after`: token ids after which the model predicts `eog_id` (default `<|im_end|>`).
    `extra_tokens`: append this many ordinary tokens `<extra_0>`, ... after `VOCAB` (text
    never tokenizes to them, but the model predicts them like any other token); the
    weights of the `VOCAB` tokens stay those of the model without them.
    """
    path = Path(path)
    shapes = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                  n_ff=n_ff, n_ctx=n_ctx)
    hparams, tensors = _model(seed, shapes, logit_scale, base, noise, eog_after, eog_id)
    tokens = VOCAB.tokens + tuple(f"<extra_{i}>" for i in range(extra_tokens))
    if extra_tokens:
        tensors = _add_tokens(tensors, extra_tokens, logit_scale, np.random.default_rng([seed, extra_tokens]))
    _write(path, tokens, hparams, tensors, chat_template, name=f"tiny-llama-{seed}")
    return path


def _add_tokens(tensors: dict[str, np.ndarray], n: int, logit_scale: float, rng) -> dict[str, np.ndarray]:
    """Embedding and output rows for n more tokens, drawn like the others'."""
    emb, out = tensors["token_embd.weight"], tensors["output.weight"]
    d = emb.shape[1]
    new_emb = rng.standard_normal((n, d))
    new_out = rng.standard_normal((n, d)) * (logit_scale / np.sqrt(d))
    new_emb[:, 0] = new_out[:, 0] = 0.0  # channel 0 is the EOG trigger
    return {**tensors, "token_embd.weight": np.concatenate([emb, new_emb]).astype(np.float32),
            "output.weight": np.concatenate([out, new_out]).astype(np.float32)}


def write_mismatched_vocab_llama(
    path: str | os.PathLike[str],
    *,
    token_id: int = MISMATCH_TOKEN_ID,
    piece: str = _SPACE + "wörld",
    seed: int = 0,
    **kwargs,
) -> Path:
    """Write a tiny model whose vocabulary equals `VOCAB` except that token `token_id`
    has the text `piece`; everything else (size, special ids, weights for `seed` and
    `kwargs` of write_tiny_llama) is the same."""
    if piece in VOCAB.token_to_id:
        raise ValueError(f"{piece!r} is already token {VOCAB.token_to_id[piece]}")
    template = kwargs.pop("chat_template", CHATML)
    shapes = {k: kwargs.pop(k, None) for k in _HPARAM_KEYS}
    hparams, tensors = _model(seed, shapes, **kwargs)
    tokens = list(VOCAB.tokens)
    tokens[token_id] = piece
    path = Path(path)
    _write(path, tokens, hparams, tensors, template, name=f"tiny-llama-mismatch-{seed}")
    return path


RECURRENT_ARCHS = ("mamba", "lfm2")
_MAMBA = dict(d_conv=4, d_state=8, dt_rank=4)
_LFM2_L_CACHE = 3  # short-convolution width


def write_tiny_recurrent(
    path: str | os.PathLike[str],
    arch: str = "mamba",
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_ctx: int = 512,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    noise: float = 0.0,
    noise_seed: int = 1,
) -> Path:
    """Write a random model with the shared `VOCAB` whose memory is a recurrent state:
    "mamba" (every layer a Mamba block: a pure state-space model) or "lfm2" (a hybrid:
    short-convolution layers with an attention layer every second layer). Logits are
    shaped as write_tiny_llama's (the same successor structure). With `noise`, every
    weight of the model for `seed` is multiplied by `1 + noise * N(0, 1)` (seeded by
    `noise_seed`): a draft for it, as `base` gives for llama models."""
    if arch not in RECURRENT_ARCHS:
        raise ValueError(f"arch must be one of {RECURRENT_ARCHS}, got {arch!r}")
    rng = np.random.default_rng(seed)
    d = n_embd
    t = {"token_embd.weight": _embeddings(rng, d, ())}
    hp = dict(n_layer=n_layer, n_embd=d, n_ctx=n_ctx)
    layers = _mamba_layer if arch == "mamba" else _lfm2_layer
    for i in range(n_layer):
        t.update({f"blk.{i}.{k}": v for k, v in layers(rng, i, d).items()})
    t["token_embd_norm.weight" if arch == "lfm2" else "output_norm.weight"] = np.ones(d)
    t["output.weight"] = _output_layer(rng, t["token_embd.weight"], logit_scale, VOCAB.im_end_id)
    noisy = np.random.default_rng(noise_seed)
    tensors = {k: _perturb(v.astype(np.float32), noise, noisy) for k, v in t.items()}

    def hparams(w: gguf.GGUFWriter) -> None:
        w.add_context_length(n_ctx)
        w.add_embedding_length(d)
        w.add_block_count(n_layer)
        w.add_layer_norm_rms_eps(_RMS_EPS)
        if arch == "mamba":
            w.add_ssm_conv_kernel(_MAMBA["d_conv"])
            w.add_ssm_inner_size(2 * d)
            w.add_ssm_state_size(_MAMBA["d_state"])
            w.add_ssm_time_step_rank(_MAMBA["dt_rank"])
        else:
            w.add_feed_forward_length(2 * d)
            w.add_head_count(_LFM2_HEADS)
            w.add_head_count_kv([_LFM2_HEADS_KV if i % 2 else 0 for i in range(n_layer)])
            w.add_rope_freq_base(10000.0)
            w.add_shortconv_l_cache(_LFM2_L_CACHE)

    path = Path(path)
    _write_gguf(path, arch, VOCAB.tokens, hparams, tensors, CHATML, name=f"tiny-{arch}-{seed}")
    return path


def _mamba_layer(rng, i: int, d: int) -> dict[str, np.ndarray]:
    """One Mamba block in (out, in) order; channel 0 of the residual is neither read nor
    written (the EOG trigger)."""
    d_inner, d_conv, d_state, dt_rank = 2 * d, _MAMBA["d_conv"], _MAMBA["d_state"], _MAMBA["dt_rank"]
    out = _linear(rng, d, d_inner)
    out[0, :] = 0.0
    return {
        "attn_norm.weight": np.ones(d),
        "ssm_in.weight": _linear(rng, 2 * d_inner, d),
        "ssm_conv1d.weight": rng.standard_normal((d_inner, d_conv)) / np.sqrt(d_conv),
        "ssm_conv1d.bias": np.zeros(d_inner),
        "ssm_x.weight": _linear(rng, dt_rank + 2 * d_state, d_inner),
        "ssm_dt.weight": _linear(rng, d_inner, dt_rank),
        "ssm_dt.bias": np.full(d_inner, -2.0),  # softplus(-2) ≈ 0.13: a state that remembers
        "ssm_a": -np.tile(np.arange(1, d_state + 1, dtype=np.float64), (d_inner, 1)),  # A = -exp(A_log)
        "ssm_d": np.ones(d_inner),
        "ssm_out.weight": out,
    }


_LFM2_HEADS, _LFM2_HEADS_KV = 4, 2


def _lfm2_layer(rng, i: int, d: int) -> dict[str, np.ndarray]:
    """One LFM2 block: a gated short convolution (even layers) or attention (odd ones),
    then a SwiGLU feed-forward; channel 0 stays untouched as in the llama models."""
    t = {"attn_norm.weight": np.ones(d), "ffn_norm.weight": np.ones(d),
         "ffn_gate.weight": _linear(rng, 2 * d, d), "ffn_up.weight": _linear(rng, 2 * d, d),
         "ffn_down.weight": _linear(rng, d, 2 * d)}
    if i % 2:
        head_dim = d // _LFM2_HEADS
        t.update({"attn_q.weight": _linear(rng, d, d, gain=2.0),
                  "attn_k.weight": _linear(rng, head_dim * _LFM2_HEADS_KV, d),
                  "attn_v.weight": _linear(rng, head_dim * _LFM2_HEADS_KV, d),
                  "attn_output.weight": _linear(rng, d, d),
                  "attn_q_norm.weight": np.ones(head_dim), "attn_k_norm.weight": np.ones(head_dim)})
        written = "attn_output.weight"
    else:
        t.update({"shortconv.conv.weight": rng.standard_normal((d, _LFM2_L_CACHE)) / np.sqrt(_LFM2_L_CACHE),
                  "shortconv.in_proj.weight": _linear(rng, 3 * d, d),
                  "shortconv.out_proj.weight": _linear(rng, d, d)})
        written = "shortconv.out_proj.weight"
    t[written][0, :] = 0.0
    t["ffn_down.weight"][0, :] = 0.0
    return t


def _model(seed, shapes, logit_scale=DEFAULT_LOGIT_SCALE, base=None, noise=0.0,
           eog_after=(), eog_id=None) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Hyperparameters and tensors: fresh random ones, or base's plus noise."""
    if base is None:
        hparams = dict(_DEFAULTS)
        hparams.update({k: v for k, v in shapes.items() if v is not None})
        eog = VOCAB.im_end_id if eog_id is None else eog_id
        rng = np.random.default_rng(seed)
        return hparams, _random_tensors(rng, hparams, logit_scale, eog_after, eog)
    hparams, tensors = _read_base(Path(base))
    for k, v in shapes.items():
        if v is not None and v != hparams[k]:
            raise ValueError(f"{k}={v} differs from base {base} ({k}={hparams[k]})")
    rng = np.random.default_rng(seed)
    return hparams, {name: _perturb(t, noise, rng) for name, t in tensors.items()}


def _linear(rng, n_out: int, n_in: int, gain: float = 1.0) -> np.ndarray:
    """A random (n_out, n_in) weight that keeps activations at unit scale."""
    w = rng.standard_normal((n_out, n_in)) * (gain / np.sqrt(n_in))
    w[:, 0] = 0.0  # channel 0 is the EOG trigger: never read ...
    return w


def _embeddings(rng, d: int, eog_after) -> np.ndarray:
    emb = rng.standard_normal((VOCAB.n_vocab, d))
    emb[:, 0] = 0.0
    emb[list(eog_after), 0] = _EOG_TRIGGER_VALUE
    return emb


def _output_layer(rng, emb: np.ndarray, logit_scale, eog_id) -> np.ndarray:
    """The output weights (n_vocab, d) for a final hidden state of RMS 1 that still
    carries the token's embedding (the residual stream)."""
    n_vocab, d = emb.shape
    # the final hidden state has RMS 1, so logits ~ N(0, logit_scale^2) over the vocabulary
    out = _linear(rng, n_vocab, d) * logit_scale
    out[list(VOCAB.byte_ids), :] *= _BYTE_LOGIT_FACTOR  # mostly whole pieces, like real models
    # confident positions, as in real models: each token t pushes the logit of a successor
    # succ[t] up by about strength[t] * logit_scale, through t's embedding, which stays in
    # the residual stream (the normed final state has a component ≈ 5 along it)
    normal = np.flatnonzero(np.array(VOCAB.types) == gguf.TokenType.NORMAL)
    succ = rng.choice(normal, n_vocab)
    succ[normal] = rng.permutation(normal)  # long successor chains, not short loops
    strength = rng.uniform(0.0, _SUCCESSOR_BONUS, n_vocab) * logit_scale / 5.0
    strength[sorted(VOCAB.special_ids)] = 0.0
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-9)
    np.add.at(out, succ, strength[:, None] * unit)
    out[sorted(VOCAB.special_ids), :] = 0.0  # special tokens: logit exactly 0
    # after a trigger token, channel 0 of the normed state is ≈ value / rms(h) ≈ value / 1.4
    out[eog_id, 0] = _EOG_LOGIT * 1.4 / _EOG_TRIGGER_VALUE
    return out


def _random_tensors(rng, hp, logit_scale, eog_after, eog_id) -> dict[str, np.ndarray]:
    """Llama weights as numpy arrays in (out, in) order, float32."""
    d, d_ff = hp["n_embd"], hp["n_ff"]
    head_dim = d // hp["n_head"]
    d_kv = head_dim * hp["n_head_kv"]

    def linear(n_out, n_in, gain=1.0):
        return _linear(rng, n_out, n_in, gain)

    t = {}
    emb = t["token_embd.weight"] = _embeddings(rng, d, eog_after)
    for i in range(hp["n_layer"]):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = np.ones(d)
        t[p + "attn_q.weight"] = linear(d, d, gain=2.0)  # sharper attention than uniform
        t[p + "attn_k.weight"] = linear(d_kv, d)
        t[p + "attn_v.weight"] = linear(d_kv, d)
        t[p + "attn_output.weight"] = linear(d, d)
        t[p + "ffn_norm.weight"] = np.ones(d)
        t[p + "ffn_gate.weight"] = linear(d_ff, d)
        t[p + "ffn_up.weight"] = linear(d_ff, d)
        t[p + "ffn_down.weight"] = linear(d, d_ff)
        t[p + "attn_output.weight"][0, :] = 0.0  # ... and never written by a layer
        t[p + "ffn_down.weight"][0, :] = 0.0
    t["output_norm.weight"] = np.ones(d)
    t["output.weight"] = _output_layer(rng, emb, logit_scale, eog_id)
    return {k: v.astype(np.float32) for k, v in t.items()}


def _perturb(t: np.ndarray, noise: float, rng) -> np.ndarray:
    """t * (1 + noise * N(0, 1)): relative noise; zeros and the EOG channel keep their role."""
    if noise == 0.0:
        return t
    return (t * (1.0 + noise * rng.standard_normal(t.shape))).astype(np.float32)


def _read_base(path: Path) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    if reader.get_field("general.architecture").contents() != "llama":
        raise ValueError(f"{path} is not a llama model")
    hparams = {}
    for k, key in _HPARAM_KEYS.items():
        f = reader.get_field(key)
        if f is None:
            raise ValueError(f"{path} has no {key}")
        hparams[k] = int(f.contents())
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != VOCAB.n_vocab:
        raise ValueError(f"{path} does not have the tiny-model vocabulary")
    # the reader gives each F32 tensor in numpy (out, in) order, as it was written
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    return hparams, tensors


def _write(path, tokens, hp, tensors, chat_template, *, name) -> None:
    def hparams(w: gguf.GGUFWriter) -> None:
        w.add_context_length(hp["n_ctx"])
        w.add_embedding_length(hp["n_embd"])
        w.add_block_count(hp["n_layer"])
        w.add_feed_forward_length(hp["n_ff"])
        w.add_head_count(hp["n_head"])
        w.add_head_count_kv(hp["n_head_kv"])
        w.add_rope_dimension_count(hp["n_embd"] // hp["n_head"])
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(_RMS_EPS)

    _write_gguf(path, "llama", tokens, hparams, tensors, chat_template, name=name)


def _write_gguf(path, arch: str, tokens, hparams, tensors, chat_template, *, name) -> None:
    """A GGUF of architecture `arch`: hparams(writer) adds its hyperparameters; then the
    tiny vocabulary (with `tokens` as its texts) and the tensors."""
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    hparams(w)
    w.add_vocab_size(len(tokens))

    w.add_tokenizer_model("llama")
    extra = len(tokens) - VOCAB.n_vocab
    w.add_token_list(list(tokens))
    w.add_token_scores(list(VOCAB.scores) + [-1e4] * extra)
    w.add_token_types(list(VOCAB.types) + [int(gguf.TokenType.NORMAL)] * extra)
    w.add_unk_token_id(VOCAB.unk_id)
    w.add_bos_token_id(VOCAB.bos_id)
    w.add_eos_token_id(VOCAB.eos_id)
    w.add_eot_token_id(VOCAB.im_end_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    for tname, arr in tensors.items():
        w.add_tensor(tname, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_eagle(path: str | os.PathLike[str], target: str | os.PathLike[str], *, seed: int = 0,
                     draft_vocab: int | None = None, own_embd: bool = True, own_output: bool = True,
                     norm_before_fc: bool = False, norm_before_residual: bool = False,
                     target_layers: tuple[int, int, int] = (0, 1, 1), dtype: str = "f32") -> Path:
    """Write a random EAGLE-3 draft (llama.cpp's eagle3 format) for tiny `target`: hidden
    64, 4 heads over 2 kv heads, ff 96; `draft_vocab` output rows mapped by d2t (random
    target ids) or the whole vocabulary; its own token embedding / output or the target's."""
    from ggspec.heads.eagle import EagleConfig, EagleWeights, save_eagle
    from ggspec.heads.target import read_target

    info = read_target(target)
    th, h, ff = info.fingerprint.embedding_length, 64, 96
    cfg = EagleConfig(hidden=h, n_head=4, n_head_kv=2, n_ff=ff, target_layers=target_layers,
                      target_hidden=th, rms_eps=1e-5, norm_before_fc=norm_before_fc,
                      norm_before_residual=norm_before_residual)
    rng = np.random.default_rng(seed)

    def lin(n_out, n_in, gain=1.0):
        return (rng.standard_normal((n_out, n_in)) * gain / np.sqrt(n_in)).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    v = draft_vocab or info.n_vocab
    d2t = np.sort(rng.choice(info.n_vocab, v, replace=False)) if draft_vocab else None
    w = EagleWeights(fc=lin(h, 3 * th), attn_norm=norm(h), attn_norm_2=norm(h),
                     wq=lin(h, 2 * h, 2.0), wk=lin(32, 2 * h), wv=lin(32, 2 * h), wo=lin(h, h),
                     ffn_norm=norm(h), ffn_gate=lin(ff, h), ffn_up=lin(ff, h), ffn_down=lin(h, ff),
                     output_norm=norm(h), enc_norm=norm(3 * th) if norm_before_fc else None,
                     output=lin(v, h, 4.0) if own_output else None, d2t=d2t,
                     token_embd=rng.standard_normal((info.n_vocab, h)).astype(np.float32)
                     if own_embd else None)
    return save_eagle(path, cfg, w, target, dtype=dtype)


def write_tiny_eagle1(path: str | os.PathLike[str], target: str | os.PathLike[str], *, seed: int = 0,
                      biases: bool = True, own_embd: bool = False, dtype: str = "f32") -> Path:
    """Write a random EAGLE-1/2 draft (ggspec's eagle1 format) for tiny `target`: its
    width, 4 heads over 2 kv heads, ff 96; fc and q/k/v biases when `biases`; its own
    token embedding or the target's."""
    from ggspec.heads.eagle1 import Eagle1Config, Eagle1Weights, save_eagle1
    from ggspec.heads.target import read_target

    info = read_target(target)
    h, ff = info.fingerprint.embedding_length, 96
    cfg = Eagle1Config(hidden=h, n_head=4, n_head_kv=2, n_ff=ff, rms_eps=1e-5)
    rng = np.random.default_rng(seed)
    kv = 2 * h // 4

    def lin(n_out, n_in, gain=1.0):
        return (rng.standard_normal((n_out, n_in)) * gain / np.sqrt(n_in)).astype(np.float32)

    def vec(n):
        return (0.1 * rng.standard_normal(n)).astype(np.float32) if biases else None

    w = Eagle1Weights(fc=lin(h, 2 * h), wq=lin(h, h, 2.0), wk=lin(kv, h), wv=lin(kv, h), wo=lin(h, h),
                      ffn_norm=(1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
                      ffn_gate=lin(ff, h), ffn_up=lin(ff, h), ffn_down=lin(h, ff),
                      fc_bias=vec(h), bq=vec(h), bk=vec(kv), bv=vec(kv),
                      token_embd=rng.standard_normal((info.n_vocab, h)).astype(np.float32) if own_embd else None)
    return save_eagle1(path, cfg, w, target, dtype=dtype)
