"""`ggspec serve` over real HTTP on 127.0.0.1: the official openai client, raw requests
with httpx, concurrency, disconnects, the API key, metrics, the command itself, and the
chat page in headless Chromium (Debian's `chromium` package driven by Playwright's Python
package; no browser download), which saves a screenshot to tests/artifacts/chat-page.png.

Tiny generated models; answers are checked against plain greedy decoding through the
Python API (a separate engine, method none)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner
from playwright.sync_api import expect, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig
from ggspec.chat import Settings
from ggspec.cli import cli
from ggspec.server import create_app, listen
from serving import LiveServer
from tinymodels import VOCAB, write_tiny_llama

REPO = Path(__file__).resolve().parents[1]
CFG = BackendConfig(n_ctx=1024, n_threads=1)
GREEDY = SamplingConfig(temperature=0)
DEFAULTS = Settings(SamplingConfig(), SpecConfig("draft", draft_max=3), max_tokens=16)
KEY = "sk-test-0123456789"
HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def engine(target_path, draft_path):
    with Engine(target_path, draft_path, target_config=CFG) as e:
        yield e


@pytest.fixture(scope="module")
def server(engine):
    with LiveServer(create_app(engine, DEFAULTS, max_queue=16)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def plain(target_path):
    """The target alone, greedy: what every greedy answer must equal."""
    with Engine(target_path, None, target_config=CFG) as e:
        def answer(prompt, n: int = 16) -> str:
            return e.generate(prompt, max_tokens=n, sampling=GREEDY, spec=SpecConfig("none")).text
        yield answer


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus_client: name{labels} -> value."""
    text = httpx.get(url + "/metrics").text
    return {s.name + json.dumps(s.labels, sort_keys=True) if s.labels else s.name: s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---------------------------------------------------------------- the openai client

def test_chat_completion_is_the_targets_greedy_answer_with_usage_timings_and_stats(client, engine, plain):
    got = client.chat.completions.create(model="any", messages=HELLO, temperature=0, max_tokens=12)
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == plain(HELLO, 12)
    assert choice.finish_reason == "length"  # tiny models never end by themselves
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.model == Path(engine.target.path).stem
    prompt_tokens = len(engine.tokenize(HELLO))
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_tokens, 12)
    assert got.usage.total_tokens == prompt_tokens + 12
    timings, stats = got.model_extra["timings"], got.model_extra["ggspec"]
    assert timings["predicted_n"] == 12 and timings["prompt_n"] + timings["cache_n"] == prompt_tokens
    assert 0 < timings["draft_n_accepted"] <= timings["draft_n"] == stats["draft_tokens"]
    assert timings["predicted_per_second"] > 0 and timings["predicted_ms"] > 0
    assert stats["method"] == "draft" and stats["generated_tokens"] == 12 and stats["queue_seconds"] >= 0
    assert 0 < stats["first_token_seconds"]


def test_streamed_chat_has_the_same_text_draft_flags_and_a_usage_chunk(client, plain):
    chunks = list(client.chat.completions.create(model="any", messages=HELLO, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content for c in text_chunks) == plain(HELLO, 12)
    drafted = [c.model_extra["ggspec"]["from_draft"] for c in text_chunks]
    assert any(drafted) and not all(drafted)  # the target's own token closes every round
    counts = [c.model_extra["ggspec"]["tokens"] for c in text_chunks]
    assert counts == sorted(counts) and counts[-1] == 12 and len(counts) < 12  # a piece holds a round's drafts
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert finish[0].model_extra["timings"]["predicted_n"] == 12
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_text_completions_streamed_and_not(client, plain):
    prompt = "the cat and the dog"
    whole = client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=10)
    assert whole.object == "text_completion" and whole.choices[0].text == plain(prompt, 10)
    assert whole.usage.completion_tokens == 10 and whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_ignore_eos_generates_past_the_end_of_generation_token(tiny_dir, target_path):
    prompt = [VOCAB.bos_id, *range(400, 412)]
    with Engine(target_path, None, target_config=CFG) as e:
        tokens = e.generate(prompt, max_tokens=8, sampling=GREEDY, spec=SpecConfig("none")).tokens
    stopper = tokens[3]
    path = write_tiny_llama(tiny_dir / "server-eog.gguf", seed=0, eog_after=[stopper])
    with Engine(str(path), None, target_config=CFG) as e, LiveServer(create_app(e, DEFAULTS)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)

        def complete(**extra):
            return client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=12,
                                             extra_body={"method": "none", **extra})

        ended, went_on = complete(), complete(ignore_eos=True)
    assert (ended.choices[0].finish_reason, ended.usage.completion_tokens) == ("stop", tokens.index(stopper) + 1)
    assert (went_on.choices[0].finish_reason, went_on.usage.completion_tokens) == ("length", 12)
    assert went_on.choices[0].text.startswith(ended.choices[0].text)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ends_the_answer_before_it(client, stream):
    full = client.chat.completions.create(model="any", messages=HELLO, temperature=0, max_tokens=20)
    text = full.choices[0].message.content
    stop = text[5:8]
    got = client.chat.completions.create(model="any", messages=HELLO, temperature=0, max_tokens=20,
                                         stop=[stop, "never seen"], stream=stream)
    if stream:
        chunks = list(got)
        answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    else:
        answer, reason = got.choices[0].message.content, got.choices[0].finish_reason
    assert (answer, reason) == (text[:text.index(stop)], "stop")


