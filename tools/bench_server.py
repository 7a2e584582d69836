"""Tokens per second of the same greedy answer through `ggspec serve` (HTTP + SSE, the
official openai client) and through the Python API, interleaved on ONE engine, and the
server's time to first token.

    python tools/bench_server.py -w prose -w edit -r 3 -n 192

Each repetition asks the Python API, then the server (streamed), then the server (not
streamed) for the same answer; a ratio compares the client's wall time per generated
token with the API's in the same repetition (prefill included in both: the prompt is cached
after the warm-up); the table gives medians over the repetitions.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np
import uvicorn
from openai import OpenAI

from ggspec import Engine, SamplingConfig, SpecConfig, machine
from ggspec.bench import WORKLOADS
from ggspec.chat import Settings
from ggspec.server import create_app, listen


def start(engine: Engine, method: str) -> tuple[uvicorn.Server, str]:
    sock = listen("127.0.0.1", 0)
    app = create_app(engine, Settings(SamplingConfig(temperature=0), SpecConfig(method), engine.n_ctx))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    host, port = sock.getsockname()[:2]
    return server, f"http://{host}:{port}/v1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workload", action="append", choices=list(WORKLOADS))
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-n", "--max-tokens", type=int, default=192)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--allow-busy", action="store_true")
    args = ap.parse_args()
    state = machine.idle_or_exit(allow_busy=args.allow_busy)
    print(f"machine: {state.describe()}", file=sys.stderr)
    greedy, spec = SamplingConfig(temperature=0), SpecConfig(args.method)
    with Engine(progress=False) as engine:
        server, url = start(engine, args.method)
        client = OpenAI(base_url=url, api_key="-")
        print("workload  api tok/s  stream tok/s  x api  plain tok/s  x api  first token ms")
        for name in args.workload or ["prose", "edit"]:
            messages = [{"role": "user", "content": WORKLOADS[name].prompt}]
            engine.generate(messages, max_tokens=args.max_tokens, sampling=greedy, spec=spec)  # warm-up
            api, streamed, plain, first = [], [], [], []
            for _ in range(args.repetitions):
                t0 = time.perf_counter()
                n = len(engine.generate(messages, max_tokens=args.max_tokens, sampling=greedy, spec=spec).tokens)
                api.append(n / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                chunks = client.chat.completions.create(model="ggspec", messages=messages, temperature=0,
                                                        max_tokens=args.max_tokens, stream=True,
                                                        stream_options={"include_usage": True})
                t_first, usage = None, None
                for chunk in chunks:
                    if t_first is None and chunk.choices and chunk.choices[0].delta.content:
                        t_first = time.perf_counter() - t0
                    usage = chunk.usage or usage
                streamed.append(usage.completion_tokens / (time.perf_counter() - t0))
                first.append(1000 * t_first)
                t0 = time.perf_counter()
                reply = client.chat.completions.create(model="ggspec", messages=messages, temperature=0,
                                                       max_tokens=args.max_tokens)
                plain.append(reply.usage.completion_tokens / (time.perf_counter() - t0))
            api, streamed, plain = np.array(api), np.array(streamed), np.array(plain)
            print(f"{name:8}  {np.median(api):9.1f}  {np.median(streamed):12.1f}  "
                  f"{np.median(streamed / api):5.3f}  {np.median(plain):11.1f}  {np.median(plain / api):5.3f}  "
                  f"{np.median(first):14.0f}")
        server.should_exit = True


if __name__ == "__main__":
    main()
