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

import hashlib
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import ModelFileError
from .gguffile import KEY_TOKENS, Array, TensorInfo, read_header

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

Q = gguf.GGMLQuantizationType
WEIGHT_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
MATRIX_TYPES = frozenset(WEIGHT_TYPES.values())
VECTOR_TYPES = frozenset((Q.F32, Q.F16))


def res_weight_name(h: int, l: int) -> str:
    return f"medusa.{h}.res.{l}.weight"


def res_bias_name(h: int, l: int) -> str:
    return f"medusa.{h}.res.{l}.bias"


def out_weight_name(h: int) -> str:
    return f"medusa.{h}.out.weight"


# ---------------------------------------------------------------------------------------
# The target: fingerprint and output rows, read straight from its GGUF header.
# ---------------------------------------------------------------------------------------


def vocab_hash(tokens: Iterable[bytes]) -> str:
    """sha256 (hex) of the token texts in id order, each framed as its byte length
    (uint64 little-endian) followed by its UTF-8 bytes: exactly the payload of the GGUF
    array tokenizer.ggml.tokens. `Model.token_text(i)` for every id gives the same hash."""
    h = hashlib.sha256()
    for t in tokens:
        h.update(struct.pack("<Q", len(t)))
        h.update(t)
    return h.hexdigest()


@dataclass(frozen=True)
class TargetFingerprint:
    """What a head file must match in its target."""

    architecture: str
    embedding_length: int
    vocab_hash: str


@dataclass(frozen=True)
class TargetInfo:
    """A target GGUF as the heads see it: fingerprint, vocabulary size, output tensor."""

    path: Path
    fingerprint: TargetFingerprint
    n_vocab: int
    output: TensorInfo  # output.weight, or token_embd.weight when the embeddings are tied

    def output_rows(self, token_ids: np.ndarray | None = None) -> np.ndarray:
        """Rows `token_ids` (all when None) of the target's output matrix, dequantized:
        (len(token_ids), n_embd) float32."""
        n_rows, n_cols = self.output.shape
        row_bytes = gguf.quants.quant_shape_to_byte_shape((n_cols,), self.output.qtype)[0]
        with self.path.open("rb") as f:
            raw = np.memmap(f, dtype=np.uint8, mode="r", offset=self.output.offset,
                            shape=(n_rows, row_bytes))
            rows = raw if token_ids is None else raw[np.asarray(token_ids)]
            out = gguf.quants.dequantize(np.ascontiguousarray(rows), self.output.qtype)
        return np.ascontiguousarray(out, dtype=np.float32).reshape(-1, n_cols)


def read_target(path: str | os.PathLike) -> TargetInfo:
    """A target GGUF's fingerprint and output tensor, from its checked header."""
    header = read_header(path, what="target model file")
    kv = header.kv
    arch = kv.get("general.architecture")
    if not isinstance(arch, bytes):
        raise ModelFileError(f"{header.path} has no general.architecture")
    arch = arch.decode("utf-8", "replace")
    n_embd, tokens = kv.get(f"{arch}.embedding_length"), kv.get(KEY_TOKENS)
    if not isinstance(tokens, Array) or tokens.items is None or not isinstance(n_embd, int):
        raise ModelFileError(f"{header.path} has no tokenizer.ggml.tokens or {arch}.embedding_length")
    name = "output.weight" if "output.weight" in header.tensors else "token_embd.weight"
    output = header.tensors.get(name)
    if output is None or len(output.shape) != 2:
        raise ModelFileError(f"{header.path} has no 2-D output.weight or token_embd.weight")
    with header.path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        digest = hashlib.sha256(mm[tokens.start:tokens.end]).hexdigest()
    fp = TargetFingerprint(arch, int(n_embd), digest)
    return TargetInfo(path=header.path, fingerprint=fp, n_vocab=tokens.n, output=output)


# ---------------------------------------------------------------------------------------
# The heads
# ---------------------------------------------------------------------------------------


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * z)  # = 1 / (1 + exp(-z)), without overflow


