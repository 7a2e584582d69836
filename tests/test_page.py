"""The chat page at `/` in headless Chromium (Debian's `chromium` package, driven by
Playwright's Python package; no browser download): a person sends messages and sees
the streamed answer, the coloured draft text and the stats footer. A screenshot is
saved to tests/artifacts/chat-page.png."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig
from ggspec.chat import Settings
from ggspec.server import create_app
from serving import LiveServer

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CFG = BackendConfig(n_ctx=1024, n_threads=1)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def engine(target_path, draft_path):
    with Engine(target_path, draft_path, target_config=CFG) as e:
        yield e


@pytest.fixture(scope="module")
def page_server(engine):
    defaults = Settings(SamplingConfig(temperature=0), SpecConfig("draft", draft_max=3), max_tokens=24)
    with LiveServer(create_app(engine, defaults)) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


def test_a_person_chats_and_sees_drafts_coloured_and_the_stats(page_server, browser, target_path):
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_server.url + "/")
    expect(page.locator("#method")).to_have_value("draft")
    expect(page.locator("#temperature")).to_have_value("0")
    expect(page.locator("#model")).to_contain_text("target")

    page.fill("#input", "hello world")
    page.press("#input", "Enter")
    expect(page.locator("#stats")).to_have_attribute("data-state", "done", timeout=30_000)
    answer = page.locator(".message.assistant").last
    with Engine(target_path, None, target_config=CFG) as plain:
        expected = plain.generate([{"role": "user", "content": "hello world"}], max_tokens=24,
                                  sampling=SamplingConfig(temperature=0), spec=SpecConfig("none")).text
    assert answer.text_content() == expected
    assert answer.locator("span.draft").count() > 0  # accepted draft tokens, coloured
    assert answer.locator("span:not(.draft)").count() > 0  # the target's own tokens
    footer = page.locator("#stats").inner_text()
    assert "24 tokens" in footer and "tok/s" in footer and "accepted" in footer and "draft" in footer

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


def test_stop_ends_a_waiting_answer_and_frees_the_engine(page_server, browser, engine):
    page = browser.new_page()
    page.goto(page_server.url + "/")
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
    expect(page.locator("#stats")).to_contain_text("24 tokens")
    page.close()
