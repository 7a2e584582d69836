"""The target as draft heads see it: its fingerprint (what a head file must match) and
its output matrix, from the checked GGUF header that loading the model reads anyway
(gguffile.read_header; gguf.GGUFReader takes seconds over a 150k-token vocabulary)."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelFileError
from ..gguffile import KEY_TOKENS, Array, Header, TensorInfo, read_header, read_tensor

if TYPE_CHECKING:
    from ..backend import Model


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
    """A target GGUF as the heads see it: fingerprint, vocabulary size, layer count,
    output tensor and token embedding tensor."""

    path: Path
    fingerprint: TargetFingerprint
    n_vocab: int
    n_layer: int
    output: TensorInfo  # output.weight, or token_embd.weight when the embeddings are tied
    token_embd: TensorInfo

    def output_rows(self, token_ids: np.ndarray | None = None) -> np.ndarray:
        """Rows `token_ids` (all when None) of the target's output matrix, dequantized:
        (len(token_ids), n_embd) float32."""
        return self.rows(self.output, token_ids)

    def rows(self, tensor: TensorInfo, token_ids: np.ndarray | None = None) -> np.ndarray:
        """Rows `token_ids` (all when None) of a 2-D tensor of the target, dequantized."""
        return read_tensor(self.path, tensor, token_ids)


def read_target(target: str | os.PathLike | Model) -> TargetInfo:
    """A target's fingerprint and tensors: from a loaded Model's header, or a GGUF path."""
    header: Header = target.header if hasattr(target, "header") else read_header(
        target, what="target model file")
    kv = header.kv
    arch = kv.get("general.architecture")
    if not isinstance(arch, bytes):
        raise ModelFileError(f"{header.path} has no general.architecture")
    arch = arch.decode("utf-8", "replace")
    n_embd, tokens = kv.get(f"{arch}.embedding_length"), kv.get(KEY_TOKENS)
    if not isinstance(tokens, Array) or tokens.items is None or not isinstance(n_embd, int):
        raise ModelFileError(f"{header.path} has no tokenizer.ggml.tokens or {arch}.embedding_length")
    embd = header.tensors.get("token_embd.weight")
    output = header.tensors.get("output.weight", embd)
    if embd is None or len(embd.shape) != 2 or len(output.shape) != 2:
        raise ModelFileError(f"{header.path} has no 2-D token_embd.weight (and output.weight)")
    n_layer = kv.get(f"{arch}.block_count", 0)
    fp = TargetFingerprint(arch, int(n_embd), vocab_hash(tokens.items))
    return TargetInfo(path=header.path, fingerprint=fp, n_vocab=tokens.n, n_layer=int(n_layer),
                      output=output, token_embd=embd)