def silu(z: np.ndarray) -> np.ndarray:
    return z * sigmoid(z)


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
        # per layer, every head's matrix stacked: layer 0 of all heads reads the same x,
        # so it is one (n_heads*H, H) matrix-vector product
        self._w = [np.ascontiguousarray(res_weight[:, l]) for l in range(n_layers)]  # (nh, H, H)
        self._b = [np.ascontiguousarray(res_bias[:, l]) for l in range(n_layers)]    # (nh, H)
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
        """Final residual states: x (n, H) -> (n, n_heads, H)."""
        n, nh, d = x.shape[0], self.n_heads, self.hidden
        r = x[:, None, :] + silu(x @ self._w[0].reshape(nh * d, d).T + self._b[0].reshape(-1)
                                 ).reshape(n, nh, d)
        for w, b in zip(self._w[1:], self._b[1:]):
            r = r + silu(np.einsum("khd,nkd->nkh", w, r) + b)
        return r

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Head logits over the reduced vocabulary: x (n, H) -> (n, n_heads, V)."""
        r = self.residual(np.asarray(x, dtype=np.float32).reshape(-1, self.hidden))
        if self.tied:
            return r @ self._out_t
        return np.einsum("nkh,khv->nkv", r, self._out_t)

    def propose(self, hidden: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top_k tokens of every head for one hidden state (H,), best first:
        (ids (n_heads, top_k) target token ids, logprobs (n_heads, top_k))."""
        if not 1 <= top_k <= self.vocab_size:
            raise ValueError(f"top_k must be from 1 to {self.vocab_size}, got {top_k}")
        x = np.asarray(hidden, dtype=np.float32).reshape(self.hidden)
        nh, d = self.n_heads, self.hidden
        r = x + silu(self._w[0].reshape(nh * d, d) @ x + self._b[0].reshape(-1)).reshape(nh, d)
        for w, b in zip(self._w[1:], self._b[1:]):
            r = r + silu(np.matmul(w, r[:, :, None])[:, :, 0] + b)
        if self.tied:
            z = r @ self._out_t                                   # (nh, V): one product
        else:
            z = np.matmul(r[:, None, :], self._out_t)[:, 0, :]    # (nh, V)
        top = np.argpartition(z, -top_k, axis=1)[:, -top_k:]      # (nh, top_k), unordered
        zt = np.take_along_axis(z, top, axis=1)
        order = np.argsort(-zt, axis=1)
        top, zt = np.take_along_axis(top, order, axis=1), np.take_along_axis(zt, order, axis=1)
        m = z.max(axis=1, keepdims=True)
        logprobs = zt - (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))  # log softmax
        ids = top if self.token_ids is None else self.token_ids[top]
        return ids.astype(np.int32), logprobs.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------


