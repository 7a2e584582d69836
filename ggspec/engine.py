"""The engine: load a target (and a drafter) and generate, one round at a time.

A round reads top to bottom: propose -> verify -> commit. The target's KV cache always
holds every committed token but the last one; the last one (the "pending" token) is
the first row of the next verification batch, followed by the draft.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator, Iterator, Sequence

import numpy as np

from . import calibration, experience, hub, machine, session
from .acceptance import (TreeVerdict, accept_greedy, accept_match, accept_speculative, accept_tree_match,
                         accept_tree_typical)
from .backend import Context, Model, check_vocab_compatible, layer_input_name
from .config import BackendConfig, SamplingConfig, SpecConfig
from .controller import CostModel, Survey
from .drafters import Draft, Drafter
from .drafters.auto import AutoDrafter
from .drafters.eagle import DEPTH, TOP_K, EagleDrafter
from .drafters.lookup import LookupDrafter
from .drafters.medusa import MedusaDrafter
from .drafters.model import AHEAD, ModelDrafter
from .errors import BusyError, ContextOverflowError, EngineClosedError
from .heads import load_heads
from .heads.eagle1 import open_eagle
from .heads.eagle_paths import LlamaPath, open_path
from .stats import Stats
from .text import TextStream

Prompt = str | Sequence[int] | Sequence[dict]
REMEMBER_EVERY = 30.0  # seconds: what generations learn is stored at most this often (and at close)
DEFAULT = "default"  # draft / heads: whatever the registry pairs with the target
MEDUSA_MAX_NODES = 32  # largest head tree; the controller usually picks far fewer on a CPU
CALIBRATED = ("auto", "medusa", "eagle")  # the methods that choose by the measured cost curve


class Piece(str):
    """A piece of streamed text; from_draft tells that it came from accepted draft tokens
    (the target verified them: a round's accepted drafts stream as one piece) rather than
    from the target's own choice, and tokens how many tokens the answer has with it (a
    piece holds any number: a round's accepted drafts, text held back for a stop string)."""

    from_draft: bool
    tokens: int

    def __new__(cls, text: str, from_draft: bool = False, tokens: int = 0) -> Piece:
        piece = super().__new__(cls, text)
        piece.from_draft, piece.tokens = from_draft, tokens
        return piece


@dataclass
class Result:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end of generation or stop string), "length", "cancelled"
    stats: Stats = field(default_factory=Stats)


def consume(stream: Generator[str, None, Result], on_piece: Callable[[str], None]) -> Result:
    """Run a stream to its Result, passing each piece to on_piece. The stream is closed on
    every path: if on_piece raises, the generation ends and the engine is free again."""
    try:
        while True:
            try:
                piece = next(stream)
            except StopIteration as done:
                return done.value
            on_piece(piece)
    finally:
        stream.close()


