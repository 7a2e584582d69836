"""Measure what a verification costs on this machine, once, and remember it on disk.

A calibration times one llama_decode of b rows after the cached tokens for every b the
controller may use (ggspec.controller.Survey: every size alike, in two passes, each
size's fastest kept; the rounds that follow correct the points they use), and one
draft-model token. It is stored in calibration.json in the state directory
(ggspec.hub.state_dir) under a key naming everything that changes the figures: the model
file (path, size, modification time), the context's settings (threads, batch, GPU layers,
flash attention, sequences, embeddings, rollback slots), llama.cpp's build (its library
file: a rebuild with other compiler flags changes which kernels run) and this machine's
CPU. Any change of those measures again. A calibration taken while other processes were
busy is used but not stored. Storing one drops what was stored for model
files that are gone.

measure() decodes filler tokens, for an application that has time before its first
generation (Engine.prepare). A generation that finds nothing stored does not wait for
that: its rounds time the sizes they verify, choosing meanwhile by what they have timed
(ggspec.controller.Survey), and until every size is timed, what they took is stored as a
survey under way (store_survey) for the next engine to go on with.

The cost model refines the curve from the rounds it runs (ggspec.controller.CostModel:
a correction per size). The curve is timed just after the first prompt, and rounds deep in
a context cost more, the larger more so; one answer runs too few rounds of each size to
learn that. So the corrections are stored beside the curve (`correction`; by the engine,
with what its generations learnt, not when other processes were busy since the last
store), and the next engine with the same key starts from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from . import hub, machine, weights
from .backend import Context
from .controller import PASSES, Survey, measured_sizes

FILE = "calibration.json"


def context_key(ctx: Context) -> str:
    """A digest of everything that changes the costs measured on `ctx`."""
    path = ctx.model.path.resolve()
    st = path.stat()
    cfg = ctx.cfg
    facts = [str(path), st.st_size, st.st_mtime_ns, ctx.n_threads, ctx.n_batch, cfg.n_gpu_layers,
             cfg.flash_attn, ctx.n_seq_max, ctx.embeddings, weights.build_key(), os.cpu_count(),
             ("passes", PASSES)]  # (curves stored before passes were measured another way)
    if ctx.n_rs_seq:  # rollback slots (recurrent models); absent, the keys stored before them hold
        facts.append(("rollback slots", ctx.n_rs_seq))
    if cfg.rpc or cfg.tensor_split:  # split across RPC servers: likewise only then
        facts.append(("rpc", cfg.rpc, cfg.tensor_split))
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:32]


def measure(ctx: Context, rows: int, stop: threading.Event | None = None,
            survey: Survey | None = None) -> np.ndarray | None:
    """Seconds for one decode of b = 1..rows tokens after the cached ones: (rows,),
    sizes between measured ones interpolated; None if `stop` is set before the last
    decode. Takes the timings `survey` still waits for (a new one's if None; one that
    stops keeps those it took). Leaves the KV cache as it found it."""
    n = len(ctx.tokens)
    filler = ctx.tokens[-1:] or [0]
    ctx.checkpoint(rows, 0)  # a recurrent state is saved here, and restored by each truncate
    ctx.eval(filler, logits="last")  # warm-up: the first decode allocates
    ctx.truncate(n)
    survey = Survey(rows) if survey is None else survey
    while (b := survey.next) is not None:
        if stop is not None and stop.is_set():
            return None
        t0 = time.perf_counter()
        ctx.eval(filler * b, logits="all")
        survey.observe(b, time.perf_counter() - t0)
        ctx.truncate(n)
    return survey.curve()


def _store() -> Path:
    return hub.state_dir() / FILE


def cached_curve(ctx: Context, rows: int) -> np.ndarray | None:
    """The stored curve for this context, when it covers `rows` rows."""
    return _stored(ctx, "seconds", rows)


def _entry(ctx: Context):
    """What the store holds for this context (None if nothing; anything if damaged)."""
    return hub.read_json(_store()).get(context_key(ctx))


def _labels(ctx: Context) -> dict:
    """What an entry names for a person reading the store (and for dropping it when its
    model file is gone)."""
    return {"files": [str(ctx.model.path.resolve())], "model": ctx.model.path.name, "threads": ctx.n_threads}


def _sane(seconds: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(seconds) & (seconds > 0)))


def _stored(ctx: Context, name: str, rows: int | None) -> np.ndarray | None:
    """The first `rows` numbers stored as `name` for this context (None: all), when there
    are that many and all are finite and positive."""
    try:
        values = np.asarray(_entry(ctx)[name], dtype=np.float64)
    except (TypeError, KeyError, ValueError):
        return None
    if values.ndim != 1 or len(values) < (rows or 1) or not _sane(values):
        return None
    return values[:rows]


def store_curve(ctx: Context, curve: np.ndarray) -> None:
    """Add this context's curve to the store (written atomically; a failure to write is
    only a lost cache), and drop what was stored for model files that are gone."""
    data = hub.entries_for_files_that_exist(_store())
    data[context_key(ctx)] = {**_labels(ctx), "depth": len(ctx.tokens), "measured": time.time(),
                              "seconds": [float(s) for s in curve]}
    hub.write_json(_store(), data, "the calibration")


def stored_survey(ctx: Context, rows: int) -> Survey:
    """A survey of this context's curve for `rows` rows, begun from what the store holds: a
    shorter stored curve's points (each as all its passes' timings) and a stored survey's
    timings (of any rows; none when any is damaged)."""
    curve = _stored(ctx, "seconds", None)
    done = [] if curve is None else \
        [(b, float(curve[b - 1])) for b in measured_sizes(rows) if b <= len(curve) for _ in range(PASSES)]
    try:
        saved = [(int(b), float(s)) for b, s in _entry(ctx)["survey"]["done"]]
    except (TypeError, KeyError, ValueError):
        saved = []
    return Survey(rows, done + saved if _sane(np.array([s for _, s in saved])) else done)


def store_survey(ctx: Context, survey: Survey) -> None:
    """Store a survey under way for this context (written atomically), beside a shorter
    curve stored for it, if any."""
    data = hub.entries_for_files_that_exist(_store())
    key = context_key(ctx)
    entry = data[key] if isinstance(data.get(key), dict) else {}
    entry.update({**_labels(ctx), "survey": {"rows": survey.rows, "done": survey.done}})
    data[key] = entry
    hub.write_json(_store(), data, "the calibration")


def stored_correction(ctx: Context, rows: int) -> np.ndarray | None:
    """The cost model's per-size corrections stored for this context's curve (rows,), when
    there are that many and they are sane."""
    return _stored(ctx, "correction", rows)


def store_correction(ctx: Context, correction: np.ndarray) -> None:
    """Store the cost model's per-size corrections beside this context's stored curve (none
    stored: nothing to refine). Sizes beyond them keep what was stored."""
    data = hub.read_json(_store())
    entry = data.get(context_key(ctx))
    if not isinstance(entry, dict) or not isinstance(entry.get("seconds"), list):
        return
    stored, rows = entry.get("correction"), len(entry["seconds"])
    kept = stored if isinstance(stored, list) and len(stored) == rows else [1.0] * rows
    n = min(len(correction), len(kept))
    entry["correction"] = [float(c) for c in correction[:n]] + kept[n:]
    hub.write_json(_store(), data, "the calibration")


def verify_curve(ctx: Context, rows: int, *, progress: bool = True, stop: threading.Event | None = None,
                 survey: Survey | None = None) -> np.ndarray | None:
    """The verification cost curve of `ctx` for 1..rows rows: from the store, else measured
    now (and stored; going on with `survey` if given); None if `stop` is set before the
    measurement ends."""
    curve = cached_curve(ctx, rows)
    if curve is not None:
        return curve
    if progress:
        print(f"ggspec: measuring {ctx.model.path.name}'s verification cost for 1-{rows} rows "
              f"(once for this model, machine and settings)", file=sys.stderr)
    before = machine.snapshot()
    curve = measure(ctx, rows, stop, survey)
    if curve is not None:
        keep(ctx, curve, before)
    return curve


def keep(ctx: Context, curve: np.ndarray, since: machine.Snapshot) -> None:
    """Store a curve measured since `since`, unless other processes were busy meanwhile
    (its shape is then distorted: it is used now, and measured again next time)."""
    busy = machine.busy_since(since)
    if busy:
        print(f"ggspec: not saving the calibration: other processes were busy ({', '.join(busy)})",
              file=sys.stderr)
    else:
        store_curve(ctx, curve)
