"""Training Medusa heads for any GGUF target, on CPU, in numpy.

Two stages, each resumable:

1. `collect` runs text through the target with llama.cpp and stores, per row, the final
   hidden state x_t (float16), the token and the target's greedy prediction
   argmax(logits_t) (the same decode returns both). The text is either a corpus, in
   windows of `window` tokens (one fresh KV cache each), or, with `answers`, the target's
   own greedy answers to prompts (one prompt per line, in its chat template): the rows
   the heads see at generation time (a window is the prompt's last token and the answer),
   decoded `parallel` answers at a time (one llama_decode of `parallel` rows per step,
   which on a CPU costs less per row).
2. `train` fits the heads with Adam on cross-entropy over a reduced vocabulary (the most
   frequent label tokens of the training rows), residual layers initialised to zero so
   that each tied head starts as the target's own next-token predictor.

Labels for head h at row t (it predicts token t+h+2, see heads.py):
  "distill": pred[t+h+1], the target's own greedy prediction of that token given the
             corpus up to t+h+1 (self-distillation; exactly the target's greedy
             continuation wherever the corpus follows it);
  "corpus":  the corpus token t+h+2.
Rows whose label lies outside the window are not used. Accuracy on held-out files is
reported over all rows ("top1", "top5") and over rows where the corpus follows the target's
greedy chain up to the label ("chain_top1": the rate at which greedy speculation would
accept the head's first guess, given the earlier heads were right).
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

from .backend import Context, Model
from .config import BackendConfig
from .heads import TOP_K, MedusaHeads, TargetInfo, read_target, save_heads, sigmoid, silu
from .tree import grown_choices

LABELS = ("distill", "corpus")
_STATE = "state.json"
_CHECKPOINT = "checkpoint.npz"
_MIN_WINDOW = 16


# ---------------------------------------------------------------------------------------
# Stage 1: hidden states
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectConfig:
    """What text to run through the target and how.

    max_tokens: rows to collect in all; window: tokens per llama.cpp pass (one fresh
    context each, so also the longest context seen); file_tokens: most tokens taken from
    one file (variety over depth); count_tokens: corpus tokens counted (tokenized only) to
    choose the heads' reduced vocabulary; pattern: glob for files under a corpus
    directory; seed: the order in which files (or prompts) are taken.
    answers: the corpus holds prompts, one per line, and the rows are the target's greedy
    answers (at most answer_tokens each, after the prompt's last token; prompt and answer
    fit in `window`), decoded `parallel` at a time.
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

    hidden (N, H) float16; tokens (N,) corpus tokens; preds (N,) target argmax at each row;
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
                tokens, windows = np.zeros(capacity, np.int32), np.zeros((0, 3), np.int64)
                counts = np.zeros(model.n_vocab, dtype=np.int64)
            else:
                tokens, windows, counts = plan_windows(model, corpus, cfg)
                capacity = len(tokens)
            _save_npy(work / "counts.npy", counts)
            _save_npy(work / "tokens.npy", tokens)
            _save_npy(work / "windows.npy", windows)
            np.lib.format.open_memmap(work / "hidden.npy", "w+", np.float16,
                                      (capacity, model.n_embd)).flush()
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


