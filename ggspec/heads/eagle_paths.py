"""Two ways to evaluate an EAGLE-3 draft, with one interface: numpy from the GGUF tensors
(EagleHeads, the reference; runs anywhere) and llama.cpp's own eagle3 graph on the same
file (backend.EagleContext: the file's quantized kernels, GPU offload). An EAGLE-1/2 draft
(heads.eagle1.Eagle1Heads, whose fuse is the identity) has the numpy path only.

Both keep the draft's own KV cache: committed rows (token P+1, g_P) at position P in
sequence 0, then one draft tree, a depth at a time. A node of depth d sits at position
root + d and sees the committed rows, its ancestors and itself, never its siblings
(numpy: a visibility mask; llama.cpp: one sequence per node, its parent's sequence copied
into it first). Logits are over the draft vocabulary (row j is target token
heads.target_ids(j)); `pre` is the pre-norm output that deeper steps feed back as g.

    fuse(features)                       (n, 3 th) -> g (n, h)
    commit(tokens, g, positions)         drop rows at positions >= positions[0], append
                                         these; -> logits (V,), pre (h,) of the last row
    expand(tokens, g, position, parents) one depth of the tree: parents[i] is the index of
                                         node i's parent among the previous expand's
                                         rows, -1 the committed root; -> (n, V), (n, h)
    end_tree()                           drop the tree's rows
    reset()                              drop every row
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack

import numpy as np

from ..backend import Context, EagleContext, Model, eagle_graph_missing
from ..config import BackendConfig
from .eagle import EagleHeads

BACKENDS = ("auto", "numpy", "llama")


class NumpyPath:
    """The numpy evaluator over an EagleCache."""

    name = "numpy"

    def __init__(self, heads: EagleHeads, capacity: int):
        self.heads = heads
        self.cache = heads.new_cache(capacity)
        self._root = 0                        # committed rows (cache rows before the tree)
        self._paths: list[list[int]] = [[]]   # cache rows of each previous-depth node's path

    def fuse(self, features: np.ndarray) -> np.ndarray:
        return self.heads.fuse(features)

    def commit(self, tokens, g, positions) -> tuple[np.ndarray, np.ndarray]:
        c = self.cache
        live = np.flatnonzero(c.positions[:c.n] < positions[0])
        c.truncate(live[-1] + 1 if live.size else 0)
        n0, n = c.n, len(positions)
        visible = np.zeros((n, n0 + n), dtype=bool)
        visible[:, :n0] = True
        visible[:, n0:] = np.tri(n, dtype=bool)                         # causal
        logits, pre = self.heads.step(c, tokens, g, positions, visible)
        self._root = c.n
        return logits[-1], pre[-1]

    def expand(self, tokens, g, position: int, parents) -> tuple[np.ndarray, np.ndarray]:
        c = self.cache
        n = len(tokens)
        paths = [self._paths[p] if p >= 0 else [] for p in parents]
        visible = np.zeros((n, c.n + n), dtype=bool)
        visible[:, :self._root] = True
        for i, path in enumerate(paths):
            visible[i, path] = True
            visible[i, c.n + i] = True
        first = c.n
        out = self.heads.step(c, tokens, g, np.full(n, position), visible)
        self._paths = [path + [first + i] for i, path in enumerate(paths)]
        return out

    def end_tree(self) -> None:
        self.cache.truncate(self._root)
        self._paths = [[]]

    def reset(self) -> None:
        self.cache.truncate(0)
        self._root = 0
        self._paths = [[]]


class LlamaPath:
    """llama.cpp's eagle3 graph. Tree nodes take sequence ids from two banks of `width`
    (1..width, width+1..2 width), alternating by depth: a node's sequence is emptied, then
    given its parent's (of the other bank, or 0 for the committed root)."""

    name = "llama"

    def __init__(self, heads: EagleHeads, ctx: EagleContext, width: int):
        if ctx.n_seq_max < 1 + 2 * width:
            raise ValueError(f"trees {width} wide need a context with n_seq_max >= {1 + 2 * width}")
        self.heads, self.ctx, self.width = heads, ctx, width
        self._bank = 0
        self._parent_seqs = np.zeros(0, dtype=np.int64)  # sequences of the previous depth's nodes
        self._columns = heads.d2t  # draft-vocabulary columns of llama.cpp's target-vocabulary logits

    def fuse(self, features: np.ndarray) -> np.ndarray:
        return self.ctx.encode(features)

    def _draft_logits(self, logits: np.ndarray) -> np.ndarray:
        """A copy (the view is llama.cpp's buffer, rewritten by the next decode)."""
        return logits.copy() if self._columns is None else logits[:, self._columns]

    def commit(self, tokens, g, positions) -> tuple[np.ndarray, np.ndarray]:
        ctx, p0 = self.ctx, int(positions[0])
        if ctx.seq_pos_max(0) + 1 < p0:  # a gap (rows the draft never saw): start afresh
            ctx.seq_rm(-1)
        ctx.seq_rm(-1, p0, -1)
        n, step = len(tokens), ctx.n_batch
        for s in range(0, n, step):
            m = min(step, n - s)
            logits, pre = ctx.decode(tokens[s:s + m], g[s:s + m], positions[s:s + m], [[0]] * m)
        return self._draft_logits(logits[-1:])[0], pre[-1].copy()

    def expand(self, tokens, g, position: int, parents) -> tuple[np.ndarray, np.ndarray]:
        ctx, n = self.ctx, len(tokens)
        seqs = 1 + self._bank * self.width + np.arange(n)
        for s, p in zip(seqs, parents):
            ctx.seq_rm(int(s))
            ctx.seq_cp(int(self._parent_seqs[p]) if p >= 0 else 0, int(s))
        logits, pre = ctx.decode(tokens, g, np.full(n, position), [[int(s)] for s in seqs])
        self._bank, self._parent_seqs = 1 - self._bank, seqs
        return self._draft_logits(logits), pre.copy()

    def end_tree(self) -> None:
        for s in range(1, 1 + 2 * self.width):
            self.ctx.seq_rm(s)
        self._bank, self._parent_seqs = 0, np.zeros(0, dtype=np.int64)

    def reset(self) -> None:
        self.ctx.seq_rm(-1)
        self._bank, self._parent_seqs = 0, np.zeros(0, dtype=np.int64)


