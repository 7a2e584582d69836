"""GGUF I/O shared by every kind of head file: validated reading with gguf.GGUFReader
(every problem a one-line ModelFileError naming the file), the target fingerprint check,
and writing matrices in a chosen type with gguf.GGUFWriter."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np

from ..errors import ModelFileError
from ..gguffile import Array, read_header, read_tensor
from .target import TargetFingerprint, TargetInfo

Q = gguf.GGMLQuantizationType
WEIGHT_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
MATRIX_TYPES = frozenset(WEIGHT_TYPES.values())  # what ggspec writes
VECTOR_TYPES = frozenset((Q.F32, Q.F16))
# what llama.cpp's converter and quantizer may write into files ggspec reads
ANY_MATRIX_TYPES = MATRIX_TYPES | {Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}
ANY_VECTOR_TYPES = VECTOR_TYPES | {Q.BF16}

# GGUF array element types holding numbers
ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                10: "<u8", 11: "<i8", 12: "<f8"}
# a tensor the caller expects: name -> (numpy shape, allowed types)
Expected = dict[str, tuple[tuple[int, ...], frozenset]]


class HeadFile:
    """A head GGUF opened for validated reading: its checked header (gguffile.read_header,
    fast over a 150k-token vocabulary where gguf.GGUFReader takes seconds) and tensors
    dequantized with gguf.quants."""

    def __init__(self, path: Path, what: str = "head file"):
        self.path, self.what = Path(path), what
        self.header = read_header(self.path, what=what)
        self.tensors = self.header.tensors
        self._shapes: dict[str, tuple[int, ...]] = {}

    def bad(self, problem: str) -> ModelFileError:
        return ModelFileError(f"{self.what} {self.path}: {problem}")

    def field(self, key: str, required: bool = True):
        """A metadata value: a number, a str, or a list (of numbers, or of strings)."""
        value = self.header.kv.get(key)
        if value is None:
            if required:
                raise self.bad(f"missing metadata key {key}")
            return None
        try:
            if isinstance(value, bytes):
                return value.decode("utf-8")
            if isinstance(value, Array):
                if value.items is not None:
                    return [t.decode("utf-8") for t in value.items]
                if value.etype not in ARRAY_DTYPES:
                    raise ValueError("an array of strings")
                with self.path.open("rb") as f:
                    f.seek(value.start)
                    raw = f.read(value.end - value.start)
                return np.frombuffer(raw, dtype=ARRAY_DTYPES[value.etype]).tolist()
        except ValueError as e:  # e.g. a string that is not UTF-8
            raise self.bad(f"unreadable metadata key {key} ({e})") from None
        return value

    def number(self, key: str, default: int | None = None) -> int:
        value = self.field(key, required=default is None)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.bad(f"{key} must be an integer, got {value!r:.40}")
        return value

    def real(self, key: str, default: float) -> float:
        value = self.field(key, required=False)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad(f"{key} must be a number, got {value!r:.40}")
        return float(value)

    def architecture(self, want: str) -> None:
        arch = self.field("general.architecture")
        if arch != want:
            raise self.bad(f"general.architecture is {arch!r:.60}, expected {want!r} (is this "
                           "a model, not a head file?)")

    def check_target(self, fp: TargetFingerprint, info: TargetInfo) -> None:
        """The file was made for target `info`: architecture, width and vocabulary."""
        for what, mine, theirs in (("architecture", fp.architecture, info.fingerprint.architecture),
                                   ("embedding length", fp.embedding_length,
                                    info.fingerprint.embedding_length),
                                   ("vocabulary hash", fp.vocab_hash, info.fingerprint.vocab_hash)):
            if mine != theirs:
                raise ModelFileError(f"{self.what} {self.path} was made for another target: its "
                                     f"{what} is {mine!r:.80} but target {info.path} has {theirs!r}")

    def check_tensors(self, expected: Expected, optional: Iterable[str] = ()) -> None:
        """Every expected tensor present with its shape and type and inside the file, no
        other (`optional` ones may be absent); names, shapes and types before any data."""
        optional = set(optional)
        extra = sorted(set(self.tensors) - set(expected))
        if extra:
            raise self.bad(f"unexpected tensor {extra[0][:80]!r} ({len(extra)} unexpected in all)")
        missing = [n for n in expected if n not in self.tensors and n not in optional]
        if missing:
            raise self.bad(f"missing tensor {missing[0]} ({len(missing)} missing in all; the "
                           f"file holds {len(self.tensors):,} tensors)")
        for name, (shape, types) in expected.items():
            t = self.tensors.get(name)
            if t is None:
                continue
            if t.shape != shape:
                raise self.bad(f"tensor {name} has shape {t.shape}, expected {shape}")
            if t.qtype not in types:
                raise self.bad(f"tensor {name} has type {t.qtype.name}, expected one of "
                               f"{', '.join(sorted(q.name for q in types))}")
            self._shapes[name] = shape

    def load(self, name: str) -> np.ndarray:
        """A checked tensor, dequantized to float32 (integer tensors as int64)."""
        a = read_tensor(self.path, self.tensors[name]).reshape(self._shapes[name])
        if a.dtype == np.float32 and not np.isfinite(a).all():
            raise self.bad(f"tensor {name} holds NaN or infinite values")
        return a


def add_matrix(w: gguf.GGUFWriter, name: str, a: np.ndarray, qtype: Q) -> None:
    """Add float matrix `a` to writer `w` as F32, F16 or Q8_0."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if qtype == Q.F32:
        w.add_tensor(name, a)
    elif qtype == Q.F16:
        w.add_tensor(name, a.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)


def weight_type(dtype: str, *widths: int) -> Q:
    """The GGUF type of `dtype` (f32, f16, q8_0) for matrices with rows of `widths`."""
    if dtype not in WEIGHT_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(WEIGHT_TYPES)}, got {dtype!r}")
    qtype = WEIGHT_TYPES[dtype]
    if qtype == Q.Q8_0 and any(n % 32 for n in widths):
        raise ValueError(f"q8_0 needs row widths divisible by 32, got {sorted(set(widths))}")
    return qtype


def write(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
