"""Plain decoding vs `auto` vs `draft` with the target split across two local RPC servers,
at several added network latencies.

    python tools/bench_rpc.py --latency-ms 0,1,5 -w code -w edit -n 128 -r 3
    python tools/bench_rpc.py --latency-ms 1 -- -m target.gguf -d draft.gguf --threads 1

For each latency: two `ggspec rpc-server` processes (on 127.0.0.2 and 127.0.0.3, or on
127.0.0.1 with two ports), each behind a TCP proxy that delays every chunk by the latency in
each direction (none at 0 ms; `tc netem` is not available on every kernel, this works
everywhere), then `ggspec bench --rpc` over them with methods none, auto and draft; its
table follows a header naming the latency. Arguments after `--` go to `ggspec bench`.
The servers and the proxies share this machine's CPUs with the client: give them few
threads (--server-threads) and the client the rest (-- --threads N).
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ggspec.backend import rpc_hello
from ggspec.errors import GgspecError

REPO = Path(__file__).resolve().parents[1]
START_SECONDS = 30  # a server must answer its first handshake within this
CHUNK = 1 << 16


def free_endpoint(host: str) -> str:
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


def loopback_hosts() -> list[str]:
    """Two loopback addresses (Linux routes all of 127/8 to lo), or 127.0.0.1 twice."""
    try:
        for host in ("127.0.0.2", "127.0.0.3"):
            free_endpoint(host)
        return ["127.0.0.2", "127.0.0.3"]
    except OSError:
        return ["127.0.0.1", "127.0.0.1"]


def wait_answering(endpoint: str, proc: subprocess.Popen) -> bool:
    """Whether the server process proc answers a handshake at endpoint within START_SECONDS
    (False as soon as it exits)."""
    deadline = time.monotonic() + START_SECONDS
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            rpc_hello(endpoint, timeout=1)
            return True
        except GgspecError:
            time.sleep(0.1)
    return False


class RpcServer:
    """One `ggspec rpc-server` process on endpoint, its stderr in the file log; returns
    once it answers a handshake."""

    def __init__(self, endpoint: str, log: Path, threads: int = 1):
        host, port = endpoint.split(":")
        self.endpoint, self.log = endpoint, log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        with open(log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "ggspec", "rpc-server", "--host", host,
                                          "--port", port, "--threads", str(threads)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
        if not wait_answering(endpoint, self.proc):
            self.stop()
            raise RuntimeError(f"rpc-server on {endpoint} did not start: {log.read_text()}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


def start_servers(directory: Path, n: int = 2, threads: int = 1) -> list[RpcServer]:
    servers = []
    try:
        for i, host in enumerate(loopback_hosts()[:n]):
            servers.append(RpcServer(free_endpoint(host), directory / f"rpc-server-{i}.log", threads))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


class DelayProxy:
    """Listens on 127.0.0.1 and forwards each connection to upstream, every chunk sent on
    `delay` seconds after it arrived, in each direction (a one-way latency; the bandwidth
    is the loopback's)."""

    def __init__(self, upstream: str, delay: float):
        self.upstream, self.delay = upstream, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        host, port = self.upstream.split(":")
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection((host, int(port)))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(client, server)
            self._pipe(server, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        due: queue.Queue = queue.Queue()

        def read() -> None:
            while chunk := _recv(src):
                due.put((time.monotonic() + self.delay, chunk))
            due.put((0.0, b""))

        def write() -> None:
            while True:
                t, chunk = due.get()
                time.sleep(max(0.0, t - time.monotonic()))
                if not chunk:
                    _shutdown(dst)
                    return
                try:
                    dst.sendall(chunk)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(CHUNK)
    except OSError:
        return b""


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-ms", default="0,1,5", help="one-way latencies per hop, comma-separated")
    ap.add_argument("-w", "--workload", action="append", default=[], help="passed on to ggspec bench")
    ap.add_argument("-n", "--max-tokens", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--server-threads", type=int, default=1, help="CPU threads of each RPC server")
    ap.add_argument("--allow-busy", action="store_true", help="passed on to ggspec bench")
    ap.add_argument("bench_args", nargs="*", help="after --: more ggspec bench arguments")
    args = ap.parse_args()
    latencies = [float(x) for x in args.latency_ms.split(",")]
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    servers = start_servers(log_dir, threads=args.server_threads)
    try:
        for ms in latencies:
            proxies = [DelayProxy(s.endpoint, ms / 1000) for s in servers] if ms > 0 else []
            endpoints = [p.endpoint for p in proxies] or [s.endpoint for s in servers]
            cmd = [sys.executable, "-m", "ggspec", "bench", "--rpc", ",".join(endpoints),
                   "--method", "none", "--method", "auto", "--method", "draft",
                   "-n", str(args.max_tokens), "-r", str(args.repetitions),
                   *(a for w in args.workload for a in ("-w", w)), *(["--allow-busy"] if args.allow_busy else []),
                   *args.bench_args]
            print(f"## target split across 2 RPC servers, {ms:g} ms added per hop each way", flush=True)
            print("$ ggspec " + " ".join(cmd[3:]), flush=True)
            done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)})
            for p in proxies:
                p.close()
            if done.returncode != 0:
                raise SystemExit(done.returncode)
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    main()
