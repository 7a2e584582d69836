"""EAGLE-3 draft heads in llama.cpp's `eagle3` GGUF format, and their numpy forward.

The draft reads three of the target's hidden states per position: the inputs of target
layers `target_layers` (HF's hidden_states[i]; 0 is the token embedding), concatenated
(3 * target_hidden). At position P it takes the pair (token P+1, g_P), with RoPE at P:

    g_P   = fc(features_P)                    (RMS-normed first when norm_before_fc)
    x     = [rms(embd(token)) * attn_norm ; rms(g) * attn_norm_2]              # (2h,)
    a     = attn_output(attention(RoPE(q x), RoPE(k x), v x))  over its own KV cache
    f     = a + (rms(g) * attn_norm_2 if norm_before_residual else g)
    pre   = f + ffn_down(SiLU(ffn_gate n) * ffn_up n),  n = rms(f) * ffn_norm
    logits = output(rms(pre) * output_norm)   over the draft vocabulary; row j is target
                                              token d2t[j] (no d2t: the identity)

and later steps (deeper in a draft tree) feed back their own `pre` as g. Attention is
llama.cpp's: one layer, grouped heads, RoPE in adjacent pairs (LLAMA_ROPE_TYPE_NORM; its
converter permutes HF's q/k rows to match), scale 1/sqrt(head_dim). Without `output` or
`token_embd` of its own, the draft uses the target's (output.weight / token_embd.weight).

File format (what llama.cpp's src/models/eagle3.cpp loads; shapes numpy (rows, cols)):

    general.architecture = "eagle3", eagle3.block_count = 1,
    eagle3.{embedding_length, feed_forward_length, context_length, vocab_size}
    eagle3.attention.{head_count, head_count_kv, layer_norm_rms_epsilon}, eagle3.rope.freq_base
    eagle3.target_layers (3 ids), eagle3.target_hidden_size,
    eagle3.norm_before_residual, eagle3.norm_before_fc (bools, default false)
    tokenizer.*: the target's vocabulary (its hash is the target fingerprint)

    fc.weight (h, 3 th); enc.output_norm.weight (3 th,) when norm_before_fc
    blk.0.attn_norm / attn_norm_2 / ffn_norm .weight (h,)
    blk.0.attn_q.weight (heads*hd, 2h); attn_k / attn_v (kv_heads*hd, 2h)
    blk.0.attn_output.weight (h, heads*hd)
    blk.0.ffn_gate / ffn_up .weight (ff, h); blk.0.ffn_down.weight (h, ff)
    output_norm.weight (h,); output.weight (V, h) optional; d2t (V,) I64 target ids
    (only with output); token_embd.weight (n_vocab, h) optional
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ..gguffile import KEY_TOKENS, Array
from . import nn
from .files import ANY_MATRIX_TYPES, ANY_VECTOR_TYPES, HeadFile, add_matrix, weight_type, write
from .medusa import check_token_ids
from .target import TargetInfo, read_target, vocab_hash

ARCH = "eagle3"
Q = gguf.GGMLQuantizationType


def check_heads(cfg) -> None:
    """The attention shape of a draft config (EagleConfig, Eagle1Config) is usable."""
    if cfg.hidden % cfg.n_head or cfg.n_head % cfg.n_head_kv or cfg.head_dim % 2:
        raise ValueError(f"hidden {cfg.hidden} must split into {cfg.n_head} heads of an even "
                         f"size, in groups over {cfg.n_head_kv} kv heads")


@dataclass(frozen=True)
class EagleConfig:
    """The draft's shape. target_layers: the target layers whose inputs it reads."""

    hidden: int
    n_head: int
    n_head_kv: int
    n_ff: int
    target_layers: tuple[int, int, int]
    target_hidden: int
    rms_eps: float = 1e-6
    rope_base: float = 10000.0
    context_length: int = 4096
    norm_before_residual: bool = False
    norm_before_fc: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_head

    def __post_init__(self) -> None:
        check_heads(self)
        if len(self.target_layers) != 3:
            raise ValueError(f"EAGLE-3 reads exactly 3 target layers, got {self.target_layers}")


