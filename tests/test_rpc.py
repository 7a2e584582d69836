"""The target split across real ggml RPC servers: `ggspec rpc-server` processes on loopback
addresses (127.0.0.2 and 127.0.0.3, or 127.0.0.1 on two ports), tiny generated models.

Exactness against local decoding, every speculative method over RPC, errors that name the
endpoint, and a server lost in the middle of a generation.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import llama_cpp
import pytest
from click.testing import CliRunner

from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig, backend
from ggspec.cli import cli
from ggspec.config import rpc_endpoint
from ggspec.errors import GgspecError
from reference import first_divergence, greedy_reference
from test_engine import make_verification_cheap, random_prompt
from tinymodels import VOCAB
from toolfiles import load_tool

REPO = Path(__file__).resolve().parents[1]
bench_rpc = load_tool("bench_rpc")
free_endpoint, start_servers, RpcServer = bench_rpc.free_endpoint, bench_rpc.start_servers, bench_rpc.RpcServer
GREEDY = SamplingConfig(temperature=0)
LOST_SECONDS = 20  # a generation must end this soon after a server dies

needs_rpc = pytest.mark.skipif(not backend.rpc_supported() and os.environ.get("CI") != "true",
                               reason=backend.RPC_REINSTALL)  # in CI: fail, never skip


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers shared by the module's in-process engines (one client each: this process)."""
    running = start_servers(tmp_path_factory.mktemp("rpc"))
    yield [s.endpoint for s in running]
    for s in running:
        s.stop()


@pytest.fixture
def llama_log():
    """llama.cpp's whole log through ggspec's callback (another test module may have set its
    own), to stderr, for this test."""
    llama_cpp.llama_log_set(backend._log_callback, ctypes.c_void_p(0))
    backend.set_verbose(True)
    yield
    backend.set_verbose(False)


def config(rpc, **kw) -> BackendConfig:
    return BackendConfig(n_ctx=512, n_batch=64, n_threads=1, rpc=rpc, **kw)



# ---------------------------------------------------------------- configuration

