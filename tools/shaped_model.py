"""Write a random-weight GGUF with a real model's shapes and quantization, to time
llama_decode where the real file cannot go (a lent GPU machine that reaches no network):

    python tools/shaped_model.py target.gguf --shape qwen2.5-1.5b
    python tools/cost_curve.py -m target.gguf --depth 500

A decode's time depends on the tensors' shapes and types, not on their values, so the
cost curve of this file is the real model's. It is a llama-architecture model with the
shared vocabulary of tests/tinymodels.py padded to the real vocabulary's size (Qwen2's
attention biases and tied output are left out: a few vectors, and one output matrix that
the real file reads as well). llama.cpp quantizes it from float32 with the rules it applies
to the real model (shapes it cannot give k-quants fall back to q5_0 / q8_0, as there). What
it generates is noise, and never the end of generation.
Progress goes to stderr; stdout gets the file's path.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tinymodels import VOCAB, write_tiny_llama  # noqa: E402

SHAPES = {
    "qwen2.5-1.5b": dict(n_layer=28, n_embd=1536, n_head=12, n_head_kv=2, n_ff=8960, n_vocab=151936),
    "qwen2.5-0.5b": dict(n_layer=24, n_embd=896, n_head=14, n_head_kv=2, n_ff=4864, n_vocab=151936),
}
TYPES = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
         "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16}
# the tiny models' end-of-generation trigger (embedding channel 0) does not survive
# quantization: every token would end the answer. Its output row goes to an ordinary token.
NOT_EOG = VOCAB.token_to_id["\u2581the"]


def log(message: str) -> None:
    print(f"shaped_model: {message}", file=sys.stderr, flush=True)


def write(out: Path, shape: dict[str, int], ftype: str, threads: int) -> Path:
    shape = dict(shape)
    n_vocab = shape.pop("n_vocab")
    if n_vocab < VOCAB.n_vocab:
        raise SystemExit(f"shaped_model: n_vocab {n_vocab} is below the shared vocabulary's {VOCAB.n_vocab}")
    f32 = out.with_name(out.name + ".f32.tmp")
    t0 = time.perf_counter()
    try:
        write_tiny_llama(f32, n_ctx=4096, eog_id=NOT_EOG, extra_tokens=n_vocab - VOCAB.n_vocab, **shape)
        log(f"wrote float32 weights in {time.perf_counter() - t0:.0f} s; quantizing to {ftype}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = TYPES[ftype]
        params.nthread = threads
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"shaped_model: llama.cpp could not quantize {f32}")
    finally:
        f32.unlink(missing_ok=True)
    log(f"{out} in {time.perf_counter() - t0:.0f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="GGUF file to write")
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--type", choices=sorted(TYPES), default="q4_k_m")
    ap.add_argument("--threads", type=int, default=0, help="quantization threads (0: all)")
    args = ap.parse_args()
    if not args.out.parent.is_dir():
        raise SystemExit(f"shaped_model: no such directory {args.out.parent}; create it first")
    shape = dict(SHAPES[args.shape])
    if args.layers is not None:
        shape["n_layer"] = args.layers
    print(write(args.out, shape, args.type, args.threads))


if __name__ == "__main__":
    main()