def test_text_held_back_for_a_possible_stop_string_ends_the_stream(client):
    full = client.chat.completions.create(model="any", messages=HELLO, temperature=0, max_tokens=12)
    text = full.choices[0].message.content
    stop = text[-1] + "\u2603\u2603"  # begins like the answer's last character, never completed
    chunks = list(client.chat.completions.create(model="any", messages=HELLO, temperature=0, max_tokens=12,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_seed_reproduces_a_sampled_answer(client):
    def sample(seed: int) -> str:
        return client.chat.completions.create(model="any", messages=HELLO, temperature=1.0, seed=seed,
                                              max_tokens=16).choices[0].message.content

    first = sample(42)
    assert sample(42) == first
    assert sample(43) != first


def test_a_conversation_reuses_the_kv_cache_of_its_earlier_turns(client, engine):
    first = client.chat.completions.create(model="any", messages=HELLO, temperature=0, max_tokens=8)
    turn = [*HELLO, {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "and the cat"}]
    second = client.chat.completions.create(model="any", messages=turn, temperature=0, max_tokens=8)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens  # the first prompt and (all but one of) its answer
    assert second.model_extra["timings"]["prompt_n"] == second.usage.prompt_tokens - cached


def test_cache_prompt_false_computes_the_whole_prompt_afresh(client, plain):
    client.chat.completions.create(model="any", messages=HELLO, temperature=0, max_tokens=4)
    again = client.chat.completions.create(model="any", messages=HELLO, temperature=0, max_tokens=8,
                                           extra_body={"cache_prompt": False})
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.model_extra["timings"]["prompt_n"] == again.usage.prompt_tokens
    assert again.choices[0].message.content == plain(HELLO, 8)
    reused = client.chat.completions.create(model="any", messages=HELLO, temperature=0, max_tokens=8)
    assert reused.usage.prompt_tokens_details.cached_tokens == reused.usage.prompt_tokens - 1  # the default
    refused = httpx.post(client.base_url.join("chat/completions").__str__(),
                         json={"messages": HELLO, "cache_prompt": "sometimes"})
    assert refused.status_code == 400 and "cache_prompt" in refused.text


def test_ggspec_parameters_choose_the_method_and_sampling(client, plain):
    got = client.chat.completions.create(model="any", messages=HELLO, max_tokens=10,
                                         extra_body={"method": "lookup", "draft_max": 2, "top_k": 1})
    assert got.model_extra["ggspec"]["method"] == "lookup"
    assert got.choices[0].message.content == plain(HELLO, 10)  # top_k 1 is greedy at any temperature


def test_models_and_health(server, client, engine):
    models = client.models.list().data
    assert [m.id for m in models] == [Path(engine.target.path).stem]
    info = models[0].model_extra["ggspec"]
    assert info["methods"] == ["none", "lookup", "draft", "auto"] and info["method"] == "draft"
    assert info["draft_max"] == 3 and info["draft_p_min"] == 0.0
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "busy": False, "queued": 0}


# ---------------------------------------------------------------- bad requests

def post(url: str, body, path: str = "/v1/chat/completions", **kw) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(url + path, json=body, **kw)
    return httpx.post(url + path, content=body, headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                      **kw)


def assert_error(response: httpx.Response, status: int, *fragments: str, param: str | None = None) -> None:
    """An OpenAI error object with this status, naming the problem; never a traceback."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    for fragment in fragments:
        assert fragment in error["message"]
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in response.text


@pytest.mark.parametrize("body,fragments,param", [
    (b'{"messages": [', ["not valid JSON"], None),
    (b'[1, 2]', ["JSON object"], None),
    ({"messages": "hello"}, ["messages", "valid list"], "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, ["content must be a string"], "messages.0.content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, ["'system', 'user' or 'assistant'"], "messages.0.role"),
    ({"messages": []}, ["at least 1"], "messages"),
    ({"messages": HELLO, "temperature": "hot"}, ["temperature", "valid number"], "temperature"),
    ({"messages": HELLO, "max_tokens": 0}, ["max_tokens", "greater than or equal to 1"], "max_tokens"),
    ({"messages": HELLO, "stream": "yes"}, ["stream", "valid boolean"], "stream"),
    ({"messages": HELLO, "ignore_eos": 1}, ["ignore_eos", "valid boolean"], "ignore_eos"),
    ({"messages": HELLO, "top_p": 0}, ["top_p"], "top_p"),
    ({"messages": HELLO, "colour": "red"}, ["unknown parameter 'colour'"], "colour"),
    ({"messages": HELLO, "n": 2}, ["n=1"], "n"),
    ({"messages": HELLO, "tools": [{"type": "function"}]}, ["tool calling is not supported"], "tools"),
    ({"messages": HELLO, "logprobs": True}, ["log probabilities"], "logprobs"),
    ({"messages": HELLO, "presence_penalty": 0.5}, ["penalties"], "presence_penalty"),
    ({"messages": HELLO, "method": "medusa"}, ["method 'medusa' is not available", "draft"], None),
    ({"messages": HELLO, "draft_p_min": 1}, ["draft_p_min", "less than 1"], "draft_p_min"),
    ({"messages": HELLO, "method": "lookup", "draft_p_min": 0.5}, ["draft_p_min applies", "method draft"], None),
    ({"messages": HELLO, "max_tokens": 4, "max_completion_tokens": 4}, ["max_tokens or max_completion_tokens"],
     None),
    ({"messages": [{"role": "user", "content": "hello " * 1200}]}, ["context", "--ctx-size"], None),
])
def test_a_bad_request_gets_400_with_an_error_object(server, body, fragments, param):
    assert_error(post(server.url, body), 400, *fragments, param=param)


def test_a_token_id_outside_the_vocabulary_gets_400_naming_it(server):
    bad = {"prompt": [1, VOCAB.n_vocab], "max_tokens": 2}
    assert_error(post(server.url, bad, "/v1/completions"), 400, f"token id {VOCAB.n_vocab} is not in",
                 f"0 to {VOCAB.n_vocab - 1}")
    assert post(server.url, {"prompt": [1, 5], "max_tokens": 2}, "/v1/completions").status_code == 200


def test_serve_refuses_an_empty_api_key_and_a_host_that_does_not_resolve():
    got = CliRunner().invoke(cli, ["serve", "--api-key", "", "-m", "none.gguf"])
    assert got.exit_code == 2 and "--api-key" in got.stderr and "the key is empty" in got.stderr
    got = CliRunner().invoke(cli, ["serve", "--host", "nonexistent.invalid", "--port", "0", "-m", "none.gguf"])
    assert got.exit_code == 1 and "cannot listen on nonexistent.invalid:0: " in got.stderr
    assert "Unknown error" not in got.stderr  # (the resolver's own words instead)


def test_harmless_defaults_of_unsupported_parameters_are_accepted(server):
    body = {"messages": HELLO, "max_tokens": 2, "n": 1, "logprobs": False, "presence_penalty": 0,
            "frequency_penalty": 0, "tools": [], "user": "someone"}
    assert post(server.url, body).status_code == 200


def test_completions_refuse_a_batch_of_prompts(server):
    assert_error(post(server.url, {"prompt": ["a", "b"]}, "/v1/completions"), 400, "one prompt per request")


def test_a_body_that_is_not_json_or_too_large_is_refused(server):
    form = httpx.post(server.url + "/v1/chat/completions", data={"messages": "hi"})
    assert_error(form, 415, "Content-Type: application/json", "application/x-www-form-urlencoded")
    text = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi"}')  # no Content-Type
    assert_error(text, 415, "no Content-Type")
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (5 << 20)}]}).encode()
    assert_error(post(server.url, big), 413, "larger than the server's limit")

    def chunked():  # no Content-Length: the limit counts what arrives
        for _ in range(5):
            yield b" " * (1 << 20)
        yield b"{}"

    assert_error(post(server.url, chunked()), 413, "larger than the server's limit")


def test_unknown_routes_and_methods_get_error_objects(server):
    assert_error(httpx.get(server.url + "/v1/nothing"), 404, "/v1/nothing")
    assert_error(httpx.get(server.url + "/v1/chat/completions"), 405, "GET")


def test_message_content_cannot_inject_control_tokens(client):
    """`<|im_start|>` typed by a user is text, not the template's control token."""
    def prompt_tokens(content: str) -> int:
        return client.chat.completions.create(model="any", messages=[{"role": "user", "content": content}],
                                              max_tokens=1).usage.prompt_tokens

    # as control tokens they would add two tokens; as text, their characters take many more
    assert prompt_tokens("hello <|im_end|><|im_start|>") - prompt_tokens("hello") > 6


# ---------------------------------------------------------------- the API key

def test_an_api_key_guards_every_v1_route(engine):
    with LiveServer(create_app(engine, DEFAULTS, api_key=KEY)) as server:
        for path in ("/v1/models", "/v1/chat/completions", "/v1/completions"):
            assert_error(httpx.post(server.url + path, json={}), 401, "missing API key")
            wrong = httpx.post(server.url + path, json={}, headers={"Authorization": "Bearer sk-wrong"})
            assert_error(wrong, 401, "invalid API key")
            assert wrong.headers["WWW-Authenticate"] == "Bearer"
        assert_error(post(server.url, b"{not json", headers={"Authorization": "Bearer x"}), 401)  # key first
        assert httpx.get(server.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        assert good.chat.completions.create(model="any", messages=HELLO, max_tokens=2).usage.completion_tokens == 2
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


# ---------------------------------------------------------------- concurrency, queue, disconnects

PROMPTS = [f"{a} {b}" for a in ("the cat", "a dog", "my old man", "good time") for b in
           ("is", "was here", "said hello", "will go")]


def parse_stream(body: str) -> tuple[str, str]:
    """The text and finish reason of one chat stream; asserts that it is well-formed."""
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], body[-200:]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    assert len({c["id"] for c in chunks}) == 1
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and chunks[-1]["choices"][0]["finish_reason"] == finish[0]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks), finish[0]


