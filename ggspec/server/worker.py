"""The engine's one thread: requests wait in a bounded queue and generate one at a time.

A job's events (text pieces, then its Result or an exception) reach the request's event
loop through an asyncio queue. A job whose client went away leaves the queue at once (its
place is free for the next request) if it is still waiting, and its generation is closed
at its next piece if it is running.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from ..chat import Settings
from ..config import SpecConfig
from ..engine import Engine, Prompt, Result
from ..errors import GgspecError
from ..stats import Stats

log = logging.getLogger("ggspec.server")


class QueueFull(Exception):
    """Every place in the queue is taken; retry_after is an estimate in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: {retry_after} s estimated wait")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping and takes no more requests."""


class InternalError(Exception):
    """A bug: the generation failed for a reason that is not the request's fault."""


@dataclass(eq=False)
class Job:
    """One request's generation. Timestamps are time.perf_counter() values."""

    prompt: Prompt
    settings: Settings
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    cache_prompt: bool = True  # False: the prompt is computed afresh, with no cached prefix
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None      # when the engine took it
    first_piece: float | None = None  # when its first text piece was ready

    def send(self, event: str | Result | Exception) -> None:
        """Hand an event to the request's event loop (from the engine's thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    @property
    def queue_seconds(self) -> float:
        return (self.started or self.submitted) - self.submitted

    @property
    def first_token_seconds(self) -> float | None:
        """From submission to the first text piece: queue, prefill and the first round."""
        return None if self.first_piece is None else self.first_piece - self.submitted


@dataclass
class Totals:
    """What the worker did since it started."""

    stats: Stats = field(default_factory=Stats)  # summed over finished generations
    cancelled: int = 0                           # generations stopped because their client left
    first_token_seconds: float = 0.0             # summed over generations that wrote text
    first_tokens: int = 0                        # how many those are


class Worker:
    """Runs jobs on `engine`, one at a time, at most `max_queue` waiting; before the first,
    measures what generations with `spec` need (Engine.prepare, stopped when a job comes:
    its rounds take the rest)."""

    def __init__(self, engine: Engine, max_queue: int, spec: SpecConfig | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.engine = engine
        self._spec = spec  # measured for before the first job
        self._current: Job | None = None  # the job generating now
        self._totals = Totals()
        self._max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._lock = threading.Lock()  # guards _totals, _waiting, _current and _stopping
        self._changed = threading.Condition(self._lock)  # a job came or ended, or the worker stops
        self._stopping = False
        self._mean_seconds = 1.0  # moving average of a generation's duration, for Retry-After
        self._thread = threading.Thread(target=self._serve, name="ggspec-engine", daemon=True)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._current is not None

    def totals(self) -> Totals:
        with self._lock:
            return replace(self._totals)

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float = 0.0) -> None:
        """Refuse new jobs, answer the waiting ones that the server is shutting down, give
        the running one up to `grace` seconds to finish, then end it with the same answer,
        and wait for the thread. Called again, there is nothing more to do."""
        with self._changed:
            self._stopping = True
            waiting, self._waiting = self._waiting, deque()
            self._changed.notify_all()
        for job in waiting:
            job.cancelled.set()
            job.send(ShuttingDown("the server is shutting down"))
        with self._changed:
            self._changed.wait_for(lambda: self._current is None, timeout=grace)
            current = self._current
        if current is not None:
            current.cancelled.set()
            current.send(ShuttingDown("the server is shutting down"))
        self.engine.cancel()  # (also a measurement before the first job)
        self._thread.join()

    def submit(self, job: Job) -> None:
        with self._changed:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self._max_queue:
                raise QueueFull(max(1, math.ceil((len(self._waiting) + 1) * self._mean_seconds)))
            self._waiting.append(job)
            self._changed.notify()
        self.engine.end_prepare()  # the first request does not wait for the measurement ahead

    def withdraw(self, job: Job) -> None:
        """The job's client went away: a waiting job leaves the queue, a running one stops
        at its next piece."""
        with self._lock:
            job.cancelled.set()
            if job in self._waiting:
                self._waiting.remove(job)

    def _next(self) -> Job | None:
        """The next waiting job; None once the worker stops."""
        with self._changed:
            self._changed.wait_for(lambda: self._waiting or self._stopping)
            self._current = None if self._stopping else self._waiting.popleft()
            return self._current

    def _serve(self) -> None:
        try:  # what the first request would measure first, before it comes
            self.engine.prepare(self._spec)
        except Exception:  # (that request measures it then)
            log.exception("measuring the verification cost before the first request failed")
        while (job := self._next()) is not None:
            try:
                self._run(job)
            finally:
                with self._changed:
                    self._current = None
                    self._changed.notify_all()

    def _run(self, job: Job) -> None:
        job.started = time.perf_counter()
        s = job.settings
        gen = self.engine.stream(job.prompt, max_tokens=s.max_tokens, stop=job.stop, sampling=s.sampling,
                                 spec=s.spec, reuse_cache=job.cache_prompt)
        try:
            while not job.cancelled.is_set():
                try:
                    piece = next(gen)
                except StopIteration as done:
                    self._finished(job, done.value)
                    return
                if job.first_piece is None:
                    job.first_piece = time.perf_counter()
                job.send(piece)
            with self._lock:
                self._totals.cancelled += 1
        except (GgspecError, ValueError) as e:  # the request's fault: a 400
            job.send(e)
        except Exception:  # a bug: logged here, a plain 500 for the client
            log.exception("generation failed")
            job.send(InternalError("the generation failed; the server log has the details"))
        finally:
            gen.close()  # ends a cancelled generation and frees the engine

    def _finished(self, job: Job, result: Result) -> None:
        seconds = time.perf_counter() - job.started
        with self._lock:
            t = self._totals
            t.stats = t.stats + result.stats
            if job.first_token_seconds is not None:
                t.first_token_seconds += job.first_token_seconds
                t.first_tokens += 1
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds
        job.send(result)