@dataclass
class EagleWeights:
    """float32 arrays, numpy order. output / d2t / token_embd None: use the target's."""

    fc: np.ndarray            # (h, 3 th)
    attn_norm: np.ndarray     # (h,)
    attn_norm_2: np.ndarray   # (h,)
    wq: np.ndarray            # (heads*hd, 2h)
    wk: np.ndarray            # (kv_heads*hd, 2h)
    wv: np.ndarray
    wo: np.ndarray            # (h, heads*hd)
    ffn_norm: np.ndarray
    ffn_gate: np.ndarray      # (ff, h)
    ffn_up: np.ndarray
    ffn_down: np.ndarray      # (h, ff)
    output_norm: np.ndarray
    enc_norm: np.ndarray | None = None    # (3 th,) with norm_before_fc
    output: np.ndarray | None = None      # (V, h)
    d2t: np.ndarray | None = None         # (V,) target ids of output rows
    token_embd: np.ndarray | None = None  # (n_vocab, h)


# GGUF tensor name -> EagleWeights field
TENSORS = {"fc.weight": "fc", "blk.0.attn_norm.weight": "attn_norm",
           "blk.0.attn_norm_2.weight": "attn_norm_2", "blk.0.attn_q.weight": "wq",
           "blk.0.attn_k.weight": "wk", "blk.0.attn_v.weight": "wv",
           "blk.0.attn_output.weight": "wo", "blk.0.ffn_norm.weight": "ffn_norm",
           "blk.0.ffn_gate.weight": "ffn_gate", "blk.0.ffn_up.weight": "ffn_up",
           "blk.0.ffn_down.weight": "ffn_down", "output_norm.weight": "output_norm",
           "enc.output_norm.weight": "enc_norm", "output.weight": "output", "d2t": "d2t",
           "token_embd.weight": "token_embd"}
OPTIONAL = ("enc.output_norm.weight", "output.weight", "d2t", "token_embd.weight")


def _shapes(cfg: EagleConfig, n_vocab: int, draft_vocab: int) -> dict[str, tuple[int, ...]]:
    h, hd, f = cfg.hidden, cfg.head_dim, cfg.n_ff
    return {"fc": (h, 3 * cfg.target_hidden), "attn_norm": (h,), "attn_norm_2": (h,),
            "wq": (cfg.n_head * hd, 2 * h), "wk": (cfg.n_head_kv * hd, 2 * h),
            "wv": (cfg.n_head_kv * hd, 2 * h), "wo": (h, cfg.n_head * hd), "ffn_norm": (h,),
            "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f), "output_norm": (h,),
            "enc_norm": (3 * cfg.target_hidden,), "output": (draft_vocab, h),
            "d2t": (draft_vocab,), "token_embd": (n_vocab, h)}


@dataclass
class EagleCache:
    """The draft's own KV cache: k, v (capacity, kv_heads, hd); rows [0, n) are live."""

    k: np.ndarray
    v: np.ndarray
    positions: np.ndarray
    n: int = 0

    @classmethod
    def empty(cls, cfg, capacity: int) -> EagleCache:
        shape = (capacity, cfg.n_head_kv, cfg.head_dim)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.zeros(capacity, np.int64))

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)


