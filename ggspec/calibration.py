"""Measure what a verification costs on this machine, once, and remember it on disk.

A calibration times one llama_decode of b rows after the cached tokens for every b the
controller may use, in PASSES passes over the sizes (up, then down), keeping each size's
fastest (the rounds that follow correct the points they use), and one draft-model token.
Every size is measured alike: a curve whose t(1) were the best of more tries than the other
points would overstate every other point against it, and a size that looks too dear is
never tried, so never corrected.

A row attends to every cached token, so a verification costs more the deeper the context:
on the default pair, 16 rows cost 7.1 t(1) after 10 cached tokens and 8.4-8.7 t(1) after
300-600, while t(1) itself barely moves. So the same sizes are timed again DEEPER tokens
further on, and the growth per cached token is fitted as a + b * rows (attention's cost is
linear in the rows and the depth); the cost model adds it at the depth of each round. (Not
for a recurrent target: its state does not grow with the tokens, and it could not be cut
back to where the calibration started.)

Stored in calibration.json in the cache directory under a key naming everything that
changes the figures: the model file (path, size, modification time), the context's
settings (threads, batch, GPU layers, flash attention, sequences, embeddings, rollback slots),
llama.cpp's build and this machine's CPU. Any change of those measures again. A
calibration taken while other processes were busy is used but not stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np

from . import hub, machine
from .backend import Context

DENSE_ROWS = 33   # every size up to here is measured (CPU kernels favour some sizes, e.g.
STRIDE = 8        # multiples of 16); above it every STRIDE-th one
PASSES = 2        # timings of each size: the fastest counts
DEEPER = 256      # the second timing of the sizes is this many cached tokens further on
MIN_DEEPER = 64   # with less room than this in the context, the depth is not measured
FILE = "calibration.json"


def context_key(ctx: Context) -> str:
    """A digest of everything that changes the costs measured on `ctx`."""
    path = ctx.model.path.resolve()
    st = path.stat()
    cfg = ctx.cfg
    facts = [str(path), st.st_size, st.st_mtime_ns, ctx.n_threads, ctx.n_batch, cfg.n_gpu_layers,
             cfg.flash_attn, ctx.n_seq_max, ctx.embeddings, llama_cpp.__version__,
             llama_cpp.llama_print_system_info().decode(), machine.cpu_name(), os.cpu_count(),
             ("passes", PASSES), ("deeper", DEEPER)]  # (curves stored before were measured another way)
    if ctx.n_rs_seq:  # rollback slots (recurrent models); absent, the keys stored before them hold
        facts.append(("rollback slots", ctx.n_rs_seq))
    if cfg.rpc or cfg.tensor_split:  # split across RPC servers: likewise only then
        facts.append(("rpc", cfg.rpc, cfg.tensor_split))
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:32]


def measured_sizes(rows: int) -> list[int]:
    return sorted({*range(1, min(rows, DENSE_ROWS) + 1), *range(DENSE_ROWS, rows + 1, STRIDE), rows})


def measure(ctx: Context, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Seconds for one decode of b = 1..rows tokens after no cached token, and what each
    cached token adds to them: (rows,) each, sizes between measured ones interpolated.
    The cost at depth d is curve + d * slope. Leaves the KV cache as it found it."""
    n = len(ctx.tokens)
    filler = ctx.tokens[-1:] or [0]
    ctx.checkpoint(rows, 0)  # a recurrent state is saved here, and restored by each truncate
    ctx.eval(filler, logits="last")  # warm-up: the first decode allocates
    ctx.truncate(n)
    sizes = np.array(measured_sizes(rows))
    shallow = _time_sizes(ctx, filler, sizes)
    slope = np.zeros(len(sizes))
    deeper = min(DEEPER, ctx.n_ctx - n - rows)
    if not ctx.model.recurrent and deeper >= MIN_DEEPER:
        ctx.eval(filler * deeper, logits="none")
        deep = _time_sizes(ctx, filler, sizes)
        ctx.truncate(n)
        a, b = np.linalg.lstsq(np.stack([np.ones(len(sizes)), sizes], axis=1), (deep - shallow) / deeper,
                               rcond=None)[0]
        slope = np.maximum(a + b * sizes, 0.0)
    curve = np.maximum(shallow - n * slope, 0.5 * shallow)  # (at no depth; never below half what was seen)
    every = np.arange(1, rows + 1)
    return np.interp(every, sizes, curve), np.interp(every, sizes, slope)


def _time_sizes(ctx: Context, filler: list[int], sizes: np.ndarray) -> np.ndarray:
    """Seconds for one decode of each size after the cached tokens: the fastest of PASSES."""
    n = len(ctx.tokens)
    seconds = np.full(len(sizes), np.inf)
    order = [i for p in range(PASSES) for i in (range(len(sizes)) if p % 2 == 0 else reversed(range(len(sizes))))]
    for i in order:
        t0 = time.perf_counter()
        ctx.eval(filler * int(sizes[i]), logits="all")
        seconds[i] = min(seconds[i], time.perf_counter() - t0)
        ctx.truncate(n)
    return seconds


def _store() -> Path:
    return hub.cache_dir() / FILE


def cached_curve(ctx: Context, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored curve and slope (see measure) for this context, when they cover `rows` rows."""
    entry = hub.read_json(_store()).get(context_key(ctx))
    try:
        curve, slope = (np.asarray(entry[k], dtype=np.float64) for k in ("seconds", "slope"))
    except (TypeError, KeyError, ValueError):
        return None
    if curve.ndim != 1 or curve.shape != slope.shape or len(curve) < rows \
            or not np.all(np.isfinite(curve) & (curve > 0) & np.isfinite(slope) & (slope >= 0)):
        return None
    return curve[:rows], slope[:rows]


def store_curve(ctx: Context, curve: np.ndarray, slope: np.ndarray) -> None:
    """Add this context's curve and slope to the store (written atomically; a failure to
    write is only a lost cache)."""
    data = hub.read_json(_store())
    data[context_key(ctx)] = {"model": ctx.model.path.name, "threads": ctx.n_threads,
                              "depth": len(ctx.tokens), "measured": time.time(),
                              "seconds": [float(s) for s in curve], "slope": [float(s) for s in slope]}
    hub.write_json(_store(), data, "the calibration")


def verify_curve(ctx: Context, rows: int, *, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The verification cost of `ctx` for 1..rows rows at no depth, and what each cached
    token adds (see measure): from the store, else measured now (and stored)."""
    cached = cached_curve(ctx, rows)
    if cached is not None:
        return cached
    if progress:
        print(f"ggspec: measuring {ctx.model.path.name}'s verification cost for 1-{rows} rows "
              f"(once for this model, machine and settings)", file=sys.stderr)
    before = machine.snapshot()
    curve, slope = measure(ctx, rows)
    busy = machine.busy_since(before)
    if busy:  # the shape is distorted: use it now, measure again next time
        print(f"ggspec: not saving the calibration: other processes were busy ({', '.join(busy)})",
              file=sys.stderr)
    else:
        store_curve(ctx, curve, slope)
    return curve, slope
