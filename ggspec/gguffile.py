"""A GGUF file's header (key-values and tensor infos), read defensively and fast.

`read_header` checks everything a loader would trust: counts and lengths against the
bytes left, value and tensor types, tensor shapes, alignment and that every tensor's data
lies inside the file. llama.cpp aborts the whole process on some malformed files rather
than returning an error, so `Model` hands it only files that pass (`check_model_file`).

gguf.GGUFReader builds a Python object per array element: on Qwen2.5's 151,936 tokens and
151,387 merges that takes seconds, so the header is scanned here with struct (~0.3 s), with
the gguf package's type tables.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import ModelFileError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_NAME = 63  # GGML_MAX_NAME - 1 bytes
MAX_DIMS = 4
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
KEY_TOKENS = "tokenizer.ggml.tokens"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Array:
    """An array value: element type, length, where its elements lie [start, end), and
    the elements themselves for the token list (bytes)."""

    etype: int
    n: int
    start: int
    end: int
    items: list[bytes] | None = None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a GGUF file; shape in numpy order (rows, columns)."""

    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    offset: int  # absolute, from the start of the file
    n_bytes: int


@dataclass(frozen=True)
class Header:
    path: Path
    version: int
    kv: dict[str, object]  # numbers, bytes (strings) or Array
    tensors: dict[str, TensorInfo]
    data_start: int
    size: int  # of the file


class _Bad(Exception):
    """A problem found while scanning; read_header names the file."""


