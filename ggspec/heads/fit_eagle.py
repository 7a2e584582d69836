"""Stage 2 of EAGLE-3 training: fit the draft layer in torch (CPU) on the tapped features.

Data (collect.py with `layers`): per row P, the inputs f_P of the three target layers, the
token and the target's greedy prediction pred_P. The draft at row P takes token P+1 and
g = fc(f_P) and learns pred_{P+1} (self-distillation: on the target's own answers these
are its greedy tokens; on a corpus, its argmax predictions over the text).

Training-time test (EAGLE-3, SpecForge's TTT), unrolled over K steps on chunks of
`seq_len` consecutive rows: step 1 is the row above at position P; step k > 1 at row P
takes token P+k, the draft's own pre-norm output of step k-1 at row P as g, position
P+k-1, and learns pred_{P+k}. Its query sees the step-1 keys of rows <= P (causal) and the
keys of steps 2..k of row P itself: exactly what a node at depth k-1 of a draft tree sees
at inference (drafters/eagle.py). Tokens are the target's (teacher forcing); the loss is
sum_k 0.8^(k-1) * cross-entropy_k over the reduced draft vocabulary (labels outside it
are skipped). The forward is heads/eagle.py's numpy forward, written in torch.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..gguffile import read_header
from .collect import CollectConfig, HiddenStates, collect, save_atomic
from .eagle import EagleConfig, EagleWeights, save_eagle
from .fit import reduced_vocab
from .nn import cosine_lr
from .report import (CHAIN_DEPTHS, EagleReport, StepAccuracy, chain_tokens, to_rows)
from .target import TargetInfo, read_target

STEP_DECAY = 0.8  # loss weight of step k: STEP_DECAY ** (k - 1)
_CHECKPOINT = "eagle-checkpoint.pt"


@dataclass(frozen=True)
class EagleTrainConfig:
    """How an EAGLE-3 draft is trained.

    layers: the target layers whose inputs it reads (None: 2, n/2, n-3 as EAGLE-3);
    draft_vocab: output rows (the most frequent labels; 0: the whole vocabulary); n_ff:
    feed-forward size; n_head / n_head_kv: attention heads (None: the target's);
    ttt_steps: training-time test steps; steps: optimizer steps (0: `epochs` passes);
    batch_size: chunks of seq_len rows per step; heldout: share of the files kept for
    evaluation; eval_steps: draft steps measured on held-out rows (at least ttt_steps).
    """

    layers: tuple[int, int, int] | None = None
    draft_vocab: int = 8192
    n_ff: int = 2048
    n_head: int | None = None
    n_head_kv: int | None = None
    ttt_steps: int = 3
    epochs: int = 4
    steps: int = 0
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 5e-4
    heldout: float = 0.1
    seed: int = 0
    dtype: str = "q8_0"
    checkpoint_every: int = 50
    eval_steps: int = max(CHAIN_DEPTHS)

    def __post_init__(self) -> None:
        for name in ("n_ff", "ttt_steps", "epochs", "batch_size", "seq_len", "checkpoint_every",
                     "eval_steps"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise ValueError(f"steps must be an integer >= 0 (0: by epochs), got {self.steps!r}")
        if not (isinstance(self.draft_vocab, int) and self.draft_vocab >= 0):
            raise ValueError(f"draft_vocab must be an integer >= 0 (0: all), got {self.draft_vocab!r}")
        if self.layers is not None and len(self.layers) != 3:
            raise ValueError(f"EAGLE-3 reads exactly 3 target layers, got {self.layers}")
        if not 0 < self.heldout < 1:
            raise ValueError(f"heldout must be in (0, 1), got {self.heldout!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


def default_layers(n_layer: int) -> tuple[int, int, int]:
    """EAGLE-3's taps: the inputs of layers 2, n/2 and n-3 (clamped to the layers there are)."""
    return tuple(min(max(i, 0), n_layer - 1) for i in (2, n_layer // 2, n_layer - 3))


def draft_config(target: TargetInfo, cfg: EagleTrainConfig) -> EagleConfig:
    """The draft's shape: the target's hidden size, attention heads, RoPE and norm epsilon."""
    kv = read_header(target.path, what="target model file").kv
    arch = target.fingerprint.architecture
    layers = cfg.layers or default_layers(target.n_layer)
    if min(layers) < 0 or max(layers) >= target.n_layer:
        raise ValueError(f"layers {list(layers)} outside the target's layers 0..{target.n_layer - 1}")
    n_head = cfg.n_head or int(kv.get(f"{arch}.attention.head_count", 0)) or 1
    return EagleConfig(hidden=target.fingerprint.embedding_length, n_head=n_head,
                       n_head_kv=cfg.n_head_kv or int(kv.get(f"{arch}.attention.head_count_kv", n_head)),
                       n_ff=cfg.n_ff, target_layers=tuple(int(i) for i in layers),
                       target_hidden=target.fingerprint.embedding_length,
                       rms_eps=float(kv.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
                       rope_base=float(kv.get(f"{arch}.rope.freq_base", 10000.0)),
                       context_length=int(kv.get(f"{arch}.context_length", 4096)))


def flops_per_row(cfg: EagleConfig, vocab: int, ttt_steps: int, seq_len: int) -> float:
    """Multiply-adds x 2 of one forward and backward pass (3 x the forward) over one row:
    fc once, then per step q/k/v/o, the feed-forward, the output and attention over
    about seq_len / 2 + k keys."""
    h, hd, ff = cfg.hidden, cfg.head_dim, cfg.n_ff
    per_step = (2 * h * (cfg.n_head + 2 * cfg.n_head_kv) * hd + cfg.n_head * hd * h
                + 3 * h * ff + h * vocab)
    attention = sum(2 * cfg.n_head * hd * (seq_len / 2 + k) for k in range(ttt_steps))
    return 3 * 2 * (3 * cfg.target_hidden * h + ttt_steps * per_step + attention)


class EagleDraft(torch.nn.Module):
    """The eagle3 decoder layer of heads/eagle.py in torch (float32), unrolled over TTT steps."""

    def __init__(self, cfg: EagleConfig, vocab: int, embd: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        h, hd = cfg.hidden, cfg.head_dim

        def linear(n_out: int, n_in: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))

        def ones(n: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.ones(n))

        self.fc = linear(h, 3 * cfg.target_hidden)
        self.attn_norm, self.attn_norm_2, self.ffn_norm, self.output_norm = (ones(h) for _ in range(4))
        self.wq = linear(cfg.n_head * hd, 2 * h)
        self.wk = linear(cfg.n_head_kv * hd, 2 * h)
        self.wv = linear(cfg.n_head_kv * hd, 2 * h)
        self.wo = linear(h, cfg.n_head * hd)
        self.ffn_gate, self.ffn_up = linear(cfg.n_ff, h), linear(cfg.n_ff, h)
        self.ffn_down = linear(h, cfg.n_ff)
        self.output = linear(vocab, h)
        self.register_buffer("embd", embd, persistent=False)  # (n_tokens, h) frozen, the target's
        inv = cfg.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        self.register_buffer("inv_freq", inv, persistent=False)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_eps) * w

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """llama.cpp's LLAMA_ROPE_TYPE_NORM: adjacent pairs rotated. x (B, T, heads, d)."""
        theta = positions[:, None].double() * self.inv_freq                 # (T, d/2)
        cos, sin = theta.cos().float()[:, None], theta.sin().float()[:, None]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, n_steps: int) -> list[torch.Tensor]:
        """features (B, T, 3 th); tokens (B, T, n_steps) embedding rows of the input token of
        each step. Returns the logits (B, T, V) of each step."""
        c = self.cfg
        b, t, _ = features.shape
        group, scale = c.n_head // c.n_head_kv, 1 / math.sqrt(c.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        base = torch.arange(t)
        g = features @ self.fc.T                                             # (B, T, h)
        keys, values, out = [], [], []
        for k in range(n_steps):
            g_norm = self._rms(g, self.attn_norm_2)
            x = torch.cat([self._rms(self.embd[tokens[:, :, k]], self.attn_norm), g_norm], -1)
            q = self._rope((x @ self.wq.T).view(b, t, c.n_head, c.head_dim), base + k)
            kk = self._rope((x @ self.wk.T).view(b, t, c.n_head_kv, c.head_dim), base + k)
            keys.append(kk.repeat_interleave(group, 2).transpose(1, 2))         # (B, heads, T, d)
            values.append((x @ self.wv.T).view(b, t, c.n_head_kv, c.head_dim)
                          .repeat_interleave(group, 2).transpose(1, 2))
            q = q.transpose(1, 2)
            # step-1 keys of rows <= P, then the keys of steps 2..k of row P itself
            s = (q @ keys[0].transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
            diag = [(q * km).sum(-1, keepdim=True) * scale for km in keys[1:]]    # (B, heads, T, 1)
            p = torch.softmax(torch.cat([s, *diag], -1), -1)
            a = p[..., :t] @ values[0]
            for m, vm in enumerate(values[1:]):
                a = a + p[..., t + m:t + m + 1] * vm
            a = a.transpose(1, 2).reshape(b, t, c.n_head * c.head_dim) @ self.wo.T
            f = a + g
            n = self._rms(f, self.ffn_norm)
            pre = f + (torch.nn.functional.silu(n @ self.ffn_gate.T) * (n @ self.ffn_up.T)) @ self.ffn_down.T
            out.append(self._rms(pre, self.output_norm) @ self.output.T)
            g = pre
        return out

    def weights(self, d2t: np.ndarray | None) -> EagleWeights:
        """The weights in heads/eagle.py's layout (the token embedding stays the target's)."""
        a = {k: v.detach().numpy().copy() for k, v in self.named_parameters()}
        return EagleWeights(fc=a["fc"], attn_norm=a["attn_norm"], attn_norm_2=a["attn_norm_2"],
                            wq=a["wq"], wk=a["wk"], wv=a["wv"], wo=a["wo"], ffn_norm=a["ffn_norm"],
                            ffn_gate=a["ffn_gate"], ffn_up=a["ffn_up"], ffn_down=a["ffn_down"],
                            output_norm=a["output_norm"], output=a["output"], d2t=d2t)


@dataclass(frozen=True)
class Batch:
    """features (B, T, 3 th) float32; tokens (B, T, K): embedding rows of each step's input
    token; labels (B, T, K): target ids, -1 past the window's end or on a prompt row;
    rows (B, T, K): the labels' draft vocabulary rows, -1 also outside it."""

    features: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor


@dataclass
class Batches:
    """Chunks of at most seq_len consecutive rows of one window, and the arrays of a batch."""

    data: HiddenStates
    starts: np.ndarray   # (n,) first row of each chunk
    ends: np.ndarray     # (n,) end of its window
    token_index: np.ndarray  # (n_vocab,) target id -> row of the model's embedding table
    label_rows: np.ndarray   # (n_vocab,) target id -> draft vocabulary row, -1 outside
    seq_len: int

    @classmethod
    def of(cls, data: HiddenStates, windows: np.ndarray, seq_len: int, token_index: np.ndarray,
           label_rows: np.ndarray) -> Batches:
        starts, ends = [], []
        for start, length, _ in data.windows[windows]:
            s = np.arange(start, start + length - 1, seq_len)  # the last row has no label
            starts.append(s)
            ends.append(np.full(len(s), start + length))
        return cls(data, np.concatenate(starts), np.concatenate(ends), token_index, label_rows, seq_len)

    def get(self, chunks: np.ndarray, n_steps: int) -> Batch:
        """The chunks' rows, each step's input token and label (step k of row P: token P+k,
        label pred P+k)."""
        rows = self.starts[chunks][:, None] + np.arange(self.seq_len)          # (B, T)
        ends = self.ends[chunks][:, None]
        inside = rows < ends
        feats = np.zeros(rows.shape + (self.data.hidden.shape[1],), dtype=np.float32)
        feats[inside] = self.data.hidden[rows[inside]]
        later = rows[..., None] + np.arange(1, n_steps + 1)                    # (B, T, K)
        ok = later < ends[..., None]
        at = np.where(ok, later, 0)
        labels = np.where(ok, self.data.preds[at], -1)
        tokens = np.where(ok, self.token_index[self.data.tokens[at]], 0)
        rows_out = np.where(labels >= 0, self.label_rows[np.maximum(labels, 0)], -1)
        return Batch(*(torch.from_numpy(a) for a in (feats, tokens, labels, rows_out)))


def _step_loss(logits: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """sum_k STEP_DECAY^(k-1) * mean cross-entropy of step k; rows (B, T, K) draft rows or -1."""
    loss = torch.zeros(())
    for k, z in enumerate(logits):
        y = rows[..., k]
        if (y >= 0).any():
            loss = loss + STEP_DECAY ** k * torch.nn.functional.cross_entropy(
                z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-1)
    return loss


@torch.no_grad()
def evaluate(model: EagleDraft, batches: Batches, d2t: np.ndarray | None, n_steps: int,
             batch_size: int) -> list[StepAccuracy]:
    """Per-step top-1 (labels outside the draft vocabulary count as misses), the chain's
    conditional top-1 and the loss on the chunks of `batches`."""
    hits, present, nll, n_nll = [], [], np.zeros(n_steps), np.zeros(n_steps)
    for s in range(0, len(batches.starts), batch_size):
        batch = batches.get(np.arange(s, min(s + batch_size, len(batches.starts))), n_steps)
        logits = model(batch.features, batch.tokens, n_steps)
        top = np.stack([z.argmax(-1).numpy() for z in logits], -1)          # (B, T, K)
        top = top if d2t is None else d2t[top]
        labels = batch.labels.numpy()
        hits.append((top == labels).reshape(-1, n_steps))
        present.append((labels >= 0).reshape(-1, n_steps))
        for k, z in enumerate(logits):
            y = batch.rows[..., k].reshape(-1)
            ok = y >= 0
            if ok.any():
                nll[k] += torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1])[ok], y[ok],
                                                            reduction="sum").item()
                n_nll[k] += int(ok.sum())
    hit, has = np.concatenate(hits), np.concatenate(present)
    out, chain = [], np.ones(len(hit), dtype=bool)  # steps 1..k-1 all right
    for k in range(n_steps):
        reached = chain & has[:, k]
        out.append(StepAccuracy(k + 1, float(hit[:, k].sum() / max(has[:, k].sum(), 1)),
                                float((hit[:, k] & reached).sum() / max(reached.sum(), 1)),
                                float(nll[k] / max(n_nll[k], 1)), int(has[:, k].sum())))
        chain &= hit[:, k]
    return out


def train(data: HiddenStates, out_path: str | os.PathLike, cfg: EagleTrainConfig = EagleTrainConfig(),
          *, checkpoint: str | os.PathLike | None = None, resume: bool = True, progress: bool = True,
          log: Callable[[str], None] | None = None) -> EagleReport:
    """Fit an EAGLE-3 draft on collected features and write its eagle3 GGUF to `out_path`.
    With `checkpoint` (a file), the model, optimizer and step are saved there every
    cfg.checkpoint_every steps, and with `resume` a run with the same settings continues
    from it exactly."""
    t_start = time.perf_counter()
    target = data.target
    ecfg = draft_config(target, cfg)
    if data.hidden.shape[1] != 3 * ecfg.target_hidden:
        raise ValueError(f"{data.path} holds features of width {data.hidden.shape[1]}, not "
                         f"3 x {ecfg.target_hidden}: collect them with layers={list(ecfg.target_layers)}")
    for s in range(0, data.n_rows, 65536):
        if not np.isfinite(data.hidden[s:s + 65536]).all():
            raise ValueError(f"{data.path} holds features beyond float16's range (inf): the "
                             f"target's layers {list(ecfg.target_layers)} have outliers; tap other --layers")
    held_windows = data.held_out(cfg.heldout)
    if held_windows.all() or not held_windows.any():
        raise ValueError("need at least two windows to keep some for evaluation")
    n_vocab = target.n_vocab
    train_rows = np.concatenate([np.arange(s, s + n) for s, n, _ in data.windows[~held_windows]])
    labels = data.preds[train_rows]  # -1: a prompt row, context without a label
    d2t = reduced_vocab(np.bincount(labels[labels >= 0], minlength=n_vocab), cfg.draft_vocab)
    vocab = n_vocab if d2t is None else len(d2t)
    label_rows = to_rows(np.arange(n_vocab), d2t, n_vocab)
    used = np.unique(data.tokens)  # the target's embedding rows the data needs, frozen
    token_index = np.zeros(n_vocab, dtype=np.int64)
    token_index[used] = np.arange(len(used))
    embd = torch.from_numpy(target.rows(target.token_embd, used))
    batches = Batches.of(data, np.flatnonzero(~held_windows), cfg.seq_len, token_index, label_rows)
    held = Batches.of(data, np.flatnonzero(held_windows), cfg.seq_len, token_index, label_rows)
    n_eval = max(cfg.eval_steps, cfg.ttt_steps)

    torch.manual_seed(cfg.seed)
    model = EagleDraft(ecfg, vocab, embd)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    before = evaluate(model, held, d2t, n_eval, cfg.batch_size)
    steps_per_epoch = -(-len(batches.starts) // cfg.batch_size)
    total = cfg.steps or cfg.epochs * steps_per_epoch
    learnt = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("dtype", "checkpoint_every")}
    key = json.dumps(dict(config=learnt, n_rows=data.n_rows,
                          fingerprint=dataclasses.asdict(target.fingerprint)), sort_keys=True)
    ckpt, step = (Path(checkpoint) if checkpoint is not None else None), 0
    if ckpt is not None and ckpt.exists() and resume:
        state = torch.load(ckpt, weights_only=True)
        if state["key"] == key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            step = int(state["step"])
        elif log:
            log(f"ignoring checkpoint {ckpt}: it was made with other settings or data")

    def save_checkpoint() -> None:
        buf = io.BytesIO()
        torch.save(dict(key=key, model=model.state_dict(), optimizer=opt.state_dict(), step=step), buf)
        save_atomic(ckpt, lambda f: f.write(buf.getvalue()))

    with tqdm(total=total, initial=step, unit="step", desc="training EAGLE draft",
              disable=not progress) as bar:
        while step < total:
            epoch, i = divmod(step, steps_per_epoch)
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(batches.starts))
            batch = batches.get(np.sort(order[i * cfg.batch_size:(i + 1) * cfg.batch_size]), cfg.ttt_steps)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.lr, step, total)
            loss = _step_loss(model(batch.features, batch.tokens, cfg.ttt_steps), batch.rows)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update(1)
            if ckpt is not None and (step % cfg.checkpoint_every == 0 or step == total):
                save_checkpoint()

    after = evaluate(model, held, d2t, n_eval, cfg.batch_size)
    held_rows = np.concatenate([np.arange(s + 1, s + n) for s, n, _ in data.windows[held_windows]])
    labels = data.preds[held_rows]
    coverage = float(np.mean(label_rows[labels[labels >= 0]] >= 0))  # of the step-1 labels
    path = save_eagle(out_path, ecfg, model.weights(d2t), target.path, dtype=cfg.dtype,
                      name=f"eagle3-{target.fingerprint.architecture}")
    return EagleReport(Path(path), int(len(train_rows)), after[0].n, coverage,
                       before, after, chain_tokens([a.chain_top1 for a in after]), total,
                       time.perf_counter() - t_start, flops_per_row(ecfg, vocab, cfg.ttt_steps, cfg.seq_len))


def train_eagle(target_path: str | os.PathLike, corpus: str | os.PathLike, out_path: str | os.PathLike,
                work_dir: str | os.PathLike, collect_cfg: CollectConfig = CollectConfig(),
                train_cfg: EagleTrainConfig = EagleTrainConfig(), *, resume: bool = True,
                progress: bool = True, log: Callable[[str], None] | None = None) -> EagleReport:
    """Collect the features of `corpus` (cached in `work_dir`), fit the draft, write the GGUF."""
    target = read_target(target_path)
    layers = train_cfg.layers or default_layers(target.n_layer)
    train_cfg = dataclasses.replace(train_cfg, layers=tuple(layers))
    draft_config(target, train_cfg)  # bad layers or shapes fail before collecting
    data = collect(target_path, corpus, work_dir, dataclasses.replace(collect_cfg, layers=tuple(layers)),
                   progress=progress)
    return train(data, out_path, train_cfg, checkpoint=Path(work_dir) / _CHECKPOINT, resume=resume,
                 progress=progress, log=log)