def save_heads(path: str | os.PathLike, heads: MedusaHeads, *, dtype: str = "f16",
               name: str | None = None) -> Path:
    """Write `heads` as a head GGUF; matrices in `dtype` (f32, f16 or q8_0), biases in F32.
    Tied heads store no output matrix."""
    if dtype not in WEIGHT_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(WEIGHT_TYPES)}, got {dtype!r}")
    qtype = WEIGHT_TYPES[dtype]
    if qtype == Q.Q8_0 and heads.hidden % 32:
        raise ValueError(f"q8_0 needs a hidden size divisible by 32, got {heads.hidden}")
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

    def matrix(tname: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=np.float32)
        if qtype == Q.F32:
            w.add_tensor(tname, a)
        elif qtype == Q.F16:
            w.add_tensor(tname, a.astype(np.float16))
        else:
            w.add_tensor(tname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    for h in range(heads.n_heads):
        for l in range(heads.n_layers):
            matrix(res_weight_name(h, l), heads.res_weight[h, l])
            w.add_tensor(res_bias_name(h, l), np.ascontiguousarray(heads.res_bias[h, l]))
        if not heads.tied:
            matrix(out_weight_name(h), heads.out_weight[h])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load_heads(path: str | os.PathLike, target: str | os.PathLike | TargetInfo) -> MedusaHeads:
    """Read and validate a head GGUF for `target` (a target GGUF path, or read_target()):
    names, shapes, dtypes, sizes and the target fingerprint. Raises ModelFileError naming
    the file and the problem."""
    path = Path(path)
    info = target if isinstance(target, TargetInfo) else read_target(target)
    read_header(path, what="head file")  # GGUFReader can loop for ages over hostile counts
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ModelFileError(f"head file {path} is truncated or corrupt ({e})") from None
    return _heads_from_reader(path, reader, info)


def _heads_from_reader(path: Path, reader: gguf.GGUFReader, info: TargetInfo) -> MedusaHeads:
    def bad(problem: str) -> ModelFileError:
        return ModelFileError(f"head file {path}: {problem}")

    def field(key: str, required: bool = True):
        f = reader.get_field(key)
        if f is None:
            if required:
                raise bad(f"missing metadata key {key}")
            return None
        try:
            return f.contents()
        except (ValueError, IndexError) as e:  # e.g. a string that is not UTF-8
            raise bad(f"unreadable metadata key {key} ({e})") from None

    def number(key: str) -> int:
        value = field(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"{key} must be an integer, got {value!r:.40}")
        return value

    arch = field("general.architecture")
    if arch != ARCH:
        raise bad(f"general.architecture is {arch!r:.60}, expected {ARCH!r} (is this a model, "
                  "not a head file?)")
    n_heads, n_layers = number(KEY_HEAD_COUNT), number(KEY_LAYER_COUNT)
    hidden, vocab = number(KEY_EMBD), number(KEY_VOCAB)
    tied = bool(field(KEY_TIED))
    if n_heads < 1 or n_layers < 1 or hidden < 1 or vocab < 1:
        raise bad(f"invalid sizes: {n_heads} heads, {n_layers} layers, hidden {hidden}, "
                  f"vocab {vocab}")
    tensors = {t.name: t for t in reader.tensors}

    def expected():  # (name, shape, types) of every tensor the counts ask for
        for h in range(n_heads):
            for l in range(n_layers):
                yield res_weight_name(h, l), (hidden, hidden), MATRIX_TYPES
                yield res_bias_name(h, l), (hidden,), VECTOR_TYPES
            if not tied:
                yield out_weight_name(h), (vocab, hidden), MATRIX_TYPES

    # the counts drive every loop and allocation below: check them against the tensors present
    n_expected = n_heads * (2 * n_layers + (0 if tied else 1))
    if n_expected > len(tensors):  # a missing one is among the first len(tensors) + 1 names
        missing = next(name for name, _, _ in expected() if name not in tensors)
        raise bad(f"missing tensor {missing}: {n_heads:,} heads of {n_layers:,} residual layers"
                  f"{'' if tied else ' and an output'} need {n_expected:,} tensors, the file "
                  f"holds {len(tensors):,}")
    fp = TargetFingerprint(str(field(KEY_TARGET_ARCH)), number(KEY_TARGET_EMBD),
                           str(field(KEY_TARGET_VOCAB_HASH)))
    for what, mine, theirs in (("architecture", fp.architecture, info.fingerprint.architecture),
                               ("embedding length", fp.embedding_length,
                                info.fingerprint.embedding_length),
                               ("vocabulary hash", fp.vocab_hash, info.fingerprint.vocab_hash)):
        if mine != theirs:
            raise ModelFileError(f"head file {path} was made for another target: its {what} is "
                                 f"{mine!r:.80} but target {info.path} has {theirs!r}")
    if hidden != fp.embedding_length:
        raise bad(f"hidden size {hidden} differs from its target's {fp.embedding_length}")
    token_ids = field(KEY_TOKEN_IDS, required=False)
    if token_ids is not None:
        if not isinstance(token_ids, list) or not all(isinstance(t, int) for t in token_ids):
            raise bad(f"{KEY_TOKEN_IDS} must be an array of integers")
        token_ids = np.asarray(token_ids, dtype=np.int64)
        if token_ids.shape != (vocab,):
            raise bad(f"{KEY_TOKEN_IDS} has {token_ids.size} entries, expected {vocab}")
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= info.n_vocab):
            raise bad(f"{KEY_TOKEN_IDS} holds ids outside the target vocabulary "
                      f"[0, {info.n_vocab})")
        token_ids = token_ids.astype(np.int32)
    elif vocab != info.n_vocab:
        raise bad(f"vocab_size {vocab} differs from the target's {info.n_vocab} "
                  f"and there is no {KEY_TOKEN_IDS}")

    acceptance = field(KEY_ACCEPTANCE, required=False)
    if acceptance is not None:
        if not isinstance(acceptance, list) or not all(isinstance(a, float) for a in acceptance):
            raise bad(f"{KEY_ACCEPTANCE} must be an array of numbers")
        if len(acceptance) % n_heads:
            raise bad(f"{KEY_ACCEPTANCE} must hold head_count x ranks values, got {len(acceptance)}")
        acceptance = np.reshape(acceptance, (n_heads, -1))  # its values: checked by MedusaHeads

    size = path.stat().st_size
    shapes = {name: shape for name, shape, _ in expected()}
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise bad(f"unexpected tensor {extra[0][:80]!r} ({len(extra)} unexpected in all)")
    for tname, shape, types in expected():  # every tensor's facts before any data
        t = tensors[tname]
        got = tuple(int(d) for d in reversed(t.shape))
        if got != shape:
            raise bad(f"tensor {tname} has shape {got}, expected {shape}")
        if t.tensor_type not in types:
            raise bad(f"tensor {tname} has type {t.tensor_type.name}, expected one of "
                      f"{', '.join(sorted(q.name for q in types))}")
        if t.data_offset + t.n_bytes > size:
            raise bad(f"truncated: tensor {tname} ends at byte {t.data_offset + t.n_bytes:,} "
                      f"but the file has {size:,}")

    def load(tname: str) -> np.ndarray:
        t = tensors[tname]
        a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        a = np.asarray(a, dtype=np.float32).reshape(shapes[tname])
        if not np.isfinite(a).all():
            raise bad(f"tensor {tname} holds NaN or infinite values")
        return a

    res_w = np.empty((n_heads, n_layers, hidden, hidden), dtype=np.float32)
    res_b = np.empty((n_heads, n_layers, hidden), dtype=np.float32)
    for h in range(n_heads):
        for l in range(n_layers):
            res_w[h, l] = load(res_weight_name(h, l))
            res_b[h, l] = load(res_bias_name(h, l))
    if tied:
        out_w = info.output_rows(token_ids)
        if out_w.shape != (vocab, hidden):
            raise ModelFileError(f"target {info.path} output matrix rows have {out_w.shape[1]} "
                                 f"columns, expected {hidden}")
    else:
        out_w = np.stack([load(out_weight_name(h)) for h in range(n_heads)])
    try:
        return MedusaHeads(res_w, res_b, out_w, token_ids=token_ids, tied=tied, target=fp,
                           acceptance=acceptance)
    except ValueError as e:
        raise bad(str(e)) from None