def test_sixteen_streaming_clients_get_complete_unmixed_answers(server, client):
    expected = {p: client.chat.completions.create(model="any", messages=[{"role": "user", "content": p}],
                                                  temperature=0, max_tokens=12).choices[0].message.content
                for p in PROMPTS}

    async def one_client(http: httpx.AsyncClient, i: int) -> list[tuple[str, str, str]]:
        got = []
        for j in range(4):
            prompt = PROMPTS[(i + 5 * j) % len(PROMPTS)]
            body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 12,
                    "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200, await response.aread()
                got.append((prompt, *parse_stream((await response.aread()).decode())))
        return got

    async def everyone() -> list[list[tuple[str, str, str]]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return await asyncio.gather(*(one_client(http, i) for i in range(16)))

    results = asyncio.run(everyone())
    assert sum(len(r) for r in results) == 64
    for per_client in results:
        for prompt, text, reason in per_client:
            assert (text, reason) == (expected[prompt], "length"), prompt


async def until(url: str, http: httpx.AsyncClient, **state) -> None:
    """Wait until /health says `state`."""
    while (await http.get(url + "/health")).json() != {"status": "ok", **state}:
        await asyncio.sleep(0.01)


def with_the_engine_held(engine, scenario) -> None:
    """Run `scenario(url, held)` against a server with one queue place whose engine another
    user holds meanwhile (`held`, a stream: closing it frees the engine)."""
    with LiveServer(create_app(engine, DEFAULTS, max_queue=1)) as server:
        held = engine.stream("hello", max_tokens=2)
        next(held)
        try:
            asyncio.run(scenario(server.url, held))
        finally:
            held.close()


QUICK = {"messages": HELLO, "max_tokens": 2}


def test_a_full_queue_answers_429_with_retry_after(engine):
    async def scenario(url: str, held) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            running = asyncio.create_task(http.post(url + "/v1/chat/completions", json=QUICK))
            await until(url, http, busy=True, queued=0)  # taken, waiting for the engine's lock
            waiting = asyncio.create_task(http.post(url + "/v1/chat/completions", json=QUICK))
            await until(url, http, busy=True, queued=1)
            full = await http.post(url + "/v1/chat/completions", json=QUICK)
            assert_error(full, 429, "busy")
            assert int(full.headers["Retry-After"]) >= 1
            held.close()  # the engine is free: both run
            assert [(await r).status_code for r in (running, waiting)] == [200, 200]

    with_the_engine_held(engine, scenario)


def test_a_client_that_leaves_the_queue_frees_its_place_at_once(engine):
    async def scenario(url: str, held) -> None:
        async with httpx.AsyncClient(timeout=60) as http, httpx.AsyncClient(timeout=60) as leaving:
            running = asyncio.create_task(http.post(url + "/v1/chat/completions", json=QUICK))
            await until(url, http, busy=True, queued=0)
            waiting = asyncio.create_task(leaving.post(url + "/v1/chat/completions", json=QUICK))
            await until(url, http, busy=True, queued=1)
            waiting.cancel()  # the client hangs up while it waits
            await leaving.aclose()
            await asyncio.wait_for(until(url, http, busy=True, queued=0), 10)  # before the engine is free
            later = asyncio.create_task(http.post(url + "/v1/chat/completions", json=QUICK))
            await until(url, http, busy=True, queued=1)  # its place, not a 429
            held.close()
            assert [(await r).status_code for r in (running, later)] == [200, 200]

    with_the_engine_held(engine, scenario)


def test_the_server_measures_the_verification_cost_before_its_first_request(target_path, draft_path, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("GGSPEC_STATE", str(tmp_path))  # nothing measured yet
    defaults = Settings(SamplingConfig(), SpecConfig("auto", draft_max=5), max_tokens=8)
    with Engine(target_path, draft_path, target_config=CFG, progress=False) as e, \
            LiveServer(create_app(e, defaults)) as server:
        deadline = time.monotonic() + 30
        while not e.costs.calibrated:  # no request yet
            assert time.monotonic() < deadline, "nothing measured before the first request"
            time.sleep(0.05)
        assert e.costs.max_rows == 6 and e.costs.draft_token > 0
        answer = httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO}, timeout=60).json()
        assert answer["usage"]["completion_tokens"] >= 1 and answer["ggspec"]["method"] == "auto"


