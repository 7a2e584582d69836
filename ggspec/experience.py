"""What the controller learnt about acceptance, remembered on disk from engine to engine.

The estimates that learn from verified rounds (how often copies hold, by source, match
length, line ends and recent hit rate; the draft model's acceptance by position; the
heads' ratio of accepted to expected tokens) start, in a new engine, from what earlier
engines with the same model files learnt instead of from the built-in starting guesses:
a one-shot `ggspec run` drafts like a server that has answered for a while. The verification
costs are not here: the calibration store (ggspec.calibration) keeps those.

Stored in experience.json in the state directory (ggspec.hub.state_dir), under a key
naming the model files (path, size, modification time) of the target, the draft model and
the heads; saved by the engine (ggspec.engine.REMEMBER_EVERY: at most every 30 seconds,
and when it closes) after generations with a drafter that learns (auto, medusa, eagle),
dropping what was kept for files that no longer exist. Estimates that do not fit this
engine are ignored: it keeps its starting guesses.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from . import hub, session

if TYPE_CHECKING:
    from .engine import Engine

FILE = "experience.json"


def _store() -> Path:
    return hub.state_dir() / FILE


def key(files: Sequence[Path | None]) -> str:
    """A digest naming these model files (absolute paths; None: absent)."""
    facts = [None if f is None else [str(f), (st := f.stat()).st_size, st.st_mtime_ns] for f in files]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:32]


def _learners(engine: Engine) -> dict:
    return {name: part for name, part in session.estimators(engine).items() if name != "costs" and part is not None}


def recall(engine: Engine) -> None:
    """Give the engine's learners what was remembered for its model files, where it fits."""
    entry = hub.read_json(_store()).get(engine.files_key)
    if not isinstance(entry, dict):
        return
    for name, part in _learners(engine).items():
        if name not in entry:
            continue
        before = part.state()
        try:
            part.set_state(entry[name])
        except (ValueError, KeyError, TypeError):
            part.set_state(before)


def remember(engine: Engine) -> None:
    """Store what the engine's learners know now, for its model files (and drop what was
    stored for files that are gone)."""
    data = hub.entries_for_files_that_exist(_store())
    data[engine.files_key] = {"files": [str(f) for f in engine.files if f is not None], "saved": time.time(),
                              **{name: part.state() for name, part in _learners(engine).items()}}
    hub.write_json(_store(), data, "what the controller learnt")
