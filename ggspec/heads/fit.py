"""Stage 2 of head training: fit Medusa heads with Adam on cross-entropy over a reduced
vocabulary (the most frequent label tokens of the training rows), residual layers
initialised to zero so that each tied head starts as the target's own next-token
predictor.

Labels for head h at row t (it predicts token t+h+2, see medusa.py):
  "distill": pred[t+h+1], the target's own greedy prediction of that token given the
             corpus up to t+h+1 (self-distillation; exactly the target's greedy
             continuation wherever the corpus follows it);
  "corpus":  the corpus token t+h+2.
Rows whose label lies outside the window are not used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .collect import CollectConfig, HiddenStates, save_atomic, collect
from .medusa import MedusaHeads, save_heads
from .nn import cosine_lr, residual_stack, residual_stack_backward, softmax_xent
from .report import TrainReport, Split, to_rows, evaluate, tree_acceptance

LABELS = ("distill", "corpus")
_CHECKPOINT = "checkpoint.npz"


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


def _split(data: HiddenStates, cfg: TrainConfig) -> tuple[Split, Split]:
    """Training and held-out rows: the last `heldout` share of the files is held out."""
    labels, greedy = _labels(data, cfg.n_heads, cfg.labels)
    parts: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for (start, length, _), is_held in zip(data.windows, data.held_out(cfg.heldout)):
        parts[bool(is_held)].append(np.arange(start, start + length))
    if not parts[False] or not parts[True]:
        raise ValueError("need at least two windows to keep some for evaluation")
    out = []
    for held in (False, True):
        rows = np.concatenate(parts[held])
        rows = rows[(labels[rows] >= 0).any(axis=1)]
        out.append(Split(rows, labels[rows], greedy[rows]))
    return out[0], out[1]


def reduced_vocab(counts: np.ndarray, size: int) -> np.ndarray | None:
    """The `size` most frequent token ids of `counts` (n_vocab,), most frequent first, so
    that every prefix is the best reduced vocabulary of its size (MedusaHeads.restrict);
    None: the whole vocabulary."""
    if size == 0 or size >= len(counts):
        return None
    return np.argsort(-counts, kind="stable")[:size].astype(np.int32)


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
    rs, zs = residual_stack(x, w, b)                                     # (nh, B, H) each
    r = rs[-1]
    logits = r @ out.T if tied else np.matmul(r, out.transpose(0, 2, 1))  # (nh, B, V)
    valid = y.T >= 0                                                     # (nh, B)
    nll, dlog = softmax_xent(logits, y.T, grad)                          # d(sum nll)/dlogits
    loss, count = float(nll.sum()), int(valid.sum())
    if not grad:
        return loss, count, {}, logits
    grads: dict[str, np.ndarray] = {}
    if tied:
        dr = dlog @ out                                                  # (nh, B, H)
    else:
        dr = np.matmul(dlog, out)
        grads["out"] = np.matmul(dlog.transpose(0, 2, 1), r)             # (nh, V, H)
    grads["w"], grads["b"] = residual_stack_backward(dr, w, rs, zs)
    return loss, count, grads, logits


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
    y_train = to_rows(train_split.labels, token_ids, target.n_vocab)
    y_held = to_rows(held.labels, token_ids, target.n_vocab)
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
        save_atomic(ckpt, lambda f: np.savez(f, key=np.array(key), step=np.array(params.step), **arrays))

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
            lr = cosine_lr(cfg.lr, params.step, total)
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


