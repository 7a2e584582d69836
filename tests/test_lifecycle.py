"""The engine's life on tiny generated models: callbacks that raise, close() (also from
another thread), cancel handles, interrupts between the KV cache and its mirror, and
settings refused up front."""

from __future__ import annotations

import threading

import llama_cpp
import pytest

from ggspec import BackendConfig, Engine, EngineClosedError, SamplingConfig, SpecConfig
from ggspec.backend import Context, Model
from ggspec.chat import ChatSession, Settings
from reference import assert_same_logits, greedy_reference
from test_engine import CFG, GREEDY, random_prompt


@pytest.fixture(scope="module")
def engine(target_path, draft_path):
    with Engine(target_path, draft_path, target_config=CFG) as e:
        yield e


def fail(piece: str) -> None:
    raise RuntimeError("the callback failed")


@pytest.fixture
def own_engine(target_path, draft_path):
    """An engine for one test (a test that fails may leave it locked)."""
    with Engine(target_path, draft_path, target_config=CFG) as e:
        yield e


def test_a_callback_that_raises_leaves_the_engine_free(own_engine):
    with pytest.raises(RuntimeError, match="callback failed") as kept:
        own_engine.generate(random_prompt(1), max_tokens=20, sampling=GREEDY, on_text=fail)
    # `kept` holds the traceback, and with it generate()'s frame and its stream
    assert kept.value.__traceback__ is not None
    got = own_engine.generate(random_prompt(2), max_tokens=3, sampling=GREEDY, wait=False)  # BusyError if held
    assert len(got.tokens) == 3


def test_a_chat_callback_that_raises_leaves_the_engine_free(own_engine):
    session = ChatSession(own_engine, Settings(GREEDY, SpecConfig("draft"), max_tokens=20))
    with pytest.raises(RuntimeError, match="callback failed") as kept:
        session.ask("hello world", on_text=fail)
    assert kept.value.__traceback__ is not None
    got = own_engine.generate(random_prompt(3), max_tokens=3, sampling=GREEDY, wait=False)
    assert len(got.tokens) == 3


def test_a_closed_engine_raises_a_clear_error(target_path, draft_path):
    with Engine(target_path, draft_path, target_config=CFG) as eng:
        eng.generate(random_prompt(4), max_tokens=2)
    calls = {"generate": lambda: eng.generate(random_prompt(4), max_tokens=2),
             "stream": lambda: next(eng.stream(random_prompt(4))),
             "tokenize": lambda: eng.tokenize("hello world")}
    for name, call in calls.items():
        with pytest.raises(EngineClosedError, match="the engine is closed"):
            call()
    eng.close()  # again: nothing to do


def test_closed_backend_objects_refuse_to_touch_freed_memory(target_path):
    model = Model(target_path)
    ctx = Context(model, CFG)
    ctx.eval(random_prompt(5), logits="none")
    ctx.close()
    for call in (lambda: ctx.truncate(0), ctx.clear, lambda: ctx.seq_rm(0), lambda: ctx.eval([1])):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    model.close()
    for call in (lambda: model.tokenize("hello"), lambda: model.token_bytes(300), lambda: model.token_text(300)):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_close_from_another_thread_cancels_the_generation_and_waits_for_it(target_path, draft_path):
    eng = Engine(target_path, draft_path, target_config=CFG)
    started = threading.Event()
    results = []

    def generate() -> None:
        results.append(eng.generate(random_prompt(6), max_tokens=450, sampling=GREEDY,
                                    spec=SpecConfig("draft", draft_max=2), on_text=lambda piece: started.set()))

    worker = threading.Thread(target=generate)
    worker.start()
    assert started.wait(10)
    eng.close()  # frees the contexts only once the generation has ended
    worker.join(10)
    assert results and results[0].finish_reason == "cancelled"
    assert len(results[0].tokens) < 450
    assert eng.ctx._handle is None and eng.target._handle is None
    with pytest.raises(EngineClosedError):
        eng.generate(random_prompt(6), max_tokens=2)


def test_close_from_a_callback_ends_the_generation_then_frees_the_engine(target_path, draft_path):
    eng = Engine(target_path, draft_path, target_config=CFG)
    got = eng.generate(random_prompt(7), max_tokens=100, sampling=GREEDY, on_text=lambda piece: eng.close())
    assert got.finish_reason == "cancelled" and 0 < len(got.tokens) < 100
    assert eng.ctx._handle is None and eng.target._handle is None


def test_engine_cancel_stops_the_running_generation_and_not_the_waiting_one(engine):
    running = engine.stream(random_prompt(8), max_tokens=40, sampling=GREEDY)
    next(running)  # holds the engine
    results = []
    waiter = threading.Thread(target=lambda: results.append(
        engine.generate(random_prompt(9), max_tokens=10, sampling=GREEDY)))
    waiter.start()
    waiter.join(0.2)
    engine.cancel()
    pieces = list(iter(lambda: next(running, None), None))
    assert len(pieces) < 39
    waiter.join(10)
    assert results and results[0].finish_reason == "length" and len(results[0].tokens) == 10