def _save_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` whole or not at all: a temporary file, synced to disk, then renamed
    over it (a kill leaves the old file or the new one, never a part)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy(path: Path, a: np.ndarray) -> None:
    _save_atomic(path, lambda f: np.save(f, a))


def _save_json(path: Path, obj: dict) -> None:
    _save_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


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
    with Context(model, bcfg, embeddings=True) as ctx, tqdm(
            total=int(windows[:, 1].sum()), initial=int(windows[:state["windows_done"], 1].sum()),
            unit="tok", desc="hidden states", disable=not progress) as bar:
        for w in range(state["windows_done"], len(windows)):
            t0 = time.perf_counter()
            start, length, _ = (int(v) for v in windows[w])
            ids = store.tokens[start:start + length].tolist()
            ctx.clear()
            logits = ctx.eval(ids, logits="all")
            store.write(start, ids, logits.argmax(axis=1), ctx.hidden(length), None,
                        time.perf_counter() - t0)
            bar.update(length)


@dataclass
class _Answer:
    """One prompt being answered in a sequence of the batch: its rows from the prompt's
    last token on."""

    index: int
    start: int  # position of the prompt's last token, the first row
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
    with Context(model, bcfg, n_seq_max=n_seq, embeddings=True, shared_cache=False) as ctx, tqdm(
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
                    slots[s] = _Answer(i, len(ids) - 1, [ids[-1]], [int(logits[0].argmax())],
                                       [ctx.hidden(len(ids))[-1].astype(np.float16)])
            live = [s for s, slot in enumerate(slots) if slot is not None]
            if not live:
                break
            answers = [slots[s] for s in live]
            logits = ctx.decode([a.preds[-1] for a in answers], [a.start + len(a.tokens) for a in answers],
                                [[s] for s in live], np.ones(len(live), np.int8))
            preds, hidden = logits.argmax(axis=1), ctx.hidden(len(live)).astype(np.float16)
            for j, (s, a) in enumerate(zip(live, answers)):
                a.tokens.append(a.preds[-1])
                a.preds.append(int(preds[j]))
                a.hidden.append(hidden[j])
                if int(preds[j]) in model.eog or len(a.tokens) == rows:
                    n = len(a.tokens)
                    store.write(n_rows, a.tokens, a.preds, np.stack(a.hidden), (n_rows, n, a.index),
                                time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    n_rows += n
                    bar.update(rows)
                    slots[s] = None


# ---------------------------------------------------------------------------------------
# Stage 2: the heads
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """How heads are trained.

    vocab_size: rows of the heads' output (the most frequent label tokens; 0 keeps the
    target's whole vocabulary); tied: output = the target's output rows, frozen (else a
    trained copy per head); labels: "distill" or "corpus" (module docstring); heldout:
    fraction of the files kept for evaluation; lr: Adam step, decayed to 10% over the
    run (cosine); weight_decay: decoupled (AdamW) decay of the residual weights.
    """

    n_heads: int = 4
    n_layers: int = 1
    vocab_size: int = 4096
    tied: bool = True
    labels: str = "distill"
    epochs: int = 4
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    heldout: float = 0.1
    seed: int = 0
    dtype: str = "f16"
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        for name in ("n_heads", "n_layers", "epochs", "batch_size", "checkpoint_every"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.vocab_size, int) and self.vocab_size >= 0):
            raise ValueError(f"vocab_size must be an integer >= 0 (0: all), got {self.vocab_size!r}")
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {', '.join(LABELS)}, got {self.labels!r}")
        if not 0 < self.heldout < 1:
            raise ValueError(f"heldout must be in (0, 1), got {self.heldout!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")


@dataclass(frozen=True)
class HeadAccuracy:
    """Held-out accuracy of one head (its label is token t+head+2)."""

    head: int
    top1: float
    top5: float
    chain_top1: float  # on rows where the corpus follows the target's greedy chain
    loss: float        # mean cross-entropy over rows whose label is in the vocabulary
    n: int


@dataclass(frozen=True)
class TrainReport:
    path: Path
    n_train: int
    n_heldout: int
    vocab_coverage: float  # share of held-out labels inside the reduced vocabulary
    before: list[HeadAccuracy]
    after: list[HeadAccuracy]
    trees: dict[int, float]  # tree nodes -> mean accepted drafts per round (tree_acceptance)
    steps: int
    seconds: float


@dataclass
class _Split:
    rows: np.ndarray    # (n,) row indices into the hidden states
    labels: np.ndarray  # (n, n_heads) target ids to learn, -1 where outside the window
    greedy: np.ndarray  # (n, n_heads) the target's greedy continuation where the corpus
                        # follows it from the row up to the label, else -1


def _labels(data: HiddenStates, n_heads: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row and head: the label (target ids, -1 past the window end) and the target's
    greedy continuation where the corpus follows the greedy chain up to it (else -1)."""
    n = data.n_rows
    labels = np.full((n, n_heads), -1, dtype=np.int64)
    greedy = np.full((n, n_heads), -1, dtype=np.int64)
    match = np.zeros(n, dtype=bool)  # corpus token t+1 is the target's argmax at t
    match[:-1] = data.tokens[1:] == data.preds[:-1]
    source = data.preds if kind == "distill" else data.tokens
    for start, length, _ in data.windows:
        end = start + length
        t = np.arange(start, end)
        on_chain = np.ones(length, dtype=bool)
        for h in range(n_heads):
            src = t + h + 1 if kind == "distill" else t + h + 2
            inside = src < end
            labels[t[inside], h] = source[src[inside]]
            # greedy label pred[t+h+1] is the greedy continuation iff match[t..t+h]
            on_chain &= np.concatenate([match[start + h:end], np.zeros(h, bool)]) & (t + h + 1 < end)
            greedy[t[on_chain], h] = data.preds[t[on_chain] + h + 1]
    return labels, greedy


def _split(data: HiddenStates, cfg: TrainConfig) -> tuple[_Split, _Split]:
    """Training and held-out rows: the last `heldout` share of the files is held out."""
    labels, greedy = _labels(data, cfg.n_heads, cfg.labels)
    files = np.unique(data.windows[:, 2])
    n_held = max(1, int(round(len(files) * cfg.heldout)))
    held_files = set(files[-n_held:].tolist()) if len(files) > 1 else set()
    parts: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for i, (start, length, f) in enumerate(data.windows):
        is_held = (f in held_files) if held_files else (i == len(data.windows) - 1)
        parts[is_held].append(np.arange(start, start + length))
    if not parts[False] or not parts[True]:
        raise ValueError("need at least two windows to keep some for evaluation")
    out = []
    for held in (False, True):
        rows = np.concatenate(parts[held])
        rows = rows[(labels[rows] >= 0).any(axis=1)]
        out.append(_Split(rows, labels[rows], greedy[rows]))
    return out[0], out[1]


def reduced_vocab(counts: np.ndarray, size: int) -> np.ndarray | None:
    """The `size` most frequent token ids of `counts` (n_vocab,), most frequent first, so
    that every prefix is the best reduced vocabulary of its size (MedusaHeads.restrict);
    None: the whole vocabulary."""
    if size == 0 or size >= len(counts):
        return None
    return np.argsort(-counts, kind="stable")[:size].astype(np.int32)


def _to_rows(labels: np.ndarray, token_ids: np.ndarray | None, n_vocab: int) -> np.ndarray:
    """Target ids -> output rows (-1: no label, or outside the reduced vocabulary)."""
    if token_ids is None:
        return labels
    index = np.full(n_vocab, -1, dtype=np.int64)
    index[token_ids] = np.arange(len(token_ids))
    return np.where(labels >= 0, index[np.maximum(labels, 0)], -1)


class _Params:
    """Trainable arrays with AdamW moments; out is None when the output is tied."""

    def __init__(self, w: np.ndarray, b: np.ndarray, out: np.ndarray | None):
        self.arrays = {"w": w, "b": b} if out is None else {"w": w, "b": b, "out": out}
        self.m = {k: np.zeros_like(v) for k, v in self.arrays.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.arrays.items()}
        self.step = 0

    def update(self, grads: dict[str, np.ndarray], lr: float, wd: float,
               b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
        self.step += 1
        c1, c2 = 1 - b1 ** self.step, 1 - b2 ** self.step
        for k, g in grads.items():
            p, m, v = self.arrays[k], self.m[k], self.v[k]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            if wd and k == "w":
                p *= 1 - lr * wd
            p -= lr * (m / c1) / (np.sqrt(v / c2) + eps)


def _forward_backward(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray,
                      out: np.ndarray, tied: bool, grad: bool
                      ) -> tuple[float, int, dict[str, np.ndarray], np.ndarray]:
    """Cross-entropy of the heads on a batch. x (B, H); y (B, nh) output rows or -1;
    w (nh, L, H, H); b (nh, L, H); out (V, H) tied or (nh, V, H).
    Returns (summed loss, labelled count, gradients of the summed loss, logits (nh, B, V))."""
    nh, n_layers, d, _ = w.shape
    bsz = x.shape[0]
    rs, zs = [np.broadcast_to(x, (nh, bsz, d))], []                  # (nh, B, H) each
    for l in range(n_layers):
        if l == 0:  # every head reads x: one (B, H) @ (H, nh*H) product
            z = (x @ w[:, 0].reshape(nh * d, d).T).reshape(bsz, nh, d).transpose(1, 0, 2)
        else:
            z = np.matmul(rs[-1], w[:, l].transpose(0, 2, 1))
        z = z + b[:, l][:, None, :]
        zs.append(z)
        rs.append(rs[-1] + silu(z))
    r = rs[-1]
    logits = r @ out.T if tied else np.matmul(r, out.transpose(0, 2, 1))  # (nh, B, V)
    yt = y.T                                                             # (nh, B)
    valid = yt >= 0
    m = logits.max(axis=2, keepdims=True)
    e = np.exp(logits - m)
    s = e.sum(axis=2, keepdims=True)
    picked = np.take_along_axis(logits, np.maximum(yt, 0)[:, :, None], axis=2)[:, :, 0]
    nll = (np.log(s[:, :, 0]) + m[:, :, 0] - picked) * valid
    loss, count = float(nll.sum()), int(valid.sum())
    if not grad:
        return loss, count, {}, logits
    dlog = e / s                                                         # softmax
    np.put_along_axis(dlog, np.maximum(yt, 0)[:, :, None],
                      np.take_along_axis(dlog, np.maximum(yt, 0)[:, :, None], axis=2) - 1, axis=2)
    dlog *= valid[:, :, None]                                            # d(sum nll)/dlogits
    grads: dict[str, np.ndarray] = {}
    if tied:
        dr = dlog @ out                                                  # (nh, B, H)
    else:
        dr = np.matmul(dlog, out)
        grads["out"] = np.matmul(dlog.transpose(0, 2, 1), r)             # (nh, V, H)
    gw, gb = np.zeros_like(w), np.zeros_like(b)
    for l in reversed(range(n_layers)):
        z = zs[l]
        sig = sigmoid(z)
        dz = dr * sig * (1 + z * (1 - sig))                              # SiLU'(z)
        gw[:, l] = np.matmul(dz.transpose(0, 2, 1), rs[l])               # (nh, H, H)
        gb[:, l] = dz.sum(axis=1)
        if l:
            dr = dr + np.matmul(dz, w[:, l])
    grads["w"], grads["b"] = gw, gb
    return loss, count, grads, logits


def evaluate(heads: MedusaHeads, data: HiddenStates, split: _Split,
             batch_size: int = 512) -> list[HeadAccuracy]:
    """Per-head top-1 / top-5 accuracy and loss of `heads` on the rows of `split`."""
    nh, n_vocab = heads.n_heads, data.target.n_vocab
    y = _to_rows(split.labels, heads.token_ids, n_vocab)
    g = _to_rows(split.greedy, heads.token_ids, n_vocab)
    hit1, hit5, chain_hit = np.zeros(nh), np.zeros(nh), np.zeros(nh)
    loss, n_loss = np.zeros(nh), np.zeros(nh)
    for s in range(0, len(split.rows), batch_size):
        x = np.asarray(data.hidden[split.rows[s:s + batch_size]], dtype=np.float32)
        yb, gb = y[s:s + batch_size], g[s:s + batch_size]
        z = heads.logits(x)                                              # (B, nh, V)
        k = min(5, z.shape[2])
        top5 = np.argpartition(z, -k, axis=2)[:, :, -k:]
        top1 = z.argmax(axis=2)
        hit1 += ((top1 == yb) & (yb >= 0)).sum(axis=0)
        hit5 += ((top5 == yb[:, :, None]).any(axis=2) & (yb >= 0)).sum(axis=0)
        chain_hit += ((top1 == gb) & (gb >= 0)).sum(axis=0)
        m = z.max(axis=2, keepdims=True)
        lse = np.log(np.exp(z - m).sum(axis=2)) + m[:, :, 0]
        picked = np.take_along_axis(z, np.maximum(yb, 0)[:, :, None], axis=2)[:, :, 0]
        loss += ((lse - picked) * (yb >= 0)).sum(axis=0)
        n_loss += (yb >= 0).sum(axis=0)
    n = (split.labels >= 0).sum(axis=0)          # labels outside the vocabulary are misses
    n_chain = (split.greedy >= 0).sum(axis=0)
    return [HeadAccuracy(h, float(hit1[h] / max(n[h], 1)), float(hit5[h] / max(n[h], 1)),
                         float(chain_hit[h] / max(n_chain[h], 1)),
                         float(loss[h] / max(n_loss[h], 1)), int(n[h])) for h in range(nh)]


TREE_SIZES = (1, 4, 8, 16, 32)


def tree_acceptance(heads: MedusaHeads, data: HiddenStates, split: _Split,
                    sizes: Sequence[int] = TREE_SIZES, top_k: int = TOP_K,
                    batch_size: int = 512) -> tuple[np.ndarray, dict[int, float]]:
    """The per-(head, rank) acceptance (n_heads, top_k) measured on the rows of `split`
    whose continuation follows the target's greedy chain (there the tree's root is the
    target's own next token, as when generating), and, for a tree of each size grown from
    it, the mean draft tokens greedy verification would accept per round on those rows."""
    nh, k = heads.n_heads, min(top_k, heads.vocab_size)
    rows = np.flatnonzero(split.greedy[:, 0] >= 0)
    ranks = np.full((len(rows), nh), k, dtype=np.int64)  # k: not among the top k
    for s in range(0, len(rows), batch_size):
        b = rows[s:s + batch_size]
        z = heads.logits(np.asarray(data.hidden[split.rows[b]], dtype=np.float32))  # (B, nh, V)
        top = np.argsort(-z, axis=2)[:, :, :k]
        ids = top if heads.token_ids is None else heads.token_ids[top]
        hit = ids == split.greedy[b][:, :, None]                                    # (B, nh, k)
        ranks[s:s + len(b)] = np.where(hit.any(axis=2), hit.argmax(axis=2), k)
    acceptance = np.zeros((nh, k))
    reached = np.ones(len(rows), dtype=bool)  # every earlier head's label is in its top k
    for d in range(nh):
        if reached.any():
            acceptance[d] = np.bincount(ranks[reached, d], minlength=k + 1)[:k] / reached.sum()
        reached &= ranks[:, d] < k
    out = {}
    for n in sizes:
        tree = set(grown_choices(acceptance, n)[0])
        accepted = np.zeros(len(rows))
        for d in range(1, nh + 1):
            accepted += [tuple(r) in tree for r in ranks[:, :d].tolist()]
        out[n] = float(accepted.mean()) if len(rows) else 0.0
    return acceptance, out


def train(data: HiddenStates, out_path: str | os.PathLike, cfg: TrainConfig = TrainConfig(),
          *, checkpoint: str | os.PathLike | None = None, progress: bool = True,
          log: Callable[[str], None] | None = None) -> TrainReport:
    """Train heads on collected hidden states and write the head GGUF to `out_path`.
    With `checkpoint` (a file), training state is saved there every
    cfg.checkpoint_every steps and a run with the same settings resumes from it."""
    t_start = time.perf_counter()
    target = data.target
    train_split, held = _split(data, cfg)
    # the vocabulary: frequent tokens of the training rows, their labels and uncollected files
    n_vocab = target.n_vocab
    counts = (np.bincount(data.tokens[train_split.rows], minlength=n_vocab)
              + np.bincount(train_split.labels[train_split.labels >= 0], minlength=n_vocab))
    if data.counts is not None:
        counts = counts + data.counts
    token_ids = reduced_vocab(counts, cfg.vocab_size)
    out_rows = target.output_rows(token_ids)                             # (V, H) float32
    d, nh = out_rows.shape[1], cfg.n_heads
    y_train = _to_rows(train_split.labels, token_ids, target.n_vocab)
    y_held = _to_rows(held.labels, token_ids, target.n_vocab)
    coverage = float((y_held >= 0).sum() / max((held.labels >= 0).sum(), 1))

    params = _Params(np.zeros((nh, cfg.n_layers, d, d), np.float32),
                     np.zeros((nh, cfg.n_layers, d), np.float32),
                     None if cfg.tied else np.repeat(out_rows[None], nh, axis=0))

    def heads_now() -> MedusaHeads:
        out = out_rows if cfg.tied else params.arrays["out"]
        return MedusaHeads(params.arrays["w"], params.arrays["b"], out, token_ids=token_ids,
                           tied=cfg.tied, target=target.fingerprint)

    before = evaluate(heads_now(), data, held)
    steps_per_epoch = -(-len(train_split.rows) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    learnt = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("dtype", "checkpoint_every")}
    key = json.dumps(dict(config=learnt, n_rows=data.n_rows,
                          fingerprint=dataclasses.asdict(target.fingerprint)), sort_keys=True)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        with np.load(ckpt) as f:
            if str(f["key"]) == key:
                for k in params.arrays:
                    params.arrays[k][...] = f[k]
                    params.m[k][...] = f["m_" + k]
                    params.v[k][...] = f["v_" + k]
                params.step = int(f["step"])
            elif log:
                log(f"ignoring checkpoint {ckpt}: it was made with other settings or data")

    def save_checkpoint() -> None:
        arrays = {k: v for k, v in params.arrays.items()}
        arrays.update({"m_" + k: v for k, v in params.m.items()})
        arrays.update({"v_" + k: v for k, v in params.v.items()})
        _save_atomic(ckpt, lambda f: np.savez(f, key=np.array(key), step=np.array(params.step), **arrays))

    out_frozen = out_rows if cfg.tied else None
    with tqdm(total=total, initial=params.step, unit="step", desc="training heads",
              disable=not progress) as bar:
        while params.step < total:
            epoch, i = divmod(params.step, steps_per_epoch)
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_split.rows))
            idx = np.sort(order[i * cfg.batch_size:(i + 1) * cfg.batch_size])
            x = np.asarray(data.hidden[train_split.rows[idx]], dtype=np.float32)
            out = out_frozen if cfg.tied else params.arrays["out"]
            loss, count, grads, _ = _forward_backward(x, y_train[idx], params.arrays["w"],
                                                      params.arrays["b"], out, cfg.tied, True)
            scale = 1.0 / max(count, 1)
            lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * params.step / total)))
            params.update({k: g * scale for k, g in grads.items()}, lr, cfg.weight_decay)
            bar.set_postfix(loss=f"{loss * scale:.3f}", refresh=False)
            bar.update(1)
            if ckpt is not None and (params.step % cfg.checkpoint_every == 0 or params.step == total):
                save_checkpoint()

    heads = heads_now()
    after = evaluate(heads, data, held)
    heads.acceptance, trees = tree_acceptance(heads, data, held)  # the drafter's first trees
    path = save_heads(out_path, heads, dtype=cfg.dtype,
                      name=f"medusa-{nh}x{cfg.n_layers}-{target.fingerprint.architecture}")
    return TrainReport(Path(path), len(train_split.rows), len(held.rows), coverage, before, after,
                       trees, total, time.perf_counter() - t_start)


def train_medusa(target_path: str | os.PathLike, corpus: str | os.PathLike,
                 out_path: str | os.PathLike, work_dir: str | os.PathLike,
                 collect_cfg: CollectConfig = CollectConfig(),
                 train_cfg: TrainConfig = TrainConfig(), *, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> TrainReport:
    """Collect hidden states of `corpus` (cached in `work_dir`), train heads, write the GGUF."""
    data = collect(target_path, corpus, work_dir, collect_cfg, progress=progress)
    return train(data, out_path, train_cfg, checkpoint=Path(work_dir) / _CHECKPOINT,
                 progress=progress, log=log)


def format_report(report: TrainReport) -> str:
    """The report as a few lines of text."""
    lines = [f"wrote {report.path}: {report.steps} steps in {report.seconds:.0f} s, "
             f"{report.n_train:,} training rows, {report.n_heldout:,} held-out rows, "
             f"vocabulary covers {report.vocab_coverage:.1%} of held-out labels",
             "head  top-1 (start)  top-5 (start)  chain top-1  loss (start)"]
    for a, b in zip(report.before, report.after):
        lines.append(f"{b.head:>4}  {b.top1:6.1%} ({a.top1:5.1%})  {b.top5:6.1%} ({a.top5:5.1%})"
                     f"  {b.chain_top1:10.1%}  {b.loss:5.2f} ({a.loss:5.2f})")
    lines.append("greedy trees on held-out rows: " + ", ".join(
        f"{n} nodes -> {1 + a:.2f} tokens/round" for n, a in report.trees.items()))
    return "\n".join(lines)