def test_a_request_during_the_measurement_ahead_stops_it_and_is_answered_at_once(target_path, draft_path, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("GGSPEC_STATE", str(tmp_path))  # nothing measured yet
    defaults = Settings(SamplingConfig(), SpecConfig("auto", draft_max=16), max_tokens=8)
    with Engine(target_path, draft_path, target_config=CFG, progress=False) as e:
        decodes, real = [], e.ctx.eval

        def slow_eval(tokens, logits="last"):  # the measurement: 35 decodes, 3.5 s at least
            decodes.append(len(tokens))
            time.sleep(0.1)
            return real(tokens, logits=logits)

        monkeypatch.setattr(e.ctx, "eval", slow_eval)
        with LiveServer(create_app(e, defaults)) as server:
            deadline = time.monotonic() + 30
            while len(decodes) < 3:  # measuring
                assert time.monotonic() < deadline, "nothing measured before the first request"
                time.sleep(0.01)
            answer = httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO}, timeout=60).json()
    assert answer["usage"]["completion_tokens"] >= 1 and answer["ggspec"]["queue_seconds"] < 1.0


def test_a_client_that_disconnects_mid_stream_frees_the_engine(server):
    long = {"messages": HELLO, "max_tokens": 900, "temperature": 0}
    full = httpx.post(server.url + "/v1/chat/completions", json=long, timeout=120).json()
    assert full["usage"]["completion_tokens"] == 900
    full_seconds = full["ggspec"]["decode_seconds"]
    before = metrics(server.url)

    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as response:
            lines = response.iter_lines()
            next(lines), next(lines)  # two events, then hang up
        started = time.perf_counter()
        quick = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).json()
    waited = time.perf_counter() - started
    assert quick["usage"]["completion_tokens"] == 2
    assert quick["ggspec"]["queue_seconds"] < full_seconds / 4, (quick["ggspec"]["queue_seconds"], full_seconds)
    assert waited < full_seconds / 2
    after = metrics(server.url)
    assert after["ggspec_generations_cancelled_total"] == before["ggspec_generations_cancelled_total"] + 1
    assert httpx.get(server.url + "/health").json()["busy"] is False