def test_a_cancel_sent_while_waiting_for_the_engine_is_kept(engine):
    running = engine.stream(random_prompt(10), max_tokens=10, sampling=GREEDY)
    next(running)
    cancel = threading.Event()
    results = []
    waiter = threading.Thread(target=lambda: results.append(
        engine.generate(random_prompt(11), max_tokens=10, sampling=GREEDY, cancel=cancel)))
    waiter.start()
    waiter.join(0.2)
    cancel.set()  # meant for the waiting call, not for the running one
    rest = []
    while True:
        try:
            rest.append(next(running))
        except StopIteration as done:
            assert done.value.finish_reason == "length"
            break
    waiter.join(10)
    assert results and results[0].finish_reason == "cancelled" and results[0].tokens == []


def test_a_cancel_handle_stops_its_own_generation(engine):
    cancel = threading.Event()
    got = engine.generate(random_prompt(12), max_tokens=100, sampling=GREEDY, cancel=cancel,
                          on_text=lambda piece: cancel.set())
    assert got.finish_reason == "cancelled" and len(got.tokens) < 100
    assert engine.generate(random_prompt(12), max_tokens=5, sampling=GREEDY).finish_reason == "length"


# ---- an interrupt (Ctrl-C) between the KV cache and its mirror `Context.tokens`

def interrupted_after(monkeypatch, name: str) -> None:
    """Make llama_cpp.<name> do its work, then raise KeyboardInterrupt (as a Ctrl-C that
    arrives right after the C call returns)."""
    real = getattr(llama_cpp, name)

    def call(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(llama_cpp, name, call)


def assert_cache_holds_its_mirror(ctx: Context, model_path: str) -> None:
    """The cache answers the next token as a fresh prefill of ctx.tokens does."""
    n = len(ctx.tokens)
    nxt = 400
    got = ctx.eval([nxt], logits="last")[0].copy()
    ctx.truncate(n)
    fresh = greedy_reference(model_path, ctx.tokens + [nxt], 1).logits[0]
    assert_same_logits(got, fresh)


@pytest.mark.parametrize("what,name", [("truncate", "llama_memory_seq_rm"), ("clear", "llama_memory_clear"),
                                       ("eval", "llama_decode")])
def test_an_interrupt_leaves_the_mirror_a_prefix_of_the_cache(monkeypatch, target_path, what, name):
    prompt = random_prompt(13, 30)
    with Model(target_path) as model, Context(model, CFG) as ctx:
        ctx.eval(prompt[:20], logits="none")
        interrupted_after(monkeypatch, name)
        with pytest.raises(KeyboardInterrupt):
            {"truncate": lambda: ctx.truncate(10), "clear": ctx.clear,
             "eval": lambda: ctx.eval(prompt[20:25], logits="none")}[what]()
        monkeypatch.undo()
        assert ctx.tokens == prompt[:len(ctx.tokens)]
        assert_cache_holds_its_mirror(ctx, target_path)  # no sync needed first
        n = ctx.sync(prompt)
        ctx.eval(prompt[n:], logits="none")
        assert ctx.tokens == prompt
        assert_cache_holds_its_mirror(ctx, target_path)


# ---- settings refused up front

def test_a_draft_context_smaller_than_the_targets_is_refused(target_path, draft_path):
    with pytest.raises(ValueError, match=r"draft's context \(256 tokens\) is smaller than the target's \(512\)"):
        Engine(target_path, draft_path, target_config=CFG, draft_config=BackendConfig(n_ctx=256, n_threads=1))


def test_a_batch_smaller_than_a_verification_is_refused(target_path, draft_path):
    small = BackendConfig(n_ctx=512, n_batch=4, n_threads=1)
    with pytest.raises(ValueError, match=r"n_batch 4 is below draft_max \+ 1 = 9"):
        Engine(target_path, draft_path, target_config=small, spec=SpecConfig(draft_max=8))
    with Engine(target_path, draft_path, target_config=small, spec=SpecConfig("none")) as eng:
        assert len(eng.generate(random_prompt(14), max_tokens=5, sampling=GREEDY).tokens) == 5
        with pytest.raises(ValueError, match=r"n_batch 4 is below draft_max \+ 1 = 5"):
            eng.generate(random_prompt(14), max_tokens=5, spec=SpecConfig("draft", draft_max=4))
        assert len(eng.generate(random_prompt(14), max_tokens=5, spec=SpecConfig("draft", draft_max=3)).tokens) == 5


def test_a_stop_given_as_one_string_is_one_stop_string(engine):
    prompt = random_prompt(15)
    full = engine.generate(prompt, max_tokens=40, sampling=GREEDY)
    stop = full.text[20:24]
    got = engine.generate(prompt, max_tokens=40, sampling=GREEDY, stop=stop)
    assert got.finish_reason == "stop"
    assert got.text == full.text[:full.text.index(stop)]


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-5, 0.0009])
def test_a_temperature_too_small_to_sample_with_is_refused(temperature):
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or at least 0.001"):
        SamplingConfig(temperature=temperature)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_ignore_eos_must_be_a_boolean(value):
    with pytest.raises(ValueError, match=f"ignore_eos must be true or false, got {value!r}"):
        SamplingConfig(ignore_eos=value)


def test_the_smallest_temperature_samples(engine):
    got = engine.generate(random_prompt(16), max_tokens=20, sampling=SamplingConfig(temperature=0.001, seed=1),
                          spec=SpecConfig("draft", draft_max=3))
    assert len(got.tokens) == 20