def attend(cfg, w, cache: EagleCache, x: np.ndarray, positions: np.ndarray, visible: np.ndarray,
           bq=None, bk=None, bv=None) -> np.ndarray:
    """The draft layer's attention: append rows x (n, in) at `positions` to `cache` as
    keys and values (RoPE on q and k; optional biases) and return attn_output of the
    attention of each row over the cache rows it sees (visible (n, cache.n + n))."""
    n = len(x)
    pos = np.asarray(positions, dtype=np.int64)

    def proj(wt, b, heads):
        y = x @ wt.T
        return (y if b is None else y + b).reshape(n, heads, cfg.head_dim)

    q = nn.rope(proj(w.wq, bq, cfg.n_head), pos, cfg.rope_base)
    k = nn.rope(proj(w.wk, bk, cfg.n_head_kv), pos, cfg.rope_base)
    v = proj(w.wv, bv, cfg.n_head_kv)
    s, end = cache.n, cache.n + n
    if end > len(cache.k):
        raise ValueError(f"the draft's cache holds {len(cache.k)} rows, {end} needed")
    cache.k[s:end], cache.v[s:end], cache.positions[s:end] = k, v, pos
    cache.n = end
    return nn.attention(q, cache.k[:end], cache.v[:end], np.asarray(visible, bool)) @ w.wo.T


def feed_forward(cfg, w, f: np.ndarray) -> np.ndarray:
    """f + ffn_down(SiLU(ffn_gate n) * ffn_up n), n = rms(f) * ffn_norm."""
    return f + nn.swiglu(nn.rms_norm(f, w.ffn_norm, cfg.rms_eps), w.ffn_gate, w.ffn_up, w.ffn_down)