class Engine:
    """A target model and an optional draft model, ready to generate.

    target / draft: a registry name (pulled on first use) or a GGUF path. draft
    "default" takes the registry's paired draft for a registry target, and no draft for
    a path; None means no draft model. draft_config None loads the draft as the target but
    on local devices only (target_config.local()): a target split across RPC servers keeps
    its drafter here.

    heads: a Medusa heads GGUF for the target, or "default" for the heads shipped for a
    registry target (enables method "medusa"; the target's context then also returns
    hidden states and holds up to MEDUSA_MAX_NODES sequences). tree_shape: how head trees
    are shaped: "grown" from measured acceptance, or "chain", "cartesian", "sparse".
    tree_nodes: a fixed number of tree nodes per medusa round (at most MEDUSA_MAX_NODES,
    and spec.draft_max); 0 sizes each tree by the measured verification cost (no tree
    where none pays).
    eagle: an EAGLE draft GGUF for the target, or "default" for the draft shipped for a
    registry target: EAGLE-3 (llama.cpp's eagle3 format) or EAGLE-1/2 (ggspec's eagle1
    format, heads.eagle1), told apart by the file's architecture; enables
    method "eagle": EAGLE-2 dynamic trees of up to MEDUSA_MAX_NODES nodes; the target's
    context then also copies the draft's three target layers' inputs of every row
    (EAGLE-3) or outputs its last hidden state of every row (EAGLE-1/2).
    eagle_backend: how the EAGLE draft is evaluated: "numpy" (from its GGUF tensors, in
    float32), "llama" (llama.cpp's own eagle3 graph on the file's quantized weights, with
    the target's GPU layers; EAGLE-3 only), or "auto": the faster of the two by one draft
    depth step timed at start (numpy for EAGLE-1/2).
    max_tree_paths: the most root-to-leaf paths a tree draft may have (each is a
    llama.cpp sequence of the target's context); 1 means chains only.
    remember: start the acceptance estimates from what earlier engines with the same model
    files learnt, and store what the generations that learn taught them (ggspec.experience);
    likewise the cost model's corrections of the stored calibration (ggspec.calibration).
    They are stored after a generation once REMEMBER_EVERY seconds have passed since the
    first unstored one, and when the engine closes: a generation does not wait for file
    writes.

    One generation runs at a time. generate() and stream() called from another thread
    while one runs wait for it to finish (or raise BusyError with wait=False).

    Cancelling: each generation has its own cancel handle, a threading.Event (pass your
    own as `cancel`, or one is made); setting it stops that generation after its current
    round, also when set while the call still waits for the engine (it then returns at
    once, finish reason "cancelled"). engine.cancel() sets the handle of the generation
    running at that moment, and of no other.
    """

    def __init__(self, target: str | os.PathLike | None = None,
                 draft: str | os.PathLike | None = DEFAULT, *,
                 target_config: BackendConfig = BackendConfig(),
                 draft_config: BackendConfig | None = None,
                 spec: SpecConfig = SpecConfig(),
                 sampling: SamplingConfig = SamplingConfig(),
                 heads: str | os.PathLike | None = None,
                 tree_shape: str = "grown",
                 tree_nodes: int = 0,
                 eagle: str | os.PathLike | None = None,
                 eagle_backend: str = "auto",
                 max_tree_paths: int = 1,
                 remember: bool = True,
                 progress: bool = True):
        target = target or hub.default_model()
        if draft == DEFAULT:
            draft = hub.default_draft(str(target)) if not Path(target).exists() else None
        if heads == DEFAULT:
            heads = hub.default_heads(str(target))
            if heads is None:
                raise ValueError(f"no Medusa heads are shipped for {target}; give a heads file")
        if eagle == DEFAULT:
            eagle = hub.default_heads(str(target), "eagle")
            if eagle is None:
                raise ValueError(f"no EAGLE draft is shipped for {target}; give an EAGLE-3 GGUF file")
        if draft is not None and draft_config is not None and draft_config.n_ctx < target_config.n_ctx:
            raise ValueError(f"the draft's context ({draft_config.n_ctx} tokens) is smaller than the "
                             f"target's ({target_config.n_ctx}): the draft follows the whole text; "
                             "give it a context at least as large")
        self.spec = spec
        self.sampling = sampling
        self._lock = threading.Lock()
        self._running: threading.Event | None = None  # the cancel handle of the running generation
        self._owner: int | None = None  # the thread that runs it
        self._closed = False
        self.rng = np.random.default_rng()  # seeds each generation without a seed (saved with the session)
        with ExitStack() as stack:
            self.target = stack.enter_context(Model(hub.resolve(str(target), progress=progress), target_config))
            eagle_heads = open_eagle(eagle, self.target) if eagle is not None else None
            eagle_reads = eagle_heads.features if eagle_heads is not None else None
            hidden = heads is not None or eagle_reads == "hidden"  # Medusa, EAGLE-1/2
            taps = [layer_input_name(i) for i in eagle_heads.cfg.target_layers] if eagle_reads == "taps" else []
            if heads is not None or eagle_heads is not None:
                max_tree_paths = max(max_tree_paths, MEDUSA_MAX_NODES)
            self.ctx = stack.enter_context(Context(self.target, target_config, n_seq_max=max_tree_paths,
                                                   embeddings=hidden, rollback=spec.draft_max,
                                                   taps=taps))
            self._contexts = [self.ctx]
            self.draft: Model | None = None
            lookup = LookupDrafter()
            self.drafters: dict[str, Drafter] = {"lookup": lookup}
            self.costs = CostModel()  # the one cost model: auto and medusa choose by it
            if draft is not None:
                draft_config = draft_config or target_config.local()  # the draft stays local
                self.draft = stack.enter_context(Model(hub.resolve(str(draft), progress=progress), draft_config))
                check_vocab_compatible(self.target, self.draft)
                draft_ctx = stack.enter_context(Context(self.draft, draft_config))
                self._contexts.append(draft_ctx)
                self.drafters["draft"] = ModelDrafter(draft_ctx, self.target.n_vocab)
            if heads is not None:
                self.drafters["medusa"] = MedusaDrafter(self.ctx, self.costs, load_heads(heads, self.target.path),
                                                        MEDUSA_MAX_NODES, tree_shape, tree_nodes)
            if eagle_heads is not None:
                width = min(TOP_K, eagle_heads.vocab_size)
                path = open_path(eagle_backend, eagle_heads, eagle, target_config.local(), self.ctx, stack,
                                 width, DEPTH)
                self.drafters["eagle"] = EagleDrafter(self.ctx, self.costs, path, MEDUSA_MAX_NODES, tree_nodes)
                if isinstance(path, LlamaPath):  # its llama_decode time is llama.cpp's, in Stats
                    self._contexts.append(path.ctx)
            self.drafters["auto"] = AutoDrafter(self.costs, lookup, self.drafters.get("draft"),
                                                self.target.line_ends(),
                                                self.drafters.get("eagle") or self.drafters.get("medusa"),
                                                max_paths=self.ctx.n_seq_max)
            self.remember = remember
            self.files = tuple(None if f is None else Path(f).resolve()  # (None: absent)
                               for f in (self.target.path, self.draft and self.draft.path, heads, eagle))
            self.files_key = experience.key(self.files)
            if remember:
                experience.recall(self)
            self._progress = progress
            self._unstored: machine.Snapshot | None = None  # since the first generation not stored
            self._preparing: threading.Event | None = None  # the stop event of a prepare() running now
            stack.callback(self._store)  # (last in, first out: before the contexts are freed)
            self._check_batch(spec)  # (a refusal frees what was loaded)
            self._resources = stack.pop_all()

    def close(self) -> None:
        """Free the contexts, then the models; later calls raise EngineClosedError.

        A running generation is cancelled and the handles are freed when it ends: close()
        from another thread waits for that (a stream suspended in another thread must be
        closed or run to its end); close() from the generating thread itself (a callback,
        or a stream left open) returns at once and the generation frees them as it ends."""
        self._closed = True
        self.cancel()
        if self._lock.acquire(blocking=self._owner != threading.get_ident()):
            try:
                self._resources.close()
            finally:
                self._lock.release()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    @property
    def threads(self) -> tuple[int, int | None]:
        """CPU threads of the target and of the draft model (None: no draft model)."""
        draft = self.drafters.get("draft")
        return self.ctx.n_threads, None if draft is None else draft.ctx.n_threads

    def set_threads(self, target: int, draft: int | None = None) -> None:
        """Change the CPU threads of the target and (when given) the draft model between
        generations; the cost model then measures afresh."""
        self._check_open()
        with self._lock:
            if (target, draft or self.threads[1]) == self.threads:
                return
            self.ctx.set_threads(target)
            if draft is not None and "draft" in self.drafters:
                self.drafters["draft"].ctx.set_threads(draft)
            self.costs.reset()

    def cancel(self) -> None:
        """Ask the generation running now to stop after its current round, or prepare() to
        stop measuring (thread-safe, also from a signal handler). Calls waiting for the
        engine are not affected."""
        running = self._running
        if running is not None:
            running.set()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine is closed; create a new Engine")

    @contextmanager
    def idle(self) -> Iterator[None]:
        """Hold the engine between generations (waiting for a running one), to read or
        replace its state."""
        self._check_open()
        if self._owner == threading.get_ident():
            raise BusyError("this thread is generating (a callback, or a stream left open); "
                            "save or load the session after the generation ends")
        with self._lock:
            self._check_open()  # closed while this call waited
            yield

    def save(self, path: str | os.PathLike) -> None:
        """Save the KV caches, their tokens, the controller's estimates and the random
        state to one file, atomically (ggspec.session)."""
        session.save(self, path)

    def load(self, path: str | os.PathLike) -> None:
        """Load what save() wrote; SessionFileError (the engine unchanged) when the file
        is for other models or settings, truncated, corrupted or of another version."""
        session.load(self, path)

    def _check_batch(self, spec: SpecConfig) -> None:
        """A verification batch holds the pending token and up to draft_max drafts (with
        heads: the largest tree, whose cost is measured) in one llama_decode."""
        if spec.method == "none":
            return
        rows, what = spec.draft_max + 1, f"draft_max + 1 = {spec.draft_max + 1}"
        if self._tree_drafters() and MEDUSA_MAX_NODES + 1 > rows:
            rows, what = MEDUSA_MAX_NODES + 1, f"the largest head tree + 1 = {MEDUSA_MAX_NODES + 1}"
        if self.ctx.n_batch < rows:
            raise ValueError(f"n_batch {self.ctx.n_batch} is below {what}: a verification batch "
                             f"would not fit; use n_batch >= {rows} or a smaller draft_max (on the command "
                             f"line: -c/--ctx-size >= {rows}, which caps the batch, or a smaller -k)")

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Chat messages are rendered with the target's template (their contents are text:
        only the template's own markers become control tokens); a string is tokenized as
        is, control-token text included."""
        self._check_open()
        if isinstance(prompt, str):
            return self.target.tokenize(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.target.tokenize_chat(prompt)
        tokens = [int(t) for t in prompt]
        if bad := [t for t in tokens if not 0 <= t < self.target.n_vocab]:
            raise ValueError(f"token id {bad[0]} is not in the target's vocabulary (ids 0 to {self.target.n_vocab - 1})")
        return tokens

    def generate(self, prompt: Prompt, *, max_tokens: int = 256, stop: str | Sequence[str] = (),
                 sampling: SamplingConfig | None = None, spec: SpecConfig | None = None,
                 on_text: Callable[[str], bool | None] | None = None, wait: bool = True,
                 cancel: threading.Event | None = None, reuse_cache: bool = True) -> Result:
        """Generate a completion. on_text receives each text piece as it is committed
        and may return True to stop (finish reason "cancelled")."""
        cancel = threading.Event() if cancel is None else cancel

        def on_piece(piece: str) -> None:
            if on_text is not None and on_text(piece):
                cancel.set()

        return consume(self.stream(prompt, max_tokens=max_tokens, stop=stop, sampling=sampling, spec=spec,
                                   wait=wait, cancel=cancel, reuse_cache=reuse_cache), on_piece)

    def stream(self, prompt: Prompt, *, max_tokens: int = 256, stop: str | Sequence[str] = (),
               sampling: SamplingConfig | None = None, spec: SpecConfig | None = None,
               wait: bool = True, cancel: threading.Event | None = None,
               reuse_cache: bool = True) -> Generator[str, None, Result]:
        """Yield text pieces as they are committed; the generator returns the Result.
        Closing the generator ends the generation (the engine lock is held until then).
        stop: a stop string, or several. cancel: this generation's cancel handle.
        reuse_cache: keep the target's KV cache of the longest prefix the prompt shares with
        what it holds (False: compute the whole prompt afresh, so that the answer does not
        depend on what came before)."""
        self._check_open()
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        sampling = sampling or self.sampling
        spec = spec or self.spec
        if spec.method not in ("none", *self.drafters):
            raise ValueError(f"method {spec.method!r} is not available here; "
                             f"available: none, {', '.join(self.drafters) or '(no drafter loaded)'}")
        self._check_batch(spec)
        cancel = threading.Event() if cancel is None else cancel
        tokens = self.tokenize(prompt)
        if not tokens:
            raise ValueError("the prompt is empty")
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx}; "
                "use a larger context size (--ctx-size) or a shorter prompt")
        self.end_prepare()  # (the answer does not wait for a measurement ahead: its rounds take the rest)
        if not wait and self._lock.locked():
            raise BusyError("the engine is already generating; wait for it or use another engine")
        with self._holding(cancel):
            if cancel.is_set():  # cancelled while it waited
                return Result("", [], "cancelled", Stats(method=spec.method, finish_reason="cancelled"))
            return (yield from self._run(tokens, max_tokens, stop, sampling, spec, cancel, reuse_cache))

    def prepare(self, spec: SpecConfig | None = None, *, progress: bool = False) -> None:
        """Measure now what the first generation with `spec` (the engine's default if None)
        would otherwise measure in its first rounds (ggspec.controller.Survey): the
        verification cost curve and the draft model's token cost, when the calibration
        store holds none for this machine and these settings (ggspec.calibration). Call it
        while the application waits for its user, from any thread: `ggspec chat` does while
        the first message is typed, `ggspec serve` before its first request. A generation
        asked for meanwhile, end_prepare(), cancel() and close() stop it after its current
        decode; the timings it took are kept (and stored, as a survey under way) for the
        next generation's rounds to go on with. Methods none, lookup and draft measure
        nothing. With `progress`, a measurement is announced on stderr."""
        spec = spec or self.spec
        if spec.method not in CALIBRATED:
            return
        cancel = threading.Event()
        with self._holding(cancel):
            self._preparing = cancel
            try:
                self._calibrate(spec.draft_max + 1, progress=progress, stop=cancel)
            finally:
                self._preparing = None

    def end_prepare(self) -> None:
        """Stop a prepare() running now (thread-safe) after its current decode: the timings
        it took are kept, and the next generation's rounds take the rest. A generation
        asked for calls it itself; an application that queues its requests calls it when
        one comes."""
        preparing = self._preparing
        if preparing is not None:
            preparing.set()

    @contextmanager
    def _holding(self, cancel: threading.Event) -> Iterator[None]:
        """Hold the engine for one generation (or preparation) whose cancel handle is
        `cancel`, waiting for the one running."""
        with self._lock:  # (not acquire(): an interrupt right after it would leave the lock held)
            try:
                self._check_open()  # closed while this call waited
                self._running, self._owner = cancel, threading.get_ident()
                yield
            finally:
                if "draft" in self.drafters:
                    self.drafters["draft"].stop()  # no worker outlives its generation
                self._running = self._owner = None
                if self._closed:  # close() was called from the holding thread
                    self._resources.close()

    def _run(self, prompt: list[int], max_tokens: int, stop: Sequence[str],
             sampling: SamplingConfig, spec: SpecConfig, cancel: threading.Event,
             reuse_cache: bool) -> Iterator[str]:
        drafter = self.drafters.get(spec.method)
        if "draft" in self.drafters:  # the confidence stop is method draft's: auto sizes its chains itself
            self.drafters["draft"].p_min = spec.draft_p_min if spec.method == "draft" else 0.0
        stats = Stats(method=spec.method)
        # separate streams: the target's draws then do not depend on what was drafted, so
        # sample-and-match (lookup, auto with a seed) commits what plain sampling would
        seed = sampling.seed if sampling.seed is not None else int(self.rng.integers(2 ** 63))
        rng, draft_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
        text = TextStream(stop)
        out: list[str] = []
        emitted: list[str] = []
        generated: list[int] = []

        learns = self.remember and spec.method in ("auto", "medusa", "eagle")
        if learns and self._unstored is None:
            self._unstored = machine.snapshot()  # (what other processes run meanwhile)
        # prefill everything but the last prompt token, which round one verifies
        t0 = time.perf_counter()
        stats.cached_tokens = self.ctx.sync(prompt[:-1] if reuse_cache else [])
        self.ctx.eval(prompt[stats.cached_tokens:-1], logits="none")
        if drafter is not None:
            drafter.prepare(prompt)
            if spec.method in CALIBRATED:
                self._calibrate(spec.draft_max + 1, wait=False)
        # (since when, timings before): a survey this generation's rounds go on with
        surveying = (machine.snapshot(), len(self.costs.survey.done)) if self.costs.survey is not None else None
        stats.prefill_tokens = len(prompt) - stats.cached_tokens
        t1 = time.perf_counter()
        stats.prefill_seconds = t1 - t0
        busy1 = self._busy()

        committed = list(prompt)
        n_ctx = self.n_ctx
        finish = ""
        self.costs.overlap.start()
        while not finish:
            if len(committed) > n_ctx:  # the cache is full: n_ctx tokens and the pending one
                finish = "length"
                break
            # propose
            budget = self._budget(spec, max_tokens - len(generated), len(committed))
            ta = time.perf_counter()
            draft = drafter.propose(committed, budget, sampling, draft_rng) if drafter else Draft([])
            if draft.tree is None:  # a recurrent target's state may be saved here (the cost model counts it apart)
                self.ctx.checkpoint(len(draft.tokens) + 1, 1)
            tb = time.perf_counter()
            ahead = self._draft_ahead(spec, committed, draft, max_tokens - len(generated), sampling, draft_rng)
            # verify: [pending, *draft] in one llama_decode, logits for every row
            if draft.tree is None:
                rows = self.ctx.eval([committed[-1], *draft.tokens], logits="all")  # (k + 1, n_vocab)
            else:
                rows = self.ctx.eval_tree([committed[-1], *draft.tokens], draft.tree)
            if sampling.ignore_eos:  # (the rows are this round's own: llama.cpp rewrites them next decode)
                rows[:, list(self.target.eog)] = -np.inf
            verdict = self._accept(rows, draft, sampling, spec.typical, rng)
            tc = time.perf_counter()
            stats.draft_seconds += tb - ta
            stats.verify_seconds += tc - tb
            accepted = list(map(draft.tokens.__getitem__, verdict.nodes))
            stats.ahead_rounds += ahead
            stats.ahead_drafts += draft.plan is AHEAD
            if spec.method == "draft":
                self.costs.overlap.observe(ahead, tc - ta, len(accepted) + 1)
            if not ahead:  # (a verification sharing the machine with the worker is not the curve's)
                self.costs.observe_verify(len(draft.tokens) + 1, tc - tb)
                if surveying:
                    self._survey_round(len(draft.tokens) + 1, tc - tb, surveying[0])
            if drafter is not None:
                drafter.accept(draft, verdict.nodes)
            # commit: keep the pending token and the accepted drafts in the KV cache
            if draft.tree is None:
                self.ctx.truncate(len(committed) + len(accepted))
            else:
                self.ctx.keep_path(draft.tree.path_with(list(verdict.nodes)), accepted)
            committed += accepted
            committed.append(verdict.token)
            n_out = len(generated)
            finish = self._take(accepted, True, generated, text, out, max_tokens) if accepted else ""
            depth = int(draft.tree.depths.max()) if draft.tree is not None and draft.tokens else len(draft.tokens)
            # counted: the accepted drafts that reached the output (not those past its end)
            stats.record_round(len(draft.tokens), len(generated) - n_out, depth)
            finish = finish or self._take([verdict.token], False, generated, text, out, max_tokens)
            while out:
                emitted.append(out.pop(0))
                yield emitted[-1]
            if not finish and cancel.is_set():
                finish = "cancelled"
        tail = text.flush()
        if tail:
            emitted.append(tail)
            yield Piece(tail)
        stats.decode_seconds = time.perf_counter() - t1
        stats.llama_seconds = self._busy() - busy1
        stats.generated_tokens = len(generated)
        stats.finish_reason = finish
        if self.costs.survey is not None and surveying:
            self._keep_survey(*surveying)
        if learns and time.monotonic() - self._unstored.at >= REMEMBER_EVERY:
            self._store()
        if isinstance(drafter, AutoDrafter):
            stats.controller = drafter.report()
        elif spec.method == "draft" and spec.async_draft is None:
            stats.controller = {"async_draft": self.costs.overlap.report()}
        return Result(text="".join(emitted), tokens=generated, finish_reason=finish, stats=stats)

    def _store(self) -> None:
        """Store what the generations since the last store learnt: the acceptance estimates,
        and the cost model's corrections unless other processes were busy meanwhile (a
        busy machine bends the curve's shape)."""
        if self._unstored is None:
            return
        experience.remember(self)
        if self.costs.calibrated and self.costs.survey is None and not machine.busy_since(self._unstored):
            calibration.store_correction(self.ctx, self.costs.correction)
        self._unstored = None

    def _budget(self, spec: SpecConfig, tokens_left: int, n_committed: int) -> int:
        """Tokens a round may draft: the next round's pending token must fit too; none
        for a state that cannot come back from a rejection."""
        if not self.ctx.can_rewind:
            return 0
        return min(spec.draft_max, tokens_left - 1, self.ctx.n_ctx - n_committed)

    def _draft_ahead(self, spec: SpecConfig, committed: list[int], draft: Draft, tokens_left: int,
                     sampling: SamplingConfig, rng: np.random.Generator) -> bool:
        """With method draft, let the draft model draft the next round while the target
        verifies `draft` (asynchronous drafting) when forced or when the controller finds
        that it pays; True when it started. Not chosen for a seeded sampled run: drafting
        ahead draws differently, and a timing-dependent choice must not change its output."""
        if spec.method != "draft" or spec.async_draft is False \
                or (spec.async_draft is None and sampling.seed is not None and not sampling.greedy):
            return False
        # the next round, if this draft is accepted whole, follows len(draft) + 1 more tokens
        n = len(draft.tokens) + 1
        budget = self._budget(spec, tokens_left - n, len(committed) + n)
        if budget <= 0 or not (spec.async_draft or self.costs.overlap.choose()):
            return False
        self.drafters["draft"].propose_ahead([*committed, *draft.tokens], budget, sampling, rng)
        return True

    def _calibrate(self, rows: int, progress: bool | None = None, stop: threading.Event | None = None,
                   wait: bool = True) -> None:
        """Give the cost model a verification curve covering `rows` rows (and the largest
        tree with heads): from the calibration store, or measured now (announced on stderr
        with `progress`, the engine's setting if None; none if `stop` is set before the
        measurement ends), or, without `wait`, by the rounds that follow (a survey, resumed
        where a stored one stopped)."""
        if self._tree_drafters():
            rows = max(rows, MEDUSA_MAX_NODES + 1)
        under_way = self.costs.survey is not None and self.costs.survey.rows >= rows
        if under_way and not wait or self.costs.survey is None and self.costs.calibrated and self.costs.max_rows >= rows:
            return
        if len(self.ctx.tokens) + rows + 1 > self.n_ctx:
            return  # no room to measure: the controller drafts nothing until there is
        progress = self._progress if progress is None else progress
        draft = self.drafters.get("draft")
        if draft is not None and len(draft.ctx.tokens) + 2 <= draft.ctx.n_ctx:
            draft_token = calibration.verify_curve(draft.ctx, 1, progress=progress, stop=stop)
            if draft_token is None:
                return
            self.costs.draft_token = self.costs.draft_row = float(draft_token[0])
        curve = calibration.cached_curve(self.ctx, rows)
        if curve is None:
            if not under_way:
                self.costs.survey = calibration.stored_survey(self.ctx, rows)
                self.costs.follow(self.costs.survey.curve())
            if not wait:
                if progress:
                    print(f"ggspec: timing {self.target.path.name}'s verification cost for 1-{rows} rows in the "
                          "rounds of the first answers (once for this model, machine and settings)", file=sys.stderr)
                return
            since, before = machine.snapshot(), len(self.costs.survey.done)
            curve = calibration.verify_curve(self.ctx, rows, progress=progress, stop=stop, survey=self.costs.survey)
            if curve is None:  # stopped: the next generation's rounds go on with it
                self._keep_survey(since, before)
                return
        self._take_curve(curve)

    def _take_curve(self, curve: np.ndarray) -> None:
        """Let the cost model choose by this verification curve, refined by the corrections
        stored for it."""
        self.costs.calibrate(curve, self.costs.draft_token)
        refined = calibration.stored_correction(self.ctx, len(curve)) if self.remember else None
        if refined is not None:
            self.costs.correction = refined
        self.costs.state_copy, self.costs.rollback = self.ctx.time_state_copy(), self.ctx.n_rs_seq

    def _survey_round(self, rows: int, seconds: float, since: machine.Snapshot) -> None:
        """A verification of `rows` rows took `seconds`: a timing of the survey, if it is
        still under way and waits for one of that size. Until its last, choose by what it
        has timed (Survey.curve); then by the whole curve, stored unless other processes
        were busy while this generation took its part."""
        survey = self.costs.survey
        if survey is None or not survey.observe(rows, seconds):
            return
        if survey.next is None:
            curve = survey.curve()
            calibration.keep(self.ctx, curve, since)
            self._take_curve(curve)
        else:
            self.costs.follow(survey.curve())

    def _keep_survey(self, since: machine.Snapshot, before: int) -> None:
        """A generation (or prepare) ended with the survey under way: store what it took
        since `since` (the timings after the first `before`) for the next engine, or, when
        other processes were busy meanwhile, drop them (taken again by the next rounds)."""
        survey = self.costs.survey
        if len(survey.done) == before:
            return
        if machine.busy_since(since):
            self.costs.survey = Survey(survey.rows, survey.done[:before])
        else:
            calibration.store_survey(self.ctx, survey)
        self.costs.follow(self.costs.survey.curve())

    def _take(self, tokens: list[int], from_draft: bool, generated: list[int], text: TextStream,
              out: list[str], max_tokens: int) -> str:
        """Add committed tokens to the output, as one piece, up to the first
        end-of-generation token, stop string or max_tokens; return the finish reason or ""."""
        finish = ""
        if not self.target.eog.isdisjoint(tokens):
            tokens, finish = tokens[:next(i for i, t in enumerate(tokens) if t in self.target.eog)], "stop"
        if len(generated) + len(tokens) >= max_tokens:
            tokens, finish = tokens[:max_tokens - len(generated)], "length"
        piece, kept = text.push(self.target.pieces(tokens))
        generated += tokens[:kept]
        if piece:
            out.append(Piece(piece, from_draft, len(generated)))
        return "stop" if text.stopped else finish

    def _accept(self, rows: np.ndarray, draft: Draft, sampling: SamplingConfig, typical: bool,
                rng: np.random.Generator) -> TreeVerdict:
        """The accepted nodes (for a chain: its first n tokens) and the next token."""
        if draft.tree is not None:
            if typical:
                return accept_tree_typical(rows, draft.tokens, draft.tree, sampling, rng)
            return accept_tree_match(rows, draft.tokens, draft.tree, sampling, rng)
        if sampling.greedy:
            v = accept_greedy(rows, draft.tokens)
        elif draft.q is not None:
            v = accept_speculative(rows, draft.tokens, draft.q, sampling, rng)
        else:
            v = accept_match(rows, draft.tokens, sampling, rng)
        return TreeVerdict(tuple(range(v.n_accepted)), v.token)

    def _tree_drafters(self) -> bool:
        return "medusa" in self.drafters or "eagle" in self.drafters

    def _busy(self) -> float:
        """Seconds this thread has waited on llama.cpp: inside llama_decode, or for the
        draft model's worker (its decodes while this thread went on do not count)."""
        draft = self.drafters.get("draft")
        return sum(c.busy_seconds for c in self._contexts) - (draft.hidden_seconds if draft is not None else 0.0)
