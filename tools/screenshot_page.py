"""Screenshot the chat page of `ggspec serve` answering on the default models (the picture
in the README): headless Chromium (the system's, through Playwright).

    python tools/screenshot_page.py docs/chat-page.png
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time

import uvicorn
from playwright.sync_api import expect, sync_playwright

from ggspec import Engine, SamplingConfig, SpecConfig
from ggspec.chat import Settings
from ggspec.server import create_app, listen

QUESTION = ("Add type hints to this function and reply with the function only:\n\n"
            "def scale(values, factor):\n    return [v * factor for v in values]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="PNG file to write")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("Error: no chromium installed (Debian: apt-get install chromium)")
    with Engine(progress=False) as engine:
        sock = listen("127.0.0.1", 0)
        app = create_app(engine, Settings(SamplingConfig(temperature=0), SpecConfig("auto"), 256))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not server.started:
            time.sleep(0.01)
        host, port = sock.getsockname()[:2]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": 1000, "height": 620})
            page.goto(f"http://{host}:{port}/")
            page.fill("#input", QUESTION)
            page.press("#input", "Enter")
            expect(page.locator("#stats")).to_have_attribute("data-state", "done", timeout=120_000)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        server.should_exit = True
    print(args.out)


if __name__ == "__main__":
    main()