def test_endpoints_are_checked_at_construction():
    assert rpc_endpoint(" host.lan:50052 ") == "host.lan:50052"
    assert BackendConfig(rpc=["127.0.0.2:1", "127.0.0.3:2"]).rpc == ("127.0.0.2:1", "127.0.0.3:2")
    for bad in ("host", "host:", ":50052", "host:port", "host:0", "host:70000", "[::1]:50052"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            BackendConfig(rpc=[bad])
    with pytest.raises(ValueError, match="list of HOST:PORT"):
        BackendConfig(rpc="127.0.0.1:50052")
    with pytest.raises(ValueError, match="twice"):
        BackendConfig(rpc=["a:1", "a:1"])
    for bad in ((), (1, -1), (0, 0), (float("nan"),)):
        with pytest.raises(ValueError, match="tensor_split"):
            BackendConfig(tensor_split=bad)


def test_the_local_configuration_drops_the_servers_and_split_only():
    cfg = BackendConfig(n_ctx=256, n_gpu_layers=3, rpc=["a:1"], tensor_split=[1, 2])
    assert cfg.local() == BackendConfig(n_ctx=256, n_gpu_layers=3)


def test_bad_rpc_options_are_one_line():
    got = CliRunner().invoke(cli, ["run", "--rpc", "127.0.0.1:1,nonsense", "hi"])
    assert got.exit_code == 2 and "nonsense" in got.stderr and "HOST:PORT" in got.stderr
    got = CliRunner().invoke(cli, ["run", "-ts", "3,x", "hi"])
    assert got.exit_code == 2 and "3,1" in got.stderr


def test_without_rpc_support_the_error_says_how_to_reinstall(target_path, monkeypatch):
    """A build without -DGGML_RPC=on has no "RPC" backend registry: that lookup is the one
    thing made to fail here."""
    real = backend._ggml

    class NoRpcBuild:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def ggml_backend_reg_by_name(name):
            return None if name == b"RPC" else real.ggml_backend_reg_by_name(name)

    monkeypatch.setattr(backend, "_ggml", NoRpcBuild())
    with pytest.raises(GgspecError) as e:
        Engine(target_path, None, target_config=config(["127.0.0.1:50052"]))
    assert 'CMAKE_ARGS="-DGGML_RPC=on" pip install --no-cache-dir --force-reinstall llama-cpp-python' in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- unreachable servers

@needs_rpc
def test_a_closed_port_is_one_error_naming_the_endpoint(target_path):
    endpoint = free_endpoint("127.0.0.1")  # nothing listens there now
    t0 = time.monotonic()
    with pytest.raises(GgspecError, match=f"cannot reach RPC server {endpoint}"):
        Engine(target_path, None, target_config=config([endpoint]))
    assert time.monotonic() - t0 < 2


@needs_rpc
def test_a_server_that_never_answers_times_out_naming_the_endpoint(target_path, monkeypatch):
    """A port that accepts but never answers (as a server busy with another client does)."""
    monkeypatch.setattr(backend, "RPC_TIMEOUT", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(GgspecError, match=f"RPC server {endpoint} did not answer within 1 s"):
            Engine(target_path, None, target_config=config([endpoint]))
        assert time.monotonic() - t0 < 3


@needs_rpc
def test_a_port_that_is_not_an_rpc_server_is_named(target_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(4)
        endpoint = f"127.0.0.1:{other.getsockname()[1]}"

        def hang_up():
            conn, _ = other.accept()
            conn.close()

        threading.Thread(target=hang_up, daemon=True).start()
        with pytest.raises(GgspecError, match=f"{endpoint} closed the connection at the RPC handshake"):
            Engine(target_path, None, target_config=config([endpoint]))


def test_the_cli_names_an_unreachable_endpoint_in_one_line(target_path):
    endpoint = free_endpoint("127.0.0.1")
    got = CliRunner().invoke(cli, ["run", "-m", target_path, "--threads", "1", "-c", "512", "--rpc", endpoint,
                                   "--raw", "hello"])
    assert got.exit_code == 1
    errors = [line for line in got.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in got.output
    assert endpoint in errors[0] if backend.rpc_supported() else "GGML_RPC=on" in errors[0]


# ---------------------------------------------------------------- exactness over RPC

@needs_rpc
def test_greedy_output_over_two_servers_equals_local_decoding(servers, target_path, llama_log, capfd):
    engine = Engine(target_path, None, target_config=config(servers))
    log = capfd.readouterr().err
    for endpoint in servers:  # llama.cpp put weights on each server
        assert f"[{endpoint}] model buffer size" in log, log[-3000:]
    with engine:
        for seed in range(3):
            prompt = random_prompt(seed)
            got = engine.generate(prompt, max_tokens=40, sampling=GREEDY, spec=SpecConfig("none"))
            assert first_divergence(got.tokens, greedy_reference(target_path, prompt, 40)) is None


@needs_rpc
@pytest.mark.parametrize("method", ["lookup", "draft", "auto"])
def test_speculative_methods_over_rpc_equal_local_decoding(servers, target_path, draft_path, method, monkeypatch):
    prompt = [VOCAB.bos_id] + random_prompt(5, 12)[1:] * 4  # repetitive: lookup finds matches
    ref = greedy_reference(target_path, prompt, 60)
    with Engine(target_path, draft_path, target_config=config(servers)) as engine:
        if method == "auto":
            engine.prepare(SpecConfig("auto"))  # calibrates
            make_verification_cheap(engine.drafters["auto"], monkeypatch)
        got = engine.generate(prompt, max_tokens=60, sampling=GREEDY, spec=SpecConfig(method, draft_max=6))
    assert first_divergence(got.tokens, ref) is None
    assert got.stats.draft_tokens > 0


@needs_rpc
def test_a_split_and_a_draft_on_a_server_stay_exact(servers, target_path, draft_path):
    prompt = random_prompt(11)
    ref = greedy_reference(target_path, prompt, 40)
    with Engine(target_path, draft_path, target_config=config(servers, tensor_split=(1, 3)),
                draft_config=config(servers[:1])) as engine:
        got = engine.generate(prompt, max_tokens=40, sampling=GREEDY, spec=SpecConfig("draft", draft_max=4))
    assert first_divergence(got.tokens, ref) is None
    assert got.stats.draft_tokens > 0
    with pytest.raises(ValueError, match="3 shares for 2 devices"):
        Engine(target_path, None, target_config=config(servers, tensor_split=(1, 1, 1)))


@needs_rpc
def test_costs_measured_over_rpc_are_stored_apart_from_local_ones(servers, target_path):
    from ggspec.calibration import context_key

    keys = set()
    for cfg in (config(()), config(servers), config(servers[::-1]), config(servers, tensor_split=(1, 2))):
        with Engine(target_path, None, target_config=cfg) as engine:
            keys.add(context_key(engine.ctx))
    assert len(keys) == 4


@needs_rpc
def test_cli_run_with_rpc_prints_the_local_answer(servers, target_path, draft_path, llama_log):
    base = ["run", "-m", target_path, "--threads", "1", "-c", "512", "-t", "0", "-n", "12", "--raw", "--json",
            "the cat and the dog"]
    local = json.loads(CliRunner().invoke(cli, base).stdout)
    remote = CliRunner().invoke(cli, [*base, "-v", "--rpc", ",".join(servers), "-d", draft_path,
                                      "--draft-rpc", servers[0], "--method", "draft"])
    assert remote.exit_code == 0, remote.output
    assert json.loads(remote.stdout)["tokens"] == local["tokens"]
    # the target on both servers, the draft on the first
    assert remote.stderr.count(f"[{servers[0]}] model buffer size") == 2
    assert remote.stderr.count(f"[{servers[1]}] model buffer size") == 1


@needs_rpc
def test_the_benchmark_latency_proxy_delays_each_hop_and_keeps_the_output(servers, target_path):
    delay = 0.02
    proxies = [bench_rpc.DelayProxy(e, delay) for e in servers]
    try:
        prompt = random_prompt(8)
        with Engine(target_path, None, target_config=config([p.endpoint for p in proxies])) as engine:
            got = engine.generate(prompt, max_tokens=10, sampling=GREEDY, spec=SpecConfig("none"))
    finally:
        for p in proxies:
            p.close()
    assert first_divergence(got.tokens, greedy_reference(target_path, prompt, 10)) is None
    assert got.stats.decode_seconds >= 5 * 2 * delay  # at least a round trip a token


# ---------------------------------------------------------------- a server lost mid-generation

@needs_rpc
def test_a_server_killed_mid_generation_ends_the_run_in_one_line_naming_it(tmp_path, target_path):
    first, second = start_servers(tmp_path)
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        run = subprocess.Popen([sys.executable, "-m", "ggspec", "run", "-m", target_path, "--threads", "1",
                                "-c", "4096", "-n", "4000", "-t", "0", "--raw", "--method", "lookup",
                                "--rpc", f"{first.endpoint},{second.endpoint}", "the cat and the dog"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert run.stdout.read(20)  # generating
        second.kill()
        t0 = time.monotonic()
        try:
            _, err = run.communicate(timeout=LOST_SECONDS)
        finally:
            run.kill()
        assert time.monotonic() - t0 < LOST_SECONDS
        assert run.returncode == 1
        lines = err.decode().strip().splitlines()
        assert lines[-1].startswith(f"Error: lost RPC server {second.endpoint} ("), lines[-3:]
        assert first.endpoint not in lines[-1]
        # the surviving server and a restarted one serve a new engine
        second = RpcServer(second.endpoint, tmp_path / "restarted.log")
        prompt = random_prompt(3)
        with Engine(target_path, None, target_config=config([first.endpoint, second.endpoint])) as engine:
            got = engine.generate(prompt, max_tokens=20, sampling=GREEDY, spec=SpecConfig("none"))
        assert first_divergence(got.tokens, greedy_reference(target_path, prompt, 20)) is None
    finally:
        first.stop()
        second.stop()


# ---------------------------------------------------------------- the server command

@needs_rpc
def test_rpc_server_warns_off_loopback_and_stops_on_ctrl_c():
    host_port = free_endpoint("0.0.0.0").split(":")[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ggspec", "rpc-server", "--host", "0.0.0.0", "--port", host_port,
                             "--threads", "1"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        assert bench_rpc.wait_answering(f"127.0.0.1:{host_port}", proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert out == b""  # llama.cpp's banner goes to stderr too
    err = err.decode()
    assert "Warning: llama.cpp's RPC protocol has no authentication" in err and "trusted networks" in err
    assert "stopped" in err


@needs_rpc
def test_rpc_server_mistakes_are_one_line(tmp_path):
    got = CliRunner().invoke(cli, ["rpc-server", "--host", "localhost"])
    assert got.exit_code == 2 and "IPv4" in got.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        got = CliRunner().invoke(cli, ["rpc-server", "--port", str(taken.getsockname()[1])])
    assert got.exit_code == 1 and "cannot listen on 127.0.0.1:" in got.stderr