class _Scanner:
    """Sequential reader over a memory map; every read is checked against the end."""

    def __init__(self, buf):
        self.buf, self.pos, self.end = buf, 0, len(buf)

    def unpack(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise _Bad(f"truncated at byte {self.pos:,}") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        n = self.unpack("<Q")
        if n > self.end - self.pos:
            raise _Bad(f"a string of {n:,} bytes at byte {self.pos:,} runs past the end of the file")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def value(self, vtype: int, keep: bool):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise _Bad(f"unknown value type {vtype}")
        etype, n = self.unpack("<I"), self.unpack("<Q")
        start = self.pos
        if etype in _SCALARS:
            size = n * struct.calcsize(_SCALARS[etype])
            if size > self.end - self.pos:
                raise _Bad(f"an array of {n:,} elements at byte {start:,} runs past the end of the file")
            self.pos += size
            return Array(etype, n, start, self.pos)
        if etype != _STRING:
            raise _Bad(f"an array of value type {etype} (arrays hold numbers or strings)")
        if n > (self.end - self.pos) // 8:
            raise _Bad(f"an array of {n:,} strings at byte {start:,} runs past the end of the file")
        items = [self.string() for _ in range(n)] if keep else None
        if not keep:
            buf, pos, end = self.buf, self.pos, self.end
            for _ in range(n):
                if pos + 8 > end:
                    raise _Bad(f"truncated at byte {pos:,}")
                pos += 8 + int.from_bytes(buf[pos:pos + 8], "little")
            if pos > end:
                raise _Bad("a string runs past the end of the file")
            self.pos = pos
        return Array(etype, n, start, self.pos, items)


def read_header(path: str | os.PathLike, *, what: str = "GGUF file") -> Header:
    """The checked header of GGUF file `path`. Raises ModelFileError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
        if magic != MAGIC:
            raise ModelFileError(f"not a GGUF file (starts with {magic!r}, expected b'GGUF'): {path}")
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _scan(path, mm)
        except _Bad as e:
            raise ModelFileError(f"{what} {path} is truncated or corrupt: {e}; download it again "
                                 "or check the file") from None


def _scan(path: Path, mm) -> Header:
    s = _Scanner(mm)
    s.pos = 4
    version, n_tensors, n_kv = s.unpack("<I"), s.unpack("<Q"), s.unpack("<Q")
    if version not in VERSIONS:
        raise _Bad(f"GGUF version {version} (supported: {', '.join(map(str, VERSIONS))})")
    if n_kv > (s.end - s.pos) // 13 or n_tensors > (s.end - s.pos) // 24:  # smallest entries
        raise _Bad(f"{n_kv:,} key-values and {n_tensors:,} tensors cannot fit in {s.end:,} bytes")
    kv: dict[str, object] = {}
    for _ in range(n_kv):
        key = _text(s.string(), "key")
        if key in kv:
            raise _Bad(f"key {key!r} appears twice")
        kv[key] = s.value(s.unpack("<I"), keep=key == KEY_TOKENS)
    align = kv.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1):
        raise _Bad(f"general.alignment {align!r} is not a power of 2")
    infos = []
    for _ in range(n_tensors):
        name = _text(s.string(), "tensor name")
        if len(name.encode()) > MAX_NAME:
            raise _Bad(f"tensor name {name[:80]!r} is longer than {MAX_NAME} bytes")
        n_dims = s.unpack("<I")
        if n_dims > MAX_DIMS:
            raise _Bad(f"tensor {name!r} has {n_dims:,} dimensions (at most {MAX_DIMS})")
        dims = [s.unpack("<Q") for _ in range(n_dims)]
        infos.append((name, dims, s.unpack("<I"), s.unpack("<Q")))
    data_start = (s.pos + align - 1) // align * align
    tensors = {}
    for name, dims, qtype, offset in infos:
        if name in tensors:
            raise _Bad(f"tensor {name!r} appears twice")
        tensors[name] = _tensor(name, dims, qtype, offset, align, data_start, s.end)
    return Header(path, version, kv, tensors, data_start, s.end)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"a {what} is not UTF-8: {raw[:40]!r}") from None


def _tensor(name: str, dims: list[int], qtype: int, offset: int, align: int, data_start: int,
            size: int) -> TensorInfo:
    try:
        q = gguf.GGMLQuantizationType(qtype)
        block, type_size = gguf.GGML_QUANT_SIZES[q]
    except (ValueError, KeyError):
        raise _Bad(f"tensor {name!r} has unknown type {qtype}") from None
    n = 1
    for d in dims:
        n *= d
    if n >= 1 << 62:
        raise _Bad(f"tensor {name!r} has shape {tuple(dims)}: too many elements")
    if dims and dims[0] % block:
        raise _Bad(f"tensor {name!r} of type {q.name} has rows of {dims[0]} elements, "
                   f"not a multiple of its block size {block}")
    n_bytes = n // block * type_size
    if offset % align:
        raise _Bad(f"tensor {name!r} has offset {offset:,}, not a multiple of the alignment {align}")
    if data_start + offset + n_bytes > size:
        raise _Bad(f"tensor {name!r} ends at byte {data_start + offset + n_bytes:,}, past the end "
                   f"of the file ({size:,} bytes)")
    return TensorInfo(tuple(reversed(dims)), q, data_start + offset, n_bytes)


# the architectures of the draft heads ggspec loads beside a target (ggspec.heads): what
# each file holds, and how to give it
HEAD_FILES = {b"medusa": ("Medusa heads", "--heads FILE (Python: heads=)"),
              b"eagle1": ("an EAGLE-1/2 draft", "--eagle FILE (Python: eagle=)"),
              b"eagle3": ("an EAGLE-3 draft", "--eagle FILE (Python: eagle=)")}


def check_model_file(path: str | os.PathLike, *, heads: bool = False) -> Header:
    """The header of model file `path` once it is safe to hand to llama.cpp: a valid GGUF
    (read_header) with from 1 to 512 layers and a token list of distinct strings (llama.cpp
    asserts both, ending the process, rather than failing the load), and not draft heads
    for a target unless `heads` (llama.cpp runs an EAGLE-3 draft as a model beside it)."""
    header = read_header(path, what="model file")
    arch = header.kv.get("general.architecture")
    if arch in HEAD_FILES and not heads:
        what, how = HEAD_FILES[arch]
        raise ModelFileError(f"{path} holds {what} for a target model, not a model: give the target "
                             f"with -m and this file with {how}")
    layers = header.kv.get(f"{arch.decode('utf-8', 'replace')}.block_count") if isinstance(arch, bytes) else None
    if layers is not None and not (isinstance(layers, int) and 1 <= layers <= MAX_LAYERS):
        raise ModelFileError(f"model file {path} is corrupt: it has {layers!r:.40} layers "
                             f"(block_count must be from 1 to {MAX_LAYERS})")
    tokens = header.kv.get(KEY_TOKENS)
    if tokens is not None:
        if not isinstance(tokens, Array) or tokens.items is None:
            raise ModelFileError(f"model file {path} is corrupt: {KEY_TOKENS} is not an array of strings")
        seen = set()
        for i, t in enumerate(tokens.items):
            t = t or f"[EMPTY_{i}]".encode()  # as llama.cpp names empty tokens
            if t in seen:
                raise ModelFileError(f"model file {path} is corrupt: token {i} ({t[:40]!r}) appears "
                                     "twice in its vocabulary")
            seen.add(t)
    return header


_Q = gguf.GGMLQuantizationType
INT_TYPES = {_Q.I8: np.int8, _Q.I16: np.int16, _Q.I32: np.int32, _Q.I64: np.int64}


def read_tensor(path: Path, t: TensorInfo, rows: np.ndarray | None = None) -> np.ndarray:
    """Tensor `t` of GGUF file `path` (its rows `rows` of a 2-D one), dequantized to
    float32; integer tensors as int64. Shape: numpy order, rows selected first."""
    n_cols = t.shape[-1] if t.shape else 1
    n_rows = int(np.prod(t.shape[:-1], dtype=np.int64)) if len(t.shape) > 1 else 1
    row_bytes = gguf.quants.quant_shape_to_byte_shape((n_cols,), t.qtype)[0]
    with path.open("rb") as f:
        raw = np.memmap(f, dtype=np.uint8, mode="r", offset=t.offset, shape=(n_rows, row_bytes))
        raw = np.ascontiguousarray(raw if rows is None else raw[np.asarray(rows)])
    if t.qtype in INT_TYPES:
        return raw.view(INT_TYPES[t.qtype]).astype(np.int64).reshape(-1, *t.shape[1:])
    out = gguf.quants.dequantize(raw, t.qtype)
    out = np.ascontiguousarray(out, dtype=np.float32)
    return out.reshape(-1, n_cols) if rows is not None else out.reshape(t.shape)
