"""Stage 1 of head training: run text through the target with llama.cpp and store, per row,
the final hidden state x_t (float16; for EAGLE-3 drafts, `layers`: the inputs of those
target layers, concatenated, tapped from the same decode), the token and the target's
greedy prediction argmax(logits_t) (the same decode returns both). Resumable.

The text is either a corpus, in windows of `window` tokens (one fresh KV cache each), or,
with `answers`, the target's own greedy answers to prompts (one prompt per line, in its
chat template): the rows the heads see at generation time (a window is the prompt's last
token and the answer), decoded `parallel` answers at a time (one llama_decode of
`parallel` rows per step, which on a CPU costs less per row).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from ..backend import Context, Model, layer_input_name
from ..config import BackendConfig
from .target import TargetInfo, read_target

_STATE = "state.json"
_MIN_WINDOW = 16

@dataclass(frozen=True)
class CollectConfig:
    """What text to run through the target and how.

    max_tokens: rows to collect in all; window: tokens per llama.cpp pass (one fresh
    context each, so also the longest context seen); file_tokens: most tokens taken from
    one file (variety over depth); count_tokens: corpus tokens counted (tokenized only) to
    choose the heads' reduced vocabulary; pattern: glob for files under a corpus
    directory; seed: the order in which files (or prompts) are taken; layers: store the
    inputs of these target layers (concatenated) instead of the final hidden state.
    answers: the corpus holds prompts, one per line, and the rows are the target's greedy
    answers (at most answer_tokens each, after the prompt's last token; prompt and answer
    fit in `window`), decoded `parallel` at a time; with `layers` a window also holds the
    prompt's earlier rows, unlabelled (pred -1): the context an EAGLE draft attends to.
    """

    max_tokens: int = 50_000
    window: int = 512
    file_tokens: int = 2048
    count_tokens: int = 500_000
    pattern: str = "*"
    seed: int = 0
    n_threads: int | None = None
    n_gpu_layers: int = -1
    answers: bool = False
    answer_tokens: int = 256
    parallel: int = 32
    layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.window, int) and 16 <= self.window <= 8192):
            raise ValueError(f"window must be an integer from 16 to 8192, got {self.window!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= self.window):
            raise ValueError(f"max_tokens must be an integer >= window ({self.window}), "
                             f"got {self.max_tokens!r}")
        if not (isinstance(self.file_tokens, int) and self.file_tokens >= 16):
            raise ValueError(f"file_tokens must be an integer >= 16, got {self.file_tokens!r}")
        if self.answers and not (isinstance(self.answer_tokens, int)
                                 and 2 <= self.answer_tokens < self.window):
            raise ValueError(f"answer_tokens must be an integer from 2 to window - 1 "
                             f"({self.window - 1}), got {self.answer_tokens!r}")
        if not (isinstance(self.parallel, int) and 1 <= self.parallel <= 256):
            raise ValueError(f"parallel must be an integer from 1 to 256, got {self.parallel!r}")


@dataclass(frozen=True)
class HiddenStates:
    """Collected rows, memory-mapped from a work directory.

    hidden (N, H) float16 (N, len(layers) * H with layers); tokens (N,) corpus tokens;
    preds (N,) target argmax at each row (-1: a prompt row kept only as context);
    windows (W, 3): start row, length, file index of each window; counts (n_vocab,)
    token counts of corpus files that were tokenized but not collected.
    """

    path: Path
    hidden: np.ndarray
    tokens: np.ndarray
    preds: np.ndarray
    windows: np.ndarray
    target: TargetInfo
    seconds: float  # time spent collecting (all sessions)
    counts: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        return int(self.windows[:, 1].sum())

    def held_out(self, share: float) -> np.ndarray:
        """(W,) bool: the windows kept for evaluation, those of the last `share` of the
        files (the last window when all come from one file)."""
        files = np.unique(self.windows[:, 2])
        if len(files) == 1:
            return np.arange(len(self.windows)) == len(self.windows) - 1
        held = files[-max(1, int(round(len(files) * share))):]
        return np.isin(self.windows[:, 2], held)

    @classmethod
    def open(cls, work_dir: str | os.PathLike, target: TargetInfo) -> HiddenStates:
        work = Path(work_dir)
        state = json.loads((work / _STATE).read_text())
        if state["fingerprint"] != dataclasses.asdict(target.fingerprint):
            raise ValueError(f"{work} holds hidden states of another target "
                             f"({state['fingerprint']['architecture']}); use another work dir")
        if state["windows_done"] < state["n_windows"]:
            raise ValueError(f"collection in {work} is not finished; run collect again")
        counts = np.load(work / "counts.npy") if (work / "counts.npy").exists() else None
        windows = np.load(work / "windows.npy")
        n = int(windows[:, 1].sum())  # rows lie packed from 0; the files may hold spare rows
        return cls(work, np.load(work / "hidden.npy", mmap_mode="r")[:n],
                   np.load(work / "tokens.npy")[:n], np.load(work / "preds.npy")[:n],
                   windows, target, state["seconds"], counts)


def corpus_files(corpus: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """The files of `corpus` (a file, or a directory searched recursively for `pattern`)."""
    root = Path(corpus)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"corpus not found: {root}")
    files = sorted(p for p in root.rglob(pattern) if p.is_file())
    if not files:
        raise ValueError(f"no files matching {pattern!r} under {root}")
    return files


def _read_text(path: Path) -> str | None:
    """The file's text, or None for binary or non-UTF-8 files."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def plan_windows(model: Model, corpus: str | os.PathLike, cfg: CollectConfig
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize files (in a seeded random order) until max_tokens: returns the tokens
    (N,) int32, windows (W, 3) [start, length, file index], and token counts (n_vocab,)
    of further files, up to count_tokens, which are not run through the target (they
    help choose the reduced vocabulary: tokenizing is cheap, running the target is not;
    the collected files are counted at training time, without the held-out ones)."""
    files = corpus_files(corpus, cfg.pattern)
    random.Random(cfg.seed).shuffle(files)
    tokens: list[np.ndarray] = []
    windows: list[tuple[int, int, int]] = []
    counts = np.zeros(model.n_vocab, dtype=np.int64)
    n = n_counted = 0
    for i, f in enumerate(files):
        full = cfg.max_tokens - n < _MIN_WINDOW
        if full and n_counted >= cfg.count_tokens:
            break
        text = _read_text(f)
        if not text or not text.strip():
            continue
        ids = model.tokenize(text, add_special=True, parse_special=False)[:cfg.file_tokens]
        if full:
            counts += np.bincount(ids, minlength=model.n_vocab)
            n_counted += len(ids)
            continue
        ids = ids[:cfg.max_tokens - n]
        for s in range(0, len(ids), cfg.window):
            w = ids[s:s + cfg.window]
            if len(w) < _MIN_WINDOW:  # too short to teach anything 2+ tokens ahead
                break
            windows.append((n, len(w), i))
            tokens.append(np.asarray(w, dtype=np.int32))
            n += len(w)
    if not windows:
        raise ValueError(f"no text found in {corpus}")
    return np.concatenate(tokens), np.asarray(windows, dtype=np.int64), counts


def read_prompts(corpus: str | os.PathLike, pattern: str = "*") -> list[str]:
    """The prompts of `corpus`: every non-empty line of its text files."""
    prompts = []
    for f in corpus_files(corpus, pattern):
        text = _read_text(f)
        prompts += [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts found in {corpus}")
    return prompts


def plan_prompts(model: Model, corpus: str | os.PathLike, cfg: CollectConfig) -> list[list[int]]:
    """Prompts (in the target's chat template, tokenized, in a seeded random order) whose
    rows, with full answers, reach max_tokens; prompts too long for the window are skipped."""
    rows = 1 + cfg.answer_tokens  # the prompt's last row predicts the answer's first token
    prompts = read_prompts(corpus, cfg.pattern)
    random.Random(cfg.seed).shuffle(prompts)
    planned, n = [], 0
    for text in prompts:
        if n >= cfg.max_tokens:
            break
        ids = model.tokenize_chat([{"role": "user", "content": text}])
        if len(ids) + cfg.answer_tokens <= cfg.window:
            planned.append(ids)
            n += rows
    if not planned:
        raise ValueError(f"no prompt in {corpus} fits a window of {cfg.window} tokens with "
                         f"{cfg.answer_tokens} answer tokens; raise --window")
    return planned


def collect(target_path: str | os.PathLike, corpus: str | os.PathLike,
            work_dir: str | os.PathLike, cfg: CollectConfig = CollectConfig(), *,
            progress: bool = True) -> HiddenStates:
    """Run `corpus` (or, with cfg.answers, the target's answers to its prompts) through the
    target and store hidden states in `work_dir` (resumable: a finished work dir is reused,
    an interrupted one continues where it stopped)."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    target = read_target(target_path)
    state_file = work / _STATE
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    # what the rows depend on (threads, offloading and parallel answers do not change them)
    data_key = dict(corpus=str(Path(corpus).resolve()), max_tokens=cfg.max_tokens,
                    window=cfg.window, file_tokens=cfg.file_tokens, pattern=cfg.pattern,
                    seed=cfg.seed, count_tokens=cfg.count_tokens)
    if cfg.answers:
        data_key.update(answers=True, answer_tokens=cfg.answer_tokens)
    if cfg.layers:
        data_key.update(layers=list(cfg.layers))
    if state is not None and state["data"] != data_key:
        raise ValueError(f"{work} was collected with other settings {state['data']}; "
                         "use another work dir or the same settings")
    if state is not None and state["windows_done"] == state["n_windows"]:
        return HiddenStates.open(work, target)

    with Model(target_path, BackendConfig(n_gpu_layers=cfg.n_gpu_layers)) as model:
        prompts = plan_prompts(model, corpus, cfg) if cfg.answers else []
        if state is None:
            if cfg.answers:  # windows are added as answers finish
                capacity = len(prompts) * (1 + cfg.answer_tokens)
                if cfg.layers:
                    capacity += sum(len(p) - 1 for p in prompts)
                tokens, windows = np.zeros(capacity, np.int32), np.zeros((0, 3), np.int64)
                counts = np.zeros(model.n_vocab, dtype=np.int64)
            else:
                tokens, windows, counts = plan_windows(model, corpus, cfg)
                capacity = len(tokens)
            _save_npy(work / "counts.npy", counts)
            _save_npy(work / "tokens.npy", tokens)
            _save_npy(work / "windows.npy", windows)
            np.lib.format.open_memmap(work / "hidden.npy", "w+", np.float16,
                                      (capacity, model.n_embd * max(1, len(cfg.layers)))).flush()
            _save_npy(work / "preds.npy", np.full(capacity, -1, dtype=np.int32))
            state = dict(data=data_key, fingerprint=dataclasses.asdict(target.fingerprint),
                         n_windows=len(prompts) if cfg.answers else len(windows),
                         windows_done=0, seconds=0.0)
            _save_json(state_file, state)  # last: the files above are complete
        store = _Store(work, state)
        if cfg.answers:
            _collect_answers(model, prompts, store, cfg, progress)
        else:
            _collect_corpus(model, store, cfg, progress)
        store.close()
    return HiddenStates.open(work, target)


def save_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` whole or not at all: a temporary file, synced to disk, then renamed
    over it (a kill leaves the old file or the new one, never a part)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy(path: Path, a: np.ndarray) -> None:
    save_atomic(path, lambda f: np.save(f, a))


def _save_json(path: Path, obj: dict) -> None:
    save_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


class _Store:
    """The rows of a work dir being collected: each finished window goes to disk, then the
    state file records it (so an interrupted collection loses at most windows in flight).
    Every file is replaced atomically, the state file last: what the state counts is on disk."""

    def __init__(self, work: Path, state: dict):
        self.work, self.state = work, state
        self.tokens = np.load(work / "tokens.npy")
        self.preds = np.load(work / "preds.npy")
        self.windows = np.load(work / "windows.npy")
        if state["data"].get("answers"):  # windows are appended: drop any the state does not count
            self.windows = self.windows[:state["windows_done"]]
        self.hidden = np.load(work / "hidden.npy", mmap_mode="r+")

    def write(self, start: int, tokens: Sequence[int], preds: Sequence[int],
              hidden: np.ndarray, window: tuple[int, int, int] | None, seconds: float) -> None:
        end = start + len(tokens)
        self.tokens[start:end], self.preds[start:end] = tokens, preds
        self.hidden[start:end] = hidden
        self.hidden.flush()
        _save_npy(self.work / "preds.npy", self.preds)
        if window is not None:  # a window that was not planned ahead
            self.windows = np.concatenate([self.windows, [window]])
            _save_npy(self.work / "tokens.npy", self.tokens)
            _save_npy(self.work / "windows.npy", self.windows)
        self.state["windows_done"] += 1
        self.state["seconds"] += seconds
        _save_json(self.work / _STATE, self.state)

    def close(self) -> None:
        del self.hidden


def _collect_corpus(model: Model, store: _Store, cfg: CollectConfig, progress: bool) -> None:
    windows, state = store.windows, store.state
    bcfg = BackendConfig(n_ctx=max(cfg.window, 64), n_batch=cfg.window,
                         n_gpu_layers=cfg.n_gpu_layers, n_threads=cfg.n_threads)
    with _context(model, bcfg, cfg) as ctx, tqdm(
            total=int(windows[:, 1].sum()), initial=int(windows[:state["windows_done"], 1].sum()),
            unit="tok", desc="hidden states", disable=not progress) as bar:
        for w in range(state["windows_done"], len(windows)):
            t0 = time.perf_counter()
            start, length, _ = (int(v) for v in windows[w])
            ids = store.tokens[start:start + length].tolist()
            ctx.clear()
            logits = ctx.eval(ids, logits="all")
            store.write(start, ids, logits.argmax(axis=1), _rows(ctx, cfg, length), None,
                        time.perf_counter() - t0)
            bar.update(length)


def _context(model: Model, bcfg: BackendConfig, cfg: CollectConfig, **kw) -> Context:
    """A context that returns what is stored: the final hidden states, or the tapped inputs
    of cfg.layers."""
    if cfg.layers:
        return Context(model, bcfg, taps=[layer_input_name(i) for i in cfg.layers], **kw)
    return Context(model, bcfg, embeddings=True, **kw)


def _rows(ctx: Context, cfg: CollectConfig, n: int) -> np.ndarray:
    """What is stored of the last decode's first n rows (n, width)."""
    return ctx.tapped(n) if cfg.layers else ctx.hidden(n)


@dataclass
class _Answer:
    """One prompt being answered in a sequence of the batch: its rows from the prompt's
    last token on (with layers: from its first)."""

    index: int
    start: int  # position of the first row: the prompt's last token, or 0 with its context
    context: int  # unlabelled prompt rows before the prompt's last token
    tokens: list[int]
    preds: list[int]
    hidden: list[np.ndarray]


def _collect_answers(model: Model, prompts: list[list[int]], store: _Store,
                     cfg: CollectConfig, progress: bool) -> None:
    """Greedy answers, `parallel` sequences at a time: each step decodes one row per
    sequence; a finished sequence's window is written and the next prompt takes its place."""
    done = set(store.windows[:, 2].tolist())
    todo = iter([i for i in range(len(prompts)) if i not in done])
    n_rows = int(store.windows[:, 1].sum())
    n_seq = min(cfg.parallel, len(prompts) - len(done))
    bcfg = BackendConfig(n_ctx=n_seq * cfg.window, n_batch=max(cfg.window, n_seq),
                         n_gpu_layers=cfg.n_gpu_layers, n_threads=cfg.n_threads)
    slots: list[_Answer | None] = [None] * n_seq
    rows = 1 + cfg.answer_tokens  # per window, if the answer does not end early
    with _context(model, bcfg, cfg, n_seq_max=n_seq, shared_cache=False) as ctx, tqdm(
            total=rows * len(prompts), initial=rows * len(done), unit="tok", desc="answers",
            disable=not progress) as bar:
        t0 = time.perf_counter()
        while True:
            for s, slot in enumerate(slots):
                if slot is None and (i := next(todo, None)) is not None:
                    ids = prompts[i]
                    ctx.seq_rm(s)
                    want = np.zeros(len(ids), np.int8)
                    want[-1] = 1
                    logits = ctx.decode(ids, range(len(ids)), [[s]] * len(ids), want)
                    first = 0 if cfg.layers else len(ids) - 1
                    context = len(ids) - 1 - first
                    slots[s] = _Answer(i, first, context, list(ids[first:]),
                                       [-1] * context + [int(logits[0].argmax())],
                                       list(_rows(ctx, cfg, len(ids))[first:].astype(np.float16)))
            live = [s for s, slot in enumerate(slots) if slot is not None]
            if not live:
                break
            answers = [slots[s] for s in live]
            logits = ctx.decode([a.preds[-1] for a in answers], [a.start + len(a.tokens) for a in answers],
                                [[s] for s in live], np.ones(len(live), np.int8))
            preds, hidden = logits.argmax(axis=1), _rows(ctx, cfg, len(live)).astype(np.float16)
            for j, (s, a) in enumerate(zip(live, answers)):
                a.tokens.append(a.preds[-1])
                a.preds.append(int(preds[j]))
                a.hidden.append(hidden[j])
                if int(preds[j]) in model.eog or len(a.tokens) - a.context == rows:
                    n = len(a.tokens)
                    store.write(n_rows, a.tokens, a.preds, np.stack(a.hidden), (n_rows, n, a.index),
                                time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    n_rows += n
                    bar.update(rows)
                    slots[s] = None