def open_path(choice: str, heads: EagleHeads, file: str | os.PathLike, cfg: BackendConfig,
              target: Context, stack: ExitStack, width: int, depth: int) -> NumpyPath | LlamaPath:
    """The evaluator `choice` names for trees `width` wide and `depth` deep after the
    target's context; "auto": the faster by one measured depth step (numpy where this
    llama.cpp cannot drive the eagle3 graph). The llama.cpp path loads `file` with `cfg`
    (the target's GPU layers) and puts its model and context on `stack`."""
    if choice not in BACKENDS:
        raise ValueError(f"the EAGLE path must be one of {', '.join(BACKENDS)}, got {choice!r}")
    capacity = target.n_ctx + depth * width
    if heads.features == "hidden" and choice == "llama":
        raise ValueError("an EAGLE-1/2 draft (eagle1) runs in numpy only: llama.cpp has no graph for it")
    if choice == "numpy" or (choice == "auto" and (heads.features == "hidden" or eagle_graph_missing())):
        return NumpyPath(heads, capacity)
    with ExitStack() as own:  # closes the llama.cpp path unless it is chosen
        model = own.enter_context(Model(file, cfg, heads=True))
        llama = LlamaPath(heads, own.enter_context(EagleContext(model, target, capacity, 1 + 2 * width)), width)
        if choice == "auto":
            numpy_path = NumpyPath(heads, capacity)
            if step_seconds(numpy_path, width) <= step_seconds(llama, width):
                return numpy_path
        stack.push(own.pop_all())
        return llama


def step_seconds(path: NumpyPath | LlamaPath, width: int, history: int = 1, repeats: int = 3) -> float:
    """Seconds one draft depth step of `width` nodes takes on `path` after `history`
    committed rows (the fastest of `repeats`, after a warm-up); the path is reset."""
    h, th = path.heads.cfg.hidden, path.heads.cfg.target_hidden
    path.reset()
    path.commit(np.zeros(history, dtype=np.int64), path.fuse(np.zeros((history, 3 * th), dtype=np.float32)),
                np.arange(history))
    best = np.inf
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        path.expand(np.zeros(width, dtype=np.int64), np.zeros((width, h), dtype=np.float32), history,
                    np.full(width, -1))
        if i:  # the first allocates
            best = min(best, time.perf_counter() - t0)
        path.end_tree()
    path.reset()
    return best
