"""The least Python a decoding round can take on this machine, measured on the real models:
one llama_decode called straight through ctypes, then one read of each row the round
verifies (the array's own argmax, as the engine reads it, or at temperature > 0 ggspec's
sampler), timed right after each decode, when llama.cpp has left the CPU caches cold.

    python tools/round_floor.py --depth 500

A round's Python (`overhead_ms_per_round` in the stats, the wall time outside
llama_decode) cannot go below this: greedy verification must find the argmax of every row
it reads, and a draft model must find the argmax of every row it drafts from. Printed per
kind of round, with the whole draft accepted (every row read), against issue 9's limits of
0.2 ms for plain and lookup rounds and 0.5 ms for a 4-token draft-model round.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable

import llama_cpp
import numpy as np

from ggspec import BackendConfig, SamplingConfig, hub, machine
from ggspec.backend import Context, Model, default_threads
from ggspec.errors import ModelFileError
from ggspec.sampling import distribution, pick

GOALS_MS = {"plain": 0.2, "lookup": 0.2, "draft": 0.5}
Read = Callable[[np.ndarray], object]  # what a round does with one row of logits


class BareDecoder:
    """A batch of its own on a context, for decodes with no Python around them but the
    batch writes and the logits pointer."""

    def __init__(self, ctx: Context, n_max: int) -> None:
        self.ctx = ctx
        self.batch = llama_cpp.llama_batch_init(n_max, 0, 1)
        for i in range(n_max):
            self.batch.seq_id[i][0] = 0
            self.batch.n_seq_id[i] = 1
            self.batch.logits[i] = 1
        self.views: dict[int, np.ndarray] = {}  # of llama.cpp's logits buffer, by address

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)

    def decode(self, depth: int, rows: int, read: Read) -> tuple[float, list[float]]:
        """Decode `rows` tokens after `depth` cached ones, then read each row with `read`:
        (seconds outside llama_decode before reading, reading each row); the rows are
        then dropped from the cache."""
        handle, b, n_vocab = self.ctx.handle, self.batch, self.ctx.n_vocab
        t0 = time.perf_counter()
        b.n_tokens = rows
        for i in range(rows):
            b.token[i], b.pos[i] = 100 + i, depth + i
        t1 = time.perf_counter()
        if llama_cpp.llama_decode(handle, b) != 0:
            raise SystemExit("Error: llama_decode failed")
        # fetching the logits waits for the backend to finish and copy them: llama.cpp's time
        address = ctypes.cast(llama_cpp.llama_get_logits(handle), ctypes.c_void_p).value
        t2 = time.perf_counter()
        logits = self.views.get(address)
        if logits is None:  # (made once: a view costs more to build than a row to read)
            data = (ctypes.c_float * (rows * n_vocab)).from_address(address)
            logits = self.views[address] = np.ctypeslib.as_array(data).reshape(rows, n_vocab)
        t3 = time.perf_counter()
        reads = []
        for row in logits:
            s = time.perf_counter()
            read(row)
            reads.append(time.perf_counter() - s)
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(handle), 0, depth, -1)
        return (t1 - t0) + (t3 - t2), reads


def measure(ctx: Context, depth: int, rows: int, read: Read, repeat: int) -> tuple[float, float]:
    """With `depth` tokens cached in ctx, medians over `repeat` decodes of `rows` tokens:
    (µs outside llama_decode before reading, µs per row read)."""
    bare = BareDecoder(ctx, rows)
    try:
        outside, per_row = [], []
        for _ in range(repeat):
            out, reads = bare.decode(depth, rows, read)
            outside.append(out)
            per_row.extend(reads)
    finally:
        bare.close()
    return 1e6 * statistics.median(outside), 1e6 * statistics.median(per_row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="target: registry name or GGUF path")
    ap.add_argument("-d", "--draft", default=None, help="draft model [default: the target's paired draft]")
    ap.add_argument("--depth", type=int, default=500, help="tokens already in the KV cache")
    ap.add_argument("-k", "--draft-max", type=int, default=4, help="draft tokens of the lookup and draft-model rounds")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--allow-busy", action="store_true", help="measure even while the machine is busy")
    args = ap.parse_args()
    threads = args.threads or default_threads()
    state = machine.idle_or_exit(threads, allow_busy=args.allow_busy)
    target_name = args.model or hub.default_model()
    draft_name = args.draft or hub.default_draft(target_name)
    try:  # both files found before anything is measured
        target_path = hub.resolve(target_name)
        if draft_name is None:
            raise SystemExit("Error: no draft model: give one with --draft")
        draft_path = hub.resolve(draft_name)
    except ModelFileError as e:
        raise SystemExit(f"Error: {e}") from None
    k = args.draft_max
    cfg = BackendConfig(n_ctx=args.depth + k + 16, n_threads=args.threads)
    sampling = SamplingConfig(temperature=0.8)
    rng = np.random.default_rng(0)

    def sample(row: np.ndarray) -> int:
        return pick(*distribution(row, sampling), rng)

    print(state.describe(threads))
    with Model(target_path, cfg) as model, Context(model, cfg) as ctx:
        ctx.eval([100] * args.depth, logits="none")
        plain, argmax1 = measure(ctx, args.depth, 1, np.ndarray.argmax, args.repeat)
        _, sample1 = measure(ctx, args.depth, 1, sample, args.repeat)
        verify, argmax_k = measure(ctx, args.depth, k + 1, np.ndarray.argmax, args.repeat)
    with Model(draft_path, cfg) as model, Context(model, cfg) as ctx:
        ctx.eval([100] * args.depth, logits="none")
        draft_call, draft_argmax = measure(ctx, args.depth, 1, np.ndarray.argmax, args.repeat)
    print(f"depth {args.depth}, medians of {args.repeat} decodes, µs outside llama_decode:")
    print(f"  target, 1 row: call {plain:.1f}, argmax {argmax1:.1f}, sampling at T=0.8 {sample1:.1f}")
    print(f"  target, {k + 1} rows: call {verify:.1f}, argmax {argmax_k:.1f} a row")
    print(f"  draft, 1 row: call {draft_call:.1f}, argmax {draft_argmax:.1f}")
    floors = {
        "plain": plain + argmax1,
        "lookup": verify + (k + 1) * argmax_k,
        "draft": k * (draft_call + draft_argmax) + verify + (k + 1) * argmax_k,
    }
    print("least Python a round can take (every draft token accepted), greedy:")
    for kind, floor in floors.items():
        what = "plain" if kind == "plain" else f"{kind}:{k}"
        verdict = "below the limit" if floor / 1000 <= GOALS_MS[kind] else "ABOVE the limit"
        print(f"  {what:<9} {floor / 1000:.3f} ms   limit {GOALS_MS[kind]:.1f} ms ({verdict})")
    print(f"  plain at T=0.8: {(plain + sample1) / 1000:.3f} ms")


if __name__ == "__main__":
    main()
