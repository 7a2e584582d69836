"""Medusa draft heads: their GGUF file format, validated loading, and evaluation in numpy.

Head h (0-based) reads the target's final hidden state x at position t (the input of the
target's output layer, whose own prediction is token t+1) and predicts token t+h+2:

    r_0 = x,   r_{l+1} = r_l + SiLU(W_{h,l} r_l + b_{h,l})   (l < residual_layer_count)
    logits_h = W_out,h r_L                                    # (vocab_size,)

Row j of the output is target token token_ids[j] (a reduced vocabulary; no token_ids means
row j is token j; ggspec's trainer orders the rows most frequent first, so that a prefix of
them is a smaller reduced vocabulary: MedusaHeads.restrict). With `tied`, W_out is the
same for every head: the rows token_ids of the target's own output.weight (token_embd.weight
when the target ties its embeddings), read from the target GGUF at load. With zero residual weights a tied head is exactly the target's
own next-token predictor restricted to token_ids.

File format (general.architecture = "medusa"):

    medusa.head_count                u32    number of heads
    medusa.residual_layer_count      u32    residual layers per head
    medusa.embedding_length          u32    hidden size (= the target's)
    medusa.vocab_size                u32    rows of each head's output
    medusa.token_ids                 i32[]  target id of each output row (absent: identity)
    medusa.tied                      bool   output = target output.weight rows, not stored
    medusa.target.architecture       str    the target's general.architecture
    medusa.target.embedding_length   u32    the target's {arch}.embedding_length
    medusa.target.vocab_hash         str    vocab_hash() of the target's tokenizer.ggml.tokens
    medusa.acceptance                f32[]  optional: (head_count, ranks) row-major, the
                                            measured chance that head h's rank-r token is
                                            accepted given its parent was (first trees)

    medusa.{h}.res.{l}.weight        (hidden, hidden)      F32 / F16 / Q8_0
    medusa.{h}.res.{l}.bias          (hidden,)             F32 / F16
    medusa.{h}.out.weight            (vocab_size, hidden)  F32 / F16 / Q8_0, unless tied

Shapes are numpy (rows, columns); GGUF stores them reversed. Everything is dequantized once
to float32 at load.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from ..errors import ModelFileError
from .files import MATRIX_TYPES, VECTOR_TYPES, HeadFile, add_matrix, weight_type, write
from . import nn
from .target import TargetFingerprint, TargetInfo, read_target

ARCH = "medusa"
KEY_HEAD_COUNT = "medusa.head_count"
KEY_LAYER_COUNT = "medusa.residual_layer_count"
KEY_EMBD = "medusa.embedding_length"
KEY_VOCAB = "medusa.vocab_size"
KEY_TOKEN_IDS = "medusa.token_ids"
KEY_TIED = "medusa.tied"
KEY_TARGET_ARCH = "medusa.target.architecture"
KEY_TARGET_EMBD = "medusa.target.embedding_length"
KEY_TARGET_VOCAB_HASH = "medusa.target.vocab_hash"
KEY_ACCEPTANCE = "medusa.acceptance"
TOP_K = 8  # candidates per head in a tree

def res_weight_name(h: int, l: int) -> str:
    return f"medusa.{h}.res.{l}.weight"


def res_bias_name(h: int, l: int) -> str:
    return f"medusa.{h}.res.{l}.bias"


def out_weight_name(h: int) -> str:
    return f"medusa.{h}.out.weight"


# ---------------------------------------------------------------------------------------
# The heads
# ---------------------------------------------------------------------------------------


class MedusaHeads:
    """Medusa heads in float32, ready to propose.

    res_weight (n_heads, n_layers, H, H), res_bias (n_heads, n_layers, H);
    out_weight (V, H) when tied (shared by all heads), else (n_heads, V, H);
    token_ids (V,) target ids of the output rows, or None for the identity.
    acceptance (n_heads, ranks): measured chance that head h's rank-r candidate is accepted
    given its parent was (None: unknown), what a drafter grows its first trees from.
    """

    def __init__(self, res_weight: np.ndarray, res_bias: np.ndarray, out_weight: np.ndarray, *,
                 token_ids: np.ndarray | None, tied: bool, target: TargetFingerprint,
                 acceptance: np.ndarray | None = None):
        res_weight = np.asarray(res_weight, dtype=np.float32)
        res_bias = np.asarray(res_bias, dtype=np.float32)
        out_weight = np.asarray(out_weight, dtype=np.float32)
        if res_weight.ndim != 4 or res_weight.shape[2] != res_weight.shape[3]:
            raise ValueError(f"res_weight must be (n_heads, n_layers, H, H), got {res_weight.shape}")
        n_heads, n_layers, hidden, _ = res_weight.shape
        if n_heads < 1 or n_layers < 1:
            raise ValueError(f"need at least one head and one residual layer, got {res_weight.shape}")
        if res_bias.shape != (n_heads, n_layers, hidden):
            raise ValueError(f"res_bias must be {(n_heads, n_layers, hidden)}, got {res_bias.shape}")
        want_ndim = 2 if tied else 3
        if out_weight.ndim != want_ndim or out_weight.shape[-1] != hidden or (
                not tied and out_weight.shape[0] != n_heads):
            want = "(V, H)" if tied else f"({n_heads}, V, {hidden})"
            raise ValueError(f"out_weight must be {want} with H={hidden}, got {out_weight.shape}")
        vocab = out_weight.shape[-2]
        if token_ids is not None:
            token_ids = np.asarray(token_ids, dtype=np.int32)
            if token_ids.shape != (vocab,):
                raise ValueError(f"token_ids must have one id per output row ({vocab}), "
                                 f"got shape {token_ids.shape}")
        if hidden != target.embedding_length:
            raise ValueError(f"hidden size {hidden} differs from the target's "
                             f"{target.embedding_length}")
        if acceptance is not None:
            acceptance = np.asarray(acceptance, dtype=np.float64)
            if acceptance.ndim != 2 or acceptance.shape[0] != n_heads or not (
                    (0 <= acceptance) & (acceptance <= 1)).all():
                raise ValueError(f"acceptance ({KEY_ACCEPTANCE}) must be ({n_heads}, ranks) "
                                 f"chances in [0, 1], got shape {acceptance.shape}")
        self.acceptance = acceptance
        self.n_heads, self.n_layers, self.hidden, self.vocab_size = n_heads, n_layers, hidden, vocab
        self.res_weight, self.res_bias = res_weight, res_bias
        self.token_ids, self.tied, self.target = token_ids, tied, target
        self._out_t = np.ascontiguousarray(np.swapaxes(out_weight, -1, -2))  # (H, V) / (nh, H, V)

    @property
    def out_weight(self) -> np.ndarray:
        return np.swapaxes(self._out_t, -1, -2)

    def restrict(self, n_heads: int | None = None, vocab_size: int | None = None) -> MedusaHeads:
        """The first `n_heads` heads over the first `vocab_size` output rows: a cheaper
        proposer (ggspec's trainer orders rows most frequent first)."""
        nh = self.n_heads if n_heads is None else n_heads
        v = self.vocab_size if vocab_size is None else vocab_size
        if not (1 <= nh <= self.n_heads and 1 <= v <= self.vocab_size):
            raise ValueError(f"can restrict to 1..{self.n_heads} heads and 1..{self.vocab_size} "
                             f"rows, got {n_heads} and {vocab_size}")
        ids = np.arange(v, dtype=np.int32) if self.token_ids is None else self.token_ids[:v]
        out = self.out_weight[:v] if self.tied else self.out_weight[:nh, :v]
        return MedusaHeads(self.res_weight[:nh], self.res_bias[:nh], out,
                           token_ids=None if v == self.vocab_size and self.token_ids is None else ids,
                           tied=self.tied, target=self.target,
                           acceptance=None if self.acceptance is None else self.acceptance[:nh])

    def residual(self, x: np.ndarray) -> np.ndarray:
        """Final residual states: x (n, H) -> (n_heads, n, H)."""
        rs, _ = nn.residual_stack(np.asarray(x, dtype=np.float32).reshape(-1, self.hidden),
                               self.res_weight, self.res_bias)
        return rs[-1]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Head logits over the reduced vocabulary: x (n, H) -> (n, n_heads, V)."""
        r = self.residual(x)                                     # (nh, n, H)
        z = r @ self._out_t if self.tied else np.matmul(r, self._out_t)
        return z.transpose(1, 0, 2)

    def propose(self, hidden: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top_k tokens of every head for one hidden state (H,), best first:
        (ids (n_heads, top_k) target token ids, logprobs (n_heads, top_k))."""
        if not 1 <= top_k <= self.vocab_size:
            raise ValueError(f"top_k must be from 1 to {self.vocab_size}, got {top_k}")
        z = self.logits(np.asarray(hidden, dtype=np.float32).reshape(1, self.hidden))[0]  # (nh, V)
        top, _ = nn.top_k(z, top_k)
        logprobs = np.take_along_axis(nn.log_softmax(z), top, axis=1)
        ids = top if self.token_ids is None else self.token_ids[top]
        return ids.astype(np.int32), logprobs.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------


def save_heads(path: str | os.PathLike, heads: MedusaHeads, *, dtype: str = "f16",
               name: str | None = None) -> Path:
    """Write `heads` as a head GGUF; matrices in `dtype` (f32, f16 or q8_0), biases in F32.
    Tied heads store no output matrix."""
    qtype = weight_type(dtype, heads.hidden)
    path = Path(path)
    w = gguf.GGUFWriter(path, ARCH)
    w.add_name(name or f"medusa-{heads.n_heads}-heads")
    w.add_uint32(KEY_HEAD_COUNT, heads.n_heads)
    w.add_uint32(KEY_LAYER_COUNT, heads.n_layers)
    w.add_uint32(KEY_EMBD, heads.hidden)
    w.add_uint32(KEY_VOCAB, heads.vocab_size)
    if heads.token_ids is not None:
        w.add_array(KEY_TOKEN_IDS, heads.token_ids.astype(np.int32).tolist())  # INT32
    w.add_bool(KEY_TIED, heads.tied)
    w.add_string(KEY_TARGET_ARCH, heads.target.architecture)
    w.add_uint32(KEY_TARGET_EMBD, heads.target.embedding_length)
    w.add_string(KEY_TARGET_VOCAB_HASH, heads.target.vocab_hash)
    if heads.acceptance is not None:
        w.add_array(KEY_ACCEPTANCE, heads.acceptance.astype(np.float32).ravel().tolist())
    for h in range(heads.n_heads):
        for l in range(heads.n_layers):
            add_matrix(w, res_weight_name(h, l), heads.res_weight[h, l], qtype)
            w.add_tensor(res_bias_name(h, l), np.ascontiguousarray(heads.res_bias[h, l]))
        if not heads.tied:
            add_matrix(w, out_weight_name(h), heads.out_weight[h], qtype)
    write(w)
    return path


def load_heads(path: str | os.PathLike, target: str | os.PathLike | TargetInfo) -> MedusaHeads:
    """Read and validate a head GGUF for `target` (a target GGUF path, or read_target()):
    names, shapes, dtypes, sizes and the target fingerprint. Raises ModelFileError naming
    the file and the problem."""
    info = target if isinstance(target, TargetInfo) else read_target(target)
    f = HeadFile(Path(path))
    f.architecture(ARCH)
    n_heads, n_layers = f.number(KEY_HEAD_COUNT), f.number(KEY_LAYER_COUNT)
    hidden, vocab = f.number(KEY_EMBD), f.number(KEY_VOCAB)
    tied = bool(f.field(KEY_TIED))
    if n_heads < 1 or n_layers < 1 or hidden < 1 or vocab < 1:
        raise f.bad(f"invalid sizes: {n_heads} heads, {n_layers} layers, hidden {hidden}, "
                    f"vocab {vocab}")
    def names():  # every tensor the counts ask for, in file order
        for h in range(n_heads):
            for l in range(n_layers):
                yield res_weight_name(h, l)
                yield res_bias_name(h, l)
            if not tied:
                yield out_weight_name(h)

    # the counts drive every loop and allocation below: check them against the tensors present
    n_expected = n_heads * (2 * n_layers + (0 if tied else 1))
    if n_expected > len(f.tensors):  # a missing one is among the first len(tensors) + 1 names
        missing = next(n for n in names() if n not in f.tensors)
        raise f.bad(f"missing tensor {missing}: {n_heads:,} heads of {n_layers:,} residual layers"
                    f"{'' if tied else ' and an output'} need {n_expected:,} tensors, the file "
                    f"holds {len(f.tensors):,}")
    fp = TargetFingerprint(str(f.field(KEY_TARGET_ARCH)), f.number(KEY_TARGET_EMBD),
                           str(f.field(KEY_TARGET_VOCAB_HASH)))
    f.check_target(fp, info)
    if hidden != fp.embedding_length:
        raise f.bad(f"hidden size {hidden} differs from its target's {fp.embedding_length}")
    token_ids = read_token_ids(f, KEY_TOKEN_IDS, vocab, info)
    acceptance = f.field(KEY_ACCEPTANCE, required=False)
    if acceptance is not None:
        if not isinstance(acceptance, list) or not all(isinstance(a, float) for a in acceptance):
            raise f.bad(f"{KEY_ACCEPTANCE} must be an array of numbers")
        if len(acceptance) % n_heads:
            raise f.bad(f"{KEY_ACCEPTANCE} must hold head_count x ranks values, got {len(acceptance)}")
        acceptance = np.reshape(acceptance, (n_heads, -1))  # its values: checked by MedusaHeads

    expected = {}
    for h in range(n_heads):
        for l in range(n_layers):
            expected[res_weight_name(h, l)] = ((hidden, hidden), MATRIX_TYPES)
            expected[res_bias_name(h, l)] = ((hidden,), VECTOR_TYPES)
        if not tied:
            expected[out_weight_name(h)] = ((vocab, hidden), MATRIX_TYPES)
    f.check_tensors(expected)
    res_w = np.empty((n_heads, n_layers, hidden, hidden), dtype=np.float32)
    res_b = np.empty((n_heads, n_layers, hidden), dtype=np.float32)
    for h in range(n_heads):
        for l in range(n_layers):
            res_w[h, l] = f.load(res_weight_name(h, l))
            res_b[h, l] = f.load(res_bias_name(h, l))
    if tied:
        out_w = info.output_rows(token_ids)
        if out_w.shape != (vocab, hidden):
            raise ModelFileError(f"target {info.path} output matrix rows have {out_w.shape[1]} "
                                 f"columns, expected {hidden}")
    else:
        out_w = np.stack([f.load(out_weight_name(h)) for h in range(n_heads)])
    try:
        return MedusaHeads(res_w, res_b, out_w, token_ids=token_ids, tied=tied, target=fp,
                           acceptance=acceptance)
    except ValueError as e:
        raise f.bad(str(e)) from None


def read_token_ids(f: HeadFile, key: str, vocab: int, info: TargetInfo) -> np.ndarray | None:
    """The target id of each of `vocab` output rows (None: the identity, which needs the
    target's whole vocabulary)."""
    token_ids = f.field(key, required=False)
    if token_ids is None:
        if vocab != info.n_vocab:
            raise f.bad(f"vocab_size {vocab} differs from the target's {info.n_vocab} "
                        f"and there is no {key}")
        return None
    if not isinstance(token_ids, list) or not all(isinstance(t, int) for t in token_ids):
        raise f.bad(f"{key} must be an array of integers")
    return check_token_ids(f, key, np.asarray(token_ids, dtype=np.int64), vocab, info)


def check_token_ids(f: HeadFile, what: str, token_ids: np.ndarray, vocab: int,
                    info: TargetInfo) -> np.ndarray:
    if token_ids.shape != (vocab,):
        raise f.bad(f"{what} has {token_ids.size} entries, expected {vocab}")
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= info.n_vocab):
        raise f.bad(f"{what} holds ids outside the target vocabulary [0, {info.n_vocab})")
    return token_ids.astype(np.int32)