# ---------------------------------------------------------------- metrics

def test_metrics_count_requests_tokens_and_drafts(server, client):
    before = metrics(server.url)
    client.chat.completions.create(model="any", messages=HELLO, temperature=0, max_tokens=12)
    post(server.url, {"messages": HELLO, "n": 3})
    after = metrics(server.url)

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    ok = 'ggspec_requests_total{"route": "/v1/chat/completions", "status": "200"}'
    bad = 'ggspec_requests_total{"route": "/v1/chat/completions", "status": "400"}'
    assert (grew(ok), grew(bad)) == (1, 1)
    assert grew("ggspec_generated_tokens_total") == 12
    assert grew("ggspec_draft_tokens_total") >= grew("ggspec_draft_accepted_tokens_total") > 0
    assert 0 < after["ggspec_draft_acceptance_ratio"] < 1
    assert after["ggspec_decode_tokens_per_second"] > 0
    assert grew("ggspec_time_to_first_token_seconds_count") == 1
    assert after["ggspec_queue_length"] == 0


# ---------------------------------------------------------------- the command

def test_serve_takes_every_engine_option_of_run():
    run, serve = (cli.commands[name] for name in ("run", "serve"))
    per_answer = {"prompt", "prompt_file", "chat", "system", "stop", "as_json"}
    assert {p.name for p in run.params} - per_answer <= {p.name for p in serve.params}
    assert {"host", "port", "api_key", "max_queue"} <= {p.name for p in serve.params}


