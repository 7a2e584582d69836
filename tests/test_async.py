"""Asynchronous drafting: the draft model drafts the next round in a worker thread while
the target verifies. Exactness as for the synchronous path, the worker's lifecycle, and
the controller's choice."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from ggspec import DecodeError, Engine, SamplingConfig, SpecConfig
from ggspec.bench import Variant, async_split_variants
from ggspec.cli import cli
from ggspec.controller import EXPLORE_EVERY, Overlap
from reference import assert_same_logits, first_divergence, greedy_reference
from test_engine import (CFG, END, GREEDY, assert_frequencies_match, engine, exact_first_two,  # noqa: F401
                         far_engine, random_prompt)  # engine, far_engine: fixtures, one instance per module

AHEAD = "ggspec-draft-ahead"
AHEAD2 = SpecConfig("draft", draft_max=2, async_draft=True)


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == AHEAD]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("which", ["engine", "far_engine"])
def test_greedy_drafting_ahead_equals_plain_greedy_decoding(request, target_path, which, k):
    eng = request.getfixturevalue(which)
    ahead = used = 0
    for seed in range(4):
        prompt = random_prompt(100 * k + seed)
        ref = greedy_reference(target_path, prompt, 40)
        got = eng.generate(prompt, max_tokens=40, sampling=GREEDY,
                           spec=SpecConfig("draft", draft_max=k, async_draft=True))
        problem = first_divergence(got.tokens, ref)
        assert problem is None, f"K={k} seed={seed}: {problem}"
        ahead += got.stats.ahead_rounds
        used += got.stats.ahead_drafts
    assert ahead > 20
    if which == "engine" and k <= 2:
        assert used > 5  # the worker's drafts were used, not only thrown away
    assert not workers()


def test_sampled_tokens_drafted_ahead_follow_the_target_distribution(engine, target_path):
    """K=1, 4 tokens: the first round verifies d1 while the worker drafts the draft
    model's guess g for the target's next token and then e1; when d1 is accepted and the
    target's token is g, round two verifies e1 with the q it was drawn from. Given the
    first token, the next two must follow the target exactly."""
    n = 20_000
    prompt = random_prompt(9, 6)
    sampling = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    spec = SpecConfig("draft", draft_max=1, async_draft=True)
    used = 0
    outcomes = np.zeros((n, 3), dtype=int)  # END: generation ended before
    for seed in range(n):
        got = engine.generate(prompt, max_tokens=4, spec=spec, sampling=SamplingConfig(**sampling, seed=seed))
        outcomes[seed] = (got.tokens + [END] * 3)[:3]
        used += got.stats.ahead_drafts
    first = np.bincount(outcomes[:, 0][outcomes[:, 0] != END]).argmax()
    given = outcomes[outcomes[:, 0] == first]
    assert used > n / 20 and len(given) > 1000
    p2, p3 = exact_first_two(target_path, prompt + [int(first)], 0.9, 0)
    for col, p in ((1, p2), (2, p3)):
        freq = np.bincount(given[:, col], minlength=len(p)) / len(given)
        assert np.all(freq[p == 0] == 0), "a sample fell outside the target's support"
        assert_frequencies_match(freq, p, len(given))


def test_draft_cache_after_rejected_speculation_matches_a_fresh_prefill(far_engine, other_path):
    """Rejected drafts and wrong guesses leave speculative cells in the draft's cache;
    rewinding them (llama_memory_seq_rm) must leave what a fresh prefill would."""
    prompt = random_prompt(3)
    got = far_engine.generate(prompt, max_tokens=60, sampling=SamplingConfig(temperature=1.0, seed=4),
                              spec=SpecConfig("draft", draft_max=4, async_draft=True))
    assert got.stats.draft_tokens - got.stats.accepted_tokens > 20 and got.stats.ahead_rounds > 10
    committed = prompt + got.tokens
    ctx = far_engine.drafters["draft"].ctx
    n = min(ctx.sync(committed), len(committed) - 1)  # what the next round's propose does first
    assert n > len(prompt) + 40  # most of the cache is the generation's own
    ctx.truncate(n)
    cached = ctx.eval(committed[n:], logits="last")[0].copy()
    fresh = greedy_reference(other_path, prompt, 1, forced=got.tokens).logits[0]
    assert_same_logits(cached, fresh)


def slow_worker(eng: Engine, monkeypatch) -> None:
    """Each decode of the worker takes 0.2 s longer: a worker left running would still be
    alive when the generation returns."""
    ctx = eng.drafters["draft"].ctx
    real_eval = ctx.eval

    def slow_eval(tokens, **kw):
        if threading.current_thread().name == AHEAD:
            time.sleep(0.2)
        return real_eval(tokens, **kw)

    monkeypatch.setattr(ctx, "eval", slow_eval)


def test_closing_a_stream_mid_generation_joins_the_worker(engine, target_path, monkeypatch):
    slow_worker(engine, monkeypatch)
    prompt = random_prompt(5)
    stream = engine.stream(prompt, max_tokens=40, sampling=GREEDY, spec=AHEAD2)
    for _ in range(3):
        next(stream)
    stream.close()
    assert not workers()
    monkeypatch.undo()
    # the engine is free and its caches consistent: the next answer is still exact
    got = engine.generate(prompt, max_tokens=30, sampling=GREEDY, spec=AHEAD2)
    assert first_divergence(got.tokens, greedy_reference(target_path, prompt, 30)) is None


def test_cancel_mid_generation_joins_the_worker(engine, monkeypatch):
    slow_worker(engine, monkeypatch)
    cancel = threading.Event()
    seen = []

    def on_text(piece):
        seen.append(piece)
        return len(seen) == 3

    got = engine.generate(random_prompt(6), max_tokens=40, sampling=GREEDY, on_text=on_text, cancel=cancel,
                          spec=AHEAD2)
    assert got.finish_reason == "cancelled" and not workers()


@pytest.mark.parametrize("where", ["callback", "other thread"])
def test_close_mid_generation_joins_the_worker(target_path, draft_path, where, monkeypatch):
    eng = Engine(target_path, draft_path, target_config=CFG)
    slow_worker(eng, monkeypatch)
    started = threading.Event()

    def on_text(piece):
        started.set()
        if where == "callback":
            eng.close()

    result = {}
    thread = threading.Thread(target=lambda: result.update(r=eng.generate(
        random_prompt(7), max_tokens=200, sampling=GREEDY, on_text=on_text,
        spec=SpecConfig("draft", draft_max=3, async_draft=True))))
    thread.start()
    assert started.wait(30)
    if where == "other thread":
        eng.close()
    thread.join(30)
    assert not thread.is_alive() and result["r"].finish_reason == "cancelled"
    assert not workers()


def test_an_interrupted_wait_for_the_worker_still_joins_it(engine, monkeypatch):
    """Ctrl-C while the generating thread waits for the worker: the worker is still
    joined before the generation ends (a second owner of the draft's context otherwise)."""
    slow_worker(engine, monkeypatch)
    real_join = threading.Thread.join
    interrupted = []

    def join(self, timeout=None):
        if self.name == AHEAD and not interrupted:
            interrupted.append(self)
            raise KeyboardInterrupt
        return real_join(self, timeout)

    monkeypatch.setattr(threading.Thread, "join", join)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(random_prompt(12), max_tokens=40, sampling=GREEDY, spec=AHEAD2)
    assert interrupted and not workers()


def test_an_error_in_the_worker_is_raised_in_the_generating_thread(engine, target_path, monkeypatch):
    ctx = engine.drafters["draft"].ctx
    real_eval = ctx.eval

    def failing_eval(tokens, **kw):
        if threading.current_thread().name == AHEAD:
            raise DecodeError("llama_decode failed with code 1: test failure")
        return real_eval(tokens, **kw)

    monkeypatch.setattr(ctx, "eval", failing_eval)
    prompt = random_prompt(8)
    with pytest.raises(DecodeError, match="test failure") as err:
        engine.generate(prompt, max_tokens=40, sampling=GREEDY, spec=AHEAD2)
    assert "worker thread" in "".join(err.value.__notes__)
    assert not workers()
    monkeypatch.undo()
    got = engine.generate(prompt, max_tokens=30, sampling=GREEDY, spec=AHEAD2)
    assert first_divergence(got.tokens, greedy_reference(target_path, prompt, 30)) is None


def test_how_far_the_worker_got_does_not_change_the_draft_rng(engine, monkeypatch):
    """A seeded run replays exactly only if the draws of the generating thread do not
    depend on where the worker was stopped."""
    drafter, tokens = engine.drafters["draft"], random_prompt(13)
    drafter.prepare(tokens)
    sampling = SamplingConfig(temperature=1.0)
    states = []
    for slow in (False, True):
        rng = np.random.default_rng(5)
        drafter.propose_ahead(tokens, 6, sampling, rng)
        if slow:
            slow_worker(engine, monkeypatch)  # from its next decode: stopped after one token
            drafter.stop()
        else:
            time.sleep(0.5)  # it drafts all 7 tokens
            drafter.stop()
        states.append(rng.bit_generator.state)
    assert states[0] == states[1]


def test_the_controller_keeps_seeded_sampling_synchronous(far_engine):
    def run(spec: SpecConfig):
        return far_engine.generate(random_prompt(13), max_tokens=40, spec=spec,
                                   sampling=SamplingConfig(temperature=1.0, seed=5))

    chosen = run(SpecConfig("draft", draft_max=3))
    assert chosen.stats.ahead_rounds == 0
    assert chosen.tokens == run(SpecConfig("draft", draft_max=3, async_draft=False)).tokens


def test_forcing_off_never_drafts_ahead_and_auto_reports_its_measurements(engine):
    prompt = random_prompt(10)
    off = engine.generate(prompt, max_tokens=30, sampling=GREEDY,
                          spec=SpecConfig("draft", draft_max=2, async_draft=False))
    assert off.stats.ahead_rounds == 0 and off.stats.controller is None
    engine.costs.overlap = Overlap()  # a fresh controller tries both ways
    auto = engine.generate(prompt, max_tokens=60, sampling=GREEDY, spec=SpecConfig("draft", draft_max=2))
    assert 0 < auto.stats.ahead_rounds < auto.stats.rounds
    measured = auto.stats.controller["async_draft"]
    assert measured["sync_rounds"] >= Overlap.TRIAL and measured["async_rounds"] > 0


def test_async_draft_is_validated_and_other_methods_ignore_it(engine):
    with pytest.raises(ValueError, match="async_draft"):
        SpecConfig("draft", async_draft="yes")
    got = engine.generate(random_prompt(11), max_tokens=20, sampling=GREEDY,
                          spec=SpecConfig("auto", draft_max=2, async_draft=True))
    assert got.stats.ahead_rounds == 0


def run_overlap(overlap: Overlap, rounds: int, seconds: dict[bool, float]) -> list[bool]:
    ways = []
    for _ in range(rounds):
        way = overlap.choose()
        overlap.observe(way, seconds[way], 2)
        ways.append(way)
    return ways


@pytest.mark.parametrize("faster", [False, True])
def test_overlap_takes_the_faster_way_and_retries_the_other(faster):
    overlap = Overlap()
    ways = run_overlap(overlap, 2 * Overlap.TRIAL + 1 + 2 * EXPLORE_EVERY, {faster: 0.05, not faster: 0.08})
    assert ways[:Overlap.TRIAL] == [False] * Overlap.TRIAL  # tried each way first
    assert overlap.faster == faster
    tail = ways[2 * Overlap.TRIAL + 1:]
    assert tail.count(faster) > tail.count(not faster) > 0  # mostly the faster, the other re-tried


def test_overlap_does_not_count_the_round_after_a_switch():
    overlap = Overlap()
    overlap.observe(True, 9.0, 1)  # first asynchronous round: it drafted for itself
    assert overlap.rounds == [0, 0]
    overlap.observe(True, 0.05, 2)
    assert overlap.rounds == [0, 1] and overlap.seconds[1] == 0.05


def test_overlap_state_round_trips_and_takes_counts_saved_as_floats():
    overlap = Overlap()
    run_overlap(overlap, 20, {False: 0.08, True: 0.05})
    again = Overlap()
    again.set_state(json.loads(json.dumps(overlap.state())))
    assert again == overlap and again.report() == overlap.report() and again.choose() == overlap.choose()
    older = {**overlap.state(), "rounds": [float(n) for n in overlap.rounds]}  # as numpy arrays saved them
    again.set_state(older)
    assert again.rounds == overlap.rounds and all(isinstance(n, int) for n in again.rounds)
    with pytest.raises(ValueError, match="shape"):
        again.set_state({**older, "seconds": [0.1]})


def test_threads_can_be_changed_between_generations(engine):
    loaded = engine.threads
    engine.set_threads(2, 1)
    assert engine.threads == (2, 1) and engine.ctx.n_threads == 2
    engine.set_threads(*loaded)
    assert engine.threads == loaded


def test_async_split_variants():
    grid = async_split_variants([2, 4], 2)
    assert grid[0] == Variant("none", threads=(2, 2))
    assert Variant("draft", 4, False, (2, 2)) in grid and Variant("draft", 4, True, (1, 1)) in grid
    assert grid[-1].label == "draft k=4 async t1+1"
    with pytest.raises(ValueError, match="at least 2"):
        async_split_variants([2], 1)


def test_bench_async_split_command(target_path, draft_path):
    got = CliRunner().invoke(cli, ["bench", "-m", target_path, "-d", draft_path, "--threads", "2", "-w", "code",
                                   "-n", "6", "-k", "2", "--async-split", "--allow-busy", "--json"])
    assert got.exit_code == 0, got.output

    rows = json.loads(got.stdout)["rows"]
    assert [r["variant"] for r in rows] == ["none t2", "draft k=2 sync t2+2", "draft k=2 async t1+1"]
    assert rows[2]["stats"]["ahead_rounds"] > 0 and rows[1]["stats"]["ahead_rounds"] == 0


def test_cli_run_with_async_draft_and_draft_threads(target_path, draft_path):
    got = CliRunner().invoke(cli, ["run", "-m", target_path, "-d", draft_path, "--threads", "1", "--draft-threads",
                                   "1", "--method", "draft", "-k", "2", "--async-draft", "-t", "0", "-n", "40", "--raw",
                                   "--json", "hello"])
    assert got.exit_code == 0, got.output

    assert json.loads(got.stdout)["stats"]["ahead_rounds"] > 0
    refused = CliRunner().invoke(cli, ["run", "-m", target_path, "-d", draft_path, "--method", "lookup",
                                       "--async-draft", "hello"])
    assert refused.exit_code != 0 and "--method draft" in refused.output


def test_decodes_drafted_ahead_during_the_verification_are_not_counted_as_waiting(engine, monkeypatch):
    """llama_seconds is the time the engine waited on llama.cpp: the worker's decodes that
    ran while the target verified are hidden, so the Python overhead stays the rest.
    Here each target decode takes 40 ms and each draft decode 5 ms: the worker's chain
    of up to 3 decodes fits inside the verification."""
    import ggspec.backend as backend

    decode = backend.llama_cpp.llama_decode
    target = engine.ctx.handle

    def slow(handle, batch):
        time.sleep(0.04 if handle == target else 0.005)
        return decode(handle, batch)

    monkeypatch.setattr(backend.llama_cpp, "llama_decode", slow)
    draft = engine.drafters["draft"]
    hidden = draft.hidden_seconds
    got = engine.generate(random_prompt(11), max_tokens=24, sampling=GREEDY, spec=AHEAD2)
    s = got.stats
    assert s.ahead_rounds > 5
    assert draft.hidden_seconds - hidden > 0.005 * s.ahead_rounds  # at least one draft decode a round was hidden
    assert 0 < s.llama_seconds < s.decode_seconds
    assert 0 < s.overhead_seconds < 0.3 * s.decode_seconds


@pytest.mark.parametrize("started", [False, True])
def test_an_interrupted_start_of_the_worker_leaves_the_drafter_usable(engine, target_path, started, monkeypatch):
    """Ctrl-C inside Thread.start(), before the worker ran or while it was starting: the
    drafter does not wait for a thread join() refuses, and a worker that runs leaves the
    draft's context alone (it has no owner that would join it)."""
    drafter, tokens = engine.drafters["draft"], random_prompt(14)
    drafter.prepare(tokens)
    before = list(drafter.ctx.tokens)
    busy = drafter.ctx.busy_seconds
    real_start = threading.Thread.start

    def start(self):
        if started:
            real_start(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(KeyboardInterrupt):
        drafter.propose_ahead(tokens, 4, GREEDY, np.random.default_rng(0))
    monkeypatch.undo()
    drafter.stop()
    for worker in workers():
        worker.join()
    assert drafter.ctx.tokens == before and drafter.ctx.busy_seconds == busy
    got = engine.generate(tokens, max_tokens=20, sampling=GREEDY, spec=AHEAD2)
    assert first_divergence(got.tokens, greedy_reference(target_path, tokens, 20)) is None
