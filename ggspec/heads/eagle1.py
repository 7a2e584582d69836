"""EAGLE-1/2 draft heads (SafeAILab EAGLE's cnets1.py) in ggspec's `eagle1` GGUF layout,
and their numpy forward. llama.cpp has no architecture for them: numpy evaluates them.

The draft reads the target's last hidden state f_P (HF's base-model outputs[0]: after the
target's final norm, the input of its output layer; llama.cpp's embeddings). At position
P it takes the pair (token P+1, f_P), with RoPE at P:

    x      = fc [embd(token) ; f] + fc_bias                                       # (h,)
    a      = attn_output(attention(RoPE(q x + bq), RoPE(k x + bk), v x + bv))  over its
             own KV cache (the layer's input_layernorm is removed: no norm before it)
    y      = x + a
    pre    = y + ffn_down(SiLU(ffn_gate n) * ffn_up n),  n = rms(y) * ffn_norm
    logits = target_output(pre)              the target's output.weight applied to pre
                                             directly (no norm: EAGLE's head(out_hidden))

and later steps (deeper in a draft tree) feed back their own `pre` as f. The biases are
there when the checkpoint has them (EAGLE-1 config "bias": fc; "qkv_bias": q/k/v, as
Qwen2 drafts). Attention as in heads.eagle: RoPE in adjacent pairs (the converter
permutes HF's q/k rows), grouped heads, scale 1/sqrt(head_dim). The token embedding is
the file's token_embd, else the target's.

File format (shapes numpy (rows, cols); h is the target's embedding length):

    general.architecture = "eagle1", eagle1.block_count = 1,
    eagle1.{embedding_length, feed_forward_length, context_length, vocab_size}
    eagle1.attention.{head_count, head_count_kv, layer_norm_rms_epsilon}, eagle1.rope.freq_base,
    eagle1.rope.dimension_count
    eagle1.target.{architecture, embedding_length, vocab_hash}: the target fingerprint
    (heads.target.vocab_hash of its tokenizer.ggml.tokens)

    fc.weight (h, 2h); fc.bias (h,) optional
    blk.0.attn_q.weight (heads*hd, h); attn_k / attn_v (kv_heads*hd, h)
    blk.0.attn_q / attn_k / attn_v .bias optional (all three or none)
    blk.0.attn_output.weight (h, heads*hd)
    blk.0.ffn_norm.weight (h,); blk.0.ffn_gate / ffn_up .weight (ff, h); ffn_down (h, ff)
    token_embd.weight (n_vocab, h) optional
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .eagle import (EagleCache, EagleHeads, add_tensors, attend, check_heads, feed_forward, layer_writer,
                    load_eagle, read_config)
from .files import ANY_MATRIX_TYPES, ANY_VECTOR_TYPES, HeadFile, weight_type, write
from .target import TargetFingerprint, TargetInfo, read_target

ARCH = "eagle1"
KEY_TARGET_ARCH = f"{ARCH}.target.architecture"
KEY_TARGET_EMBD = f"{ARCH}.target.embedding_length"
KEY_TARGET_VOCAB_HASH = f"{ARCH}.target.vocab_hash"


@dataclass(frozen=True)
class Eagle1Config:
    """The draft layer's shape (its width is the target's)."""

    hidden: int
    n_head: int
    n_head_kv: int
    n_ff: int
    rms_eps: float = 1e-6
    rope_base: float = 10000.0
    context_length: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_head

    def __post_init__(self) -> None:
        check_heads(self)


@dataclass
class Eagle1Weights:
    """float32 arrays, numpy order; None: absent (no bias, the target's embedding)."""

    fc: np.ndarray            # (h, 2h)
    wq: np.ndarray            # (heads*hd, h)
    wk: np.ndarray            # (kv_heads*hd, h)
    wv: np.ndarray
    wo: np.ndarray            # (h, heads*hd)
    ffn_norm: np.ndarray      # (h,)
    ffn_gate: np.ndarray      # (ff, h)
    ffn_up: np.ndarray
    ffn_down: np.ndarray      # (h, ff)
    fc_bias: np.ndarray | None = None     # (h,)
    bq: np.ndarray | None = None          # (heads*hd,)
    bk: np.ndarray | None = None          # (kv_heads*hd,)
    bv: np.ndarray | None = None
    token_embd: np.ndarray | None = None  # (n_vocab, h)


# GGUF tensor name -> Eagle1Weights field
TENSORS = {"fc.weight": "fc", "fc.bias": "fc_bias", "blk.0.attn_q.weight": "wq",
           "blk.0.attn_q.bias": "bq", "blk.0.attn_k.weight": "wk", "blk.0.attn_k.bias": "bk",
           "blk.0.attn_v.weight": "wv", "blk.0.attn_v.bias": "bv",
           "blk.0.attn_output.weight": "wo", "blk.0.ffn_norm.weight": "ffn_norm",
           "blk.0.ffn_gate.weight": "ffn_gate", "blk.0.ffn_up.weight": "ffn_up",
           "blk.0.ffn_down.weight": "ffn_down", "token_embd.weight": "token_embd"}
QKV_BIASES = ("blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias")
OPTIONAL = ("fc.bias", *QKV_BIASES, "token_embd.weight")


def _shapes(cfg: Eagle1Config, n_vocab: int) -> dict[str, tuple[int, ...]]:
    h, f, q, kv = cfg.hidden, cfg.n_ff, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    return {"fc": (h, 2 * h), "fc_bias": (h,), "wq": (q, h), "bq": (q,), "wk": (kv, h), "bk": (kv,),
            "wv": (kv, h), "bv": (kv,), "wo": (h, q), "ffn_norm": (h,), "ffn_gate": (f, h),
            "ffn_up": (f, h), "ffn_down": (h, f), "token_embd": (n_vocab, h)}


@dataclass
class Eagle1Heads(EagleHeads):
    """An EAGLE-1/2 draft, ready to evaluate (float32; the target's tensors filled in):
    EagleHeads' interface and cache, cfg an Eagle1Config, w Eagle1Weights, out the
    target's output rows (n_vocab, h), d2t None. Its features are the target's last
    hidden states (Context.hidden_rows), not tapped layer inputs."""

    features = "hidden"

    def fuse(self, features: np.ndarray) -> np.ndarray:
        """The target's hidden states are the draft's f as they are: (n, h) float32."""
        return np.asarray(features, dtype=np.float32)

    def step(self, cache: EagleCache, tokens: np.ndarray, g: np.ndarray, positions: np.ndarray,
             visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append n rows (token, f = g, position) to `cache` and evaluate them: each row
        sees the cache rows where visible (n, cache.n + n) is True (itself included).
        Returns (logits over the target vocabulary (n, n_vocab), outputs pre (n, h))."""
        c, w = self.cfg, self.w
        g = np.asarray(g, dtype=np.float32).reshape(len(tokens), c.hidden)
        x = np.concatenate([self.embd[np.asarray(tokens)], g], axis=1) @ w.fc.T  # (n, h)
        if w.fc_bias is not None:
            x = x + w.fc_bias
        pre = feed_forward(c, w, x + attend(c, w, cache, x, positions, visible, w.bq, w.bk, w.bv))
        return pre @ self.out.T, pre


def save_eagle1(path: str | os.PathLike, cfg: Eagle1Config, w: Eagle1Weights,
                target: str | os.PathLike | TargetInfo, *, dtype: str = "f16",
                name: str | None = None) -> Path:
    """Write an eagle1 GGUF for `target` (its fingerprint goes into the file): matrices in
    `dtype` (f32, f16, q8_0), vectors in F32."""
    info = target if isinstance(target, TargetInfo) else read_target(target)
    if cfg.hidden != info.fingerprint.embedding_length:
        raise ValueError(f"an EAGLE-1/2 draft is as wide as its target ({info.fingerprint.embedding_length}), "
                         f"got {cfg.hidden}")
    biases = [getattr(w, a) is None for a in ("bq", "bk", "bv")]
    if any(biases) and not all(biases):
        raise ValueError("q/k/v biases come all three or none")
    shapes = _shapes(cfg, info.n_vocab)
    qtype = weight_type(dtype, *(shapes[k][1] for k in ("fc", "wq", "wo", "ffn_gate", "ffn_down")))
    for attr, shape in shapes.items():
        a = getattr(w, attr)
        if a is not None and a.shape != shape:
            raise ValueError(f"{attr} has shape {a.shape}, expected {shape}")
    path = Path(path)
    wr = layer_writer(path, ARCH, cfg, info.n_vocab, name)
    fp = info.fingerprint
    wr.add_string(KEY_TARGET_ARCH, fp.architecture)
    wr.add_uint32(KEY_TARGET_EMBD, fp.embedding_length)
    wr.add_string(KEY_TARGET_VOCAB_HASH, fp.vocab_hash)
    add_tensors(wr, TENSORS, w, qtype)
    write(wr)
    return path


def is_eagle1(path: str | os.PathLike) -> bool:
    """Whether GGUF `path` says general.architecture = eagle1 (other files: False)."""
    return HeadFile(Path(path), what="EAGLE file").field("general.architecture", required=False) == ARCH


def load_eagle1(path: str | os.PathLike, target: str | os.PathLike | TargetInfo) -> Eagle1Heads:
    """Read and validate an eagle1 GGUF for `target` (a GGUF path, a loaded Model or
    read_target()). Raises ModelFileError naming the file and the problem."""
    info = target if isinstance(target, TargetInfo) else read_target(target)
    f = HeadFile(Path(path), what="EAGLE file")
    f.architecture(ARCH)
    cfg = read_config(f, ARCH, Eagle1Config)
    f.check_target(TargetFingerprint(str(f.field(KEY_TARGET_ARCH)), f.number(KEY_TARGET_EMBD),
                                     str(f.field(KEY_TARGET_VOCAB_HASH))), info)
    if cfg.hidden != info.fingerprint.embedding_length:
        raise f.bad(f"hidden size {cfg.hidden} differs from the target's {info.fingerprint.embedding_length}")
    shapes = _shapes(cfg, info.n_vocab)
    f.check_tensors({t: (shapes[a], ANY_MATRIX_TYPES if len(shapes[a]) == 2 else ANY_VECTOR_TYPES)
                     for t, a in TENSORS.items()}, optional=OPTIONAL)
    if 0 < sum(t in f.tensors for t in QKV_BIASES) < 3:
        raise f.bad("has some of the q/k/v biases: all three or none")
    w = Eagle1Weights(**{a: f.load(t) if t in f.tensors else None for t, a in TENSORS.items()})
    embd = w.token_embd if w.token_embd is not None else info.rows(info.token_embd)
    return Eagle1Heads(cfg, w, embd, info.output_rows())


def open_eagle(path: str | os.PathLike, target: str | os.PathLike | TargetInfo) -> EagleHeads:
    """The EAGLE draft in GGUF `path`, by its architecture: eagle1 (EAGLE-1/2) or eagle3."""
    return (load_eagle1 if is_eagle1(path) else load_eagle)(path, target)