@dataclass
class EagleHeads:
    """An EAGLE-3 draft, ready to evaluate (float32; target's tensors filled in)."""

    cfg: EagleConfig
    w: EagleWeights
    embd: np.ndarray = field(repr=False)     # (n_vocab, h) token embeddings in use
    out: np.ndarray = field(repr=False)      # (V, h) output rows in use
    d2t: np.ndarray | None = None            # (V,) target ids of the output rows
    features = "taps"                        # it reads the target's tapped layer inputs

    @property
    def vocab_size(self) -> int:
        return self.out.shape[0]

    def new_cache(self, capacity: int) -> EagleCache:
        return EagleCache.empty(self.cfg, capacity)

    def fuse(self, features: np.ndarray) -> np.ndarray:
        """g = fc(features): (n, 3 th) -> (n, h)."""
        x = np.asarray(features, dtype=np.float32)
        if self.cfg.norm_before_fc:
            x = nn.rms_norm(x, self.w.enc_norm, self.cfg.rms_eps)
        return x @ self.w.fc.T

    def step(self, cache: EagleCache, tokens: np.ndarray, g: np.ndarray, positions: np.ndarray,
             visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append n rows (token, g, position) to `cache` and evaluate them: each row sees
        the cache rows where visible (n, cache.n + n) is True (itself included).
        Returns (logits over the draft vocabulary (n, V), pre-norm outputs (n, h))."""
        c, w = self.cfg, self.w
        n = len(tokens)
        e = nn.rms_norm(self.embd[np.asarray(tokens)], w.attn_norm, c.rms_eps)
        g = np.asarray(g, dtype=np.float32).reshape(n, c.hidden)
        g_norm = nn.rms_norm(g, w.attn_norm_2, c.rms_eps)
        x = np.concatenate([e, g_norm], axis=1)                          # (n, 2h)
        a = attend(c, w, cache, x, positions, visible)
        pre = feed_forward(c, w, a + (g_norm if c.norm_before_residual else g))
        logits = nn.rms_norm(pre, w.output_norm, c.rms_eps) @ self.out.T
        return logits, pre

    def target_ids(self, rows: np.ndarray) -> np.ndarray:
        """Draft-vocabulary rows -> target token ids."""
        return rows if self.d2t is None else self.d2t[rows]


# ---------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------


def save_eagle(path: str | os.PathLike, cfg: EagleConfig, w: EagleWeights,
               target: str | os.PathLike, *, dtype: str = "f16", name: str | None = None) -> Path:
    """Write an eagle3 GGUF for `target` (whose tokenizer it carries, as llama.cpp needs):
    matrices in `dtype` (f32, f16, q8_0), norms in F32, d2t as I64."""
    info = read_target(target)
    shapes = _shapes(cfg, info.n_vocab, 0 if w.output is None else w.output.shape[0])
    qtype = weight_type(dtype, *(shapes[k][1] for k in ("fc", "wq", "wo", "ffn_gate", "ffn_down")))
    if (w.d2t is not None) and w.output is None:
        raise ValueError("d2t maps the rows of the draft's own output; there is none")
    path = Path(path)
    wr = layer_writer(path, ARCH, cfg, info.n_vocab, name)
    wr.add_array(f"{ARCH}.target_layers", [int(i) for i in cfg.target_layers])
    wr.add_uint32(f"{ARCH}.target_hidden_size", cfg.target_hidden)
    wr.add_bool(f"{ARCH}.norm_before_residual", cfg.norm_before_residual)
    wr.add_bool(f"{ARCH}.norm_before_fc", cfg.norm_before_fc)
    _copy_tokenizer(wr, info)
    add_tensors(wr, TENSORS, w, qtype)
    write(wr)
    return path


def layer_writer(path: Path, arch: str, cfg, n_vocab: int, name: str | None) -> gguf.GGUFWriter:
    """A GGUFWriter for `arch` with the draft layer's keys (EagleConfig, Eagle1Config)."""
    wr = gguf.GGUFWriter(path, arch)
    wr.add_name(name or arch)
    wr.add_block_count(1)
    wr.add_embedding_length(cfg.hidden)
    wr.add_feed_forward_length(cfg.n_ff)
    wr.add_context_length(cfg.context_length)
    wr.add_head_count(cfg.n_head)
    wr.add_head_count_kv(cfg.n_head_kv)
    wr.add_layer_norm_rms_eps(cfg.rms_eps)
    wr.add_rope_freq_base(cfg.rope_base)
    wr.add_rope_dimension_count(cfg.head_dim)
    wr.add_vocab_size(n_vocab)
    return wr


def add_tensors(wr: gguf.GGUFWriter, names: dict[str, str], w, qtype: Q) -> None:
    """The fields of weights `w` under their GGUF names (None: left out): vectors F32,
    d2t I64, matrices in `qtype`."""
    for tname, attr in names.items():
        a = getattr(w, attr)
        if a is None:
            continue
        if attr == "d2t":
            wr.add_tensor(tname, np.asarray(a, dtype=np.int64), raw_dtype=Q.I64)
        elif a.ndim == 1:
            wr.add_tensor(tname, np.ascontiguousarray(a, dtype=np.float32))
        else:
            add_matrix(wr, tname, a, qtype)


def _copy_tokenizer(wr: gguf.GGUFWriter, info: TargetInfo) -> None:
    """The target's tokenizer.* keys, as they are (llama.cpp loads a vocabulary with every
    model, and maps d2t into it)."""
    reader = gguf.GGUFReader(info.path)
    for f in reader.fields.values():
        if not f.name.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            wr.add_key_value(f.name, f.contents(), vtype, sub_type=f.types[-1])
        else:
            wr.add_key_value(f.name, f.contents(), vtype)


def read_config(f: HeadFile, arch: str, config: type, **extra):
    """The draft layer's keys of `arch` (and `extra` fields) as a `config` (EagleConfig,
    Eagle1Config); sizes below 1 or that do not split into heads are one-line errors."""
    if f.number(f"{arch}.block_count") != 1:
        raise f.bad(f"{arch}.block_count must be 1 (one decoder layer)")
    values = dict(hidden=f.number(f"{arch}.embedding_length"), n_head=f.number(f"{arch}.attention.head_count"),
                  n_ff=f.number(f"{arch}.feed_forward_length"),
                  rms_eps=f.real(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
                  rope_base=f.real(f"{arch}.rope.freq_base", 10000.0),
                  context_length=f.number(f"{arch}.context_length", 4096), **extra)
    values["n_head_kv"] = f.number(f"{arch}.attention.head_count_kv", values["n_head"])
    sizes = [values[k] for k in ("hidden", "n_head", "n_head_kv", "n_ff", "target_hidden") if k in values]
    if min(sizes) < 1:
        raise f.bad(f"invalid sizes: {sizes}")
    try:
        return config(**values)
    except ValueError as e:
        raise f.bad(str(e)) from None


def load_eagle(path: str | os.PathLike, target: str | os.PathLike | TargetInfo) -> EagleHeads:
    """Read and validate an eagle3 GGUF for `target` (a GGUF path, a loaded Model or
    read_target()). Raises ModelFileError naming the file and the problem."""
    info = target if isinstance(target, TargetInfo) else read_target(target)
    f = HeadFile(Path(path), what="EAGLE file")
    f.architecture(ARCH)
    layers = f.field(f"{ARCH}.target_layers")
    if not (isinstance(layers, list) and len(layers) == 3 and all(isinstance(i, int) for i in layers)):
        raise f.bad(f"{ARCH}.target_layers must hold 3 layer ids, got {layers!r:.60}")
    cfg = read_config(f, ARCH, EagleConfig, target_layers=tuple(layers),
                      target_hidden=f.number(f"{ARCH}.target_hidden_size"),
                      norm_before_residual=bool(f.field(f"{ARCH}.norm_before_residual", required=False)),
                      norm_before_fc=bool(f.field(f"{ARCH}.norm_before_fc", required=False)))
    tokens = f.header.kv.get(KEY_TOKENS)
    if not isinstance(tokens, Array) or tokens.items is None:
        raise f.bad(f"no {KEY_TOKENS}: an eagle3 file carries its target's vocabulary")
    if vocab_hash(tokens.items) != info.fingerprint.vocab_hash:
        raise f.bad(f"was made for another target: its vocabulary differs from {info.path}'s")
    if cfg.target_hidden != info.fingerprint.embedding_length:
        raise f.bad(f"reads target hidden states of {cfg.target_hidden}, target {info.path} "
                    f"has {info.fingerprint.embedding_length}")
    if max(cfg.target_layers) >= info.n_layer or min(cfg.target_layers) < 0:
        # (llama.cpp also taps the output of the last layer; ggspec taps layer inputs only)
        raise f.bad(f"target layers {list(cfg.target_layers)} outside the target's layers "
                    f"0..{info.n_layer - 1}")
    out = f.tensors.get("output.weight")
    draft_vocab = out.shape[0] if out is not None and out.shape else info.n_vocab
    shapes = _shapes(cfg, info.n_vocab, draft_vocab)
    expected = {t: (shapes[a], ANY_MATRIX_TYPES if len(shapes[a]) == 2 else ANY_VECTOR_TYPES)
                for t, a in TENSORS.items()}
    expected["d2t"] = (shapes["d2t"], frozenset((Q.I64, Q.I32)))
    if not cfg.norm_before_fc:
        del expected["enc.output_norm.weight"]
    f.check_tensors(expected, optional=[t for t in OPTIONAL if t != "enc.output_norm.weight"
                                        or not cfg.norm_before_fc])
    if "d2t" in f.tensors and out is None:
        raise f.bad("d2t without output.weight: it maps the rows of the draft's own output")
    w = EagleWeights(**{a: f.load(t) if t in f.tensors else None for t, a in TENSORS.items()})
    d2t = None
    if w.d2t is not None:
        d2t = check_token_ids(f, "d2t", w.d2t, draft_vocab, info)
        if len(np.unique(d2t)) != len(d2t):
            raise f.bad("d2t maps two draft rows to one target token")
    elif draft_vocab != info.n_vocab:
        raise f.bad(f"output.weight has {draft_vocab} rows but there is no d2t to map them to "
                    f"the target's {info.n_vocab} tokens")
    embd = w.token_embd if w.token_embd is not None else info.rows(info.token_embd)
    out_rows = w.output if w.output is not None else info.output_rows()
    if embd.shape[1] != cfg.hidden or out_rows.shape[1] != cfg.hidden:
        raise f.bad(f"uses the target's token embedding or output, whose width "
                    f"{info.fingerprint.embedding_length} differs from its hidden size {cfg.hidden}")
    return EagleHeads(cfg, w, embd, out_rows, d2t)