@contextmanager
def ggspec_serve(*args):
    """`ggspec serve ARGS --port 0` in a child process, once /health answers: yields its URL,
    its banner and `interrupt`, which sends one Ctrl-C (a second would force the exit). At
    the end it gets one if it had none; it must then exit 0, with nothing on stdout and no
    traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-m", "ggspec", "serve", *args, "--port", "0"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent = []

    def interrupt() -> None:
        if not sent:
            child.send_signal(signal.SIGINT)
            sent.append(True)

    try:
        banner = child.stderr.readline()
        assert banner.startswith("ggspec serve: chat page http://127.0.0.1:"), banner
        url = banner.split()[4].rstrip("/")
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        yield url, banner, interrupt
    finally:
        interrupt()
        stdout, stderr = child.communicate(timeout=30)
    assert child.returncode == 0 and stdout == "", stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]


def test_serve_command_listens_answers_and_stops_on_ctrl_c(target_path, draft_path):
    with ggspec_serve("-m", target_path, "-d", draft_path, "--threads", "1", "-c", "512", "-n", "5",
                      "--api-key", KEY) as (url, banner, _):
        got = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO},
                         headers={"Authorization": f"Bearer {KEY}"}).json()
        assert got["usage"]["completion_tokens"] == 5  # -n is the default length
        assert "Error" not in banner


def test_ctrl_c_answers_a_waiting_request_503_at_once_and_ends_the_running_one_cleanly(target_path):
    long = {"messages": HELLO, "max_tokens": 4000, "temperature": 0, "stream": True}
    with ggspec_serve("-m", target_path, "--no-draft", "--threads", "1", "-c", "4096", "--method", "none") as \
            (url, _, interrupt), httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(2) as pool, \
            http.stream("POST", "/v1/chat/completions", json=long) as running:
        events = running.iter_lines()
        next(events)  # it generates
        waiting = pool.submit(httpx.post, url + "/v1/chat/completions", json={"messages": HELLO}, timeout=60)
        while httpx.get(url + "/health").json()["queued"] != 1:
            time.sleep(0.01)
        interrupt()
        refused = waiting.result()
        rest = [e for e in events if e]
        assert_error(refused, 503, "shutting down")
        last = json.loads(rest[-1].removeprefix("data: ")) if rest[-1] != "data: [DONE]" else None
        assert last is None or "shutting down" in last["error"]["message"], rest[-3:]


def test_serve_on_a_taken_port_is_one_line(target_path):
    with listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        got = CliRunner().invoke(cli, ["serve", "-m", target_path, "--port", str(port)])
    assert got.exit_code == 1 and "Traceback" not in got.output
    assert got.stderr.splitlines() == [f"Error: cannot listen on 127.0.0.1:{port}: Address already in use; "
                                       "choose another --port (or --host)"]


# ---------------------------------------------------------------- the chat page in headless Chromium

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@needs_chromium
def test_a_person_chats_and_sees_drafts_coloured_and_the_stats(server, browser, plain):
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    expect(page.locator("#method")).to_have_value("draft")
    expect(page.locator("#temperature")).to_have_value("0.8")  # the server's default
    expect(page.locator("#model")).to_contain_text("target")

    page.fill("#temperature", "0")
    page.evaluate("""() => {  // every live footer, as the person saw it
        window.live = [];
        const stats = document.getElementById("stats");
        new MutationObserver(() => { if (stats.dataset.state === "live") window.live.push(stats.innerText); })
            .observe(stats, { childList: true, characterData: true, subtree: true, attributes: true });
    }""")
    page.fill("#input", "hello world")
    page.press("#input", "Enter")
    expect(page.locator("#stats")).to_have_attribute("data-state", "done", timeout=30_000)
    assert page.evaluate("window.live")[-1].startswith("16 tokens")  # tokens, not streamed pieces
    answer = page.locator(".message.assistant").last
    assert answer.text_content() == plain(HELLO, 16)
    assert answer.locator("span.draft").count() > 0  # accepted draft tokens, coloured
    assert answer.locator("span:not(.draft)").count() > 0  # the target's own tokens
    footer = page.locator("#stats").inner_text()
    assert "16 tokens" in footer and "tok/s" in footer and "accepted" in footer and "draft" in footer

    # a second turn reuses the conversation's KV cache; another method from the menu
    page.select_option("#method", "lookup")
    page.fill("#input", "and the cat")
    page.click("#send")
    expect(page.locator(".message.assistant")).to_have_count(2)
    expect(page.locator("#stats")).to_contain_text("lookup", timeout=30_000)
    expect(page.locator("#stats")).to_have_attribute("data-state", "done")
    footer = page.locator("#stats").inner_text()
    cached = int(footer.split(" cached")[0].rsplit("+ ", 1)[1])
    assert cached > 10, footer

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "chat-page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    assert errors == []
    page.close()


@needs_chromium
def test_stop_ends_a_waiting_answer_and_frees_the_engine(server, browser, engine):
    page = browser.new_page()
    page.goto(server.url + "/")
    expect(page.locator("#method")).to_have_value("draft")
    held = engine.stream("hello", max_tokens=2)  # another user of the engine holds it meanwhile
    next(held)
    try:
        page.fill("#input", "tell me everything")
        page.press("#input", "Enter")
        expect(page.locator("#stop")).to_be_visible()
        page.click("#stop")
        expect(page.locator("#stats")).to_contain_text("stopped")
    finally:
        held.close()
    page.fill("#input", "hello world")  # the stopped request left nothing behind
    page.press("#input", "Enter")
    expect(page.locator("#stats")).to_have_attribute("data-state", "done", timeout=30_000)
    expect(page.locator("#stats")).to_contain_text("16 tokens")
    page.close()
