"""Where the weights go on the CPU: llama.cpp's AMX kernels checked once in a child process,
and, where they do not run, the matrices llama.cpp repacks placed in its repack buffer."""

from __future__ import annotations

import re
import subprocess

import llama_cpp
import pytest

from ggspec import backend, ggml, hub, weights
from ggspec.gguffile import read_header
from reference import greedy_reference

REPACK = ggml.cpu_extra_buffer_types().get(weights.REPACK)
needs_repack = pytest.mark.skipif(REPACK is None, reason="this llama.cpp's CPU backend has no repack buffer")


def _loaded_buffers(capfd, path, use_extra_bufts, pattern):
    """Load `path` with llama.cpp's logs on; the model buffer sizes it logs, by buffer type."""
    backend.set_verbose(True)
    try:
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = use_extra_bufts
        keep = weights.override(params, pattern, REPACK) if pattern else None
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert model
        llama_cpp.llama_model_free(model)
    finally:
        backend.set_verbose(False)
    return dict(re.findall(r"load_tensors: +(\S+) model buffer size = +([\d.]+) MiB", capfd.readouterr().err))


@needs_repack
@pytest.mark.real
def test_the_pattern_names_exactly_the_matrices_the_repack_buffer_takes(capfd):
    path = hub.pull("qwen2.5-coder-1.5b")
    header = read_header(path)
    pattern = weights.repack_pattern(header, REPACK)
    named = {n for n in header.tensors if re.fullmatch(pattern, n)}
    # the Q4_K matrices of every layer (llama.cpp repacks Q4_K for AVX2 and for ARM's NEON);
    # never the embeddings, read by row (only matrix products are asked about)
    assert {f"blk.{i}.{m}.weight" for i in range(28) for m in ("attn_q", "ffn_up")} <= named
    assert "token_embd.weight" not in named and not any("norm" in n for n in named)
    # llama.cpp itself stores them there: the repack buffer holds as much as when it chooses
    chosen = _loaded_buffers(capfd, path, True, None)
    if "AMX" in chosen:
        pytest.skip("llama.cpp puts matrices in its AMX buffer here: its own choice is not the reference")
    placed = _loaded_buffers(capfd, path, False, pattern)
    assert float(placed["CPU_REPACK"]) == float(chosen["CPU_REPACK"]) > 0


@needs_repack
def test_the_pattern_is_none_where_the_repack_buffer_takes_nothing(target_path):
    """The tiny models' matrices are F32: nothing to repack, no override."""
    assert weights.repack_pattern(read_header(target_path), REPACK) is None


@needs_repack
@pytest.mark.real
def test_decoding_with_the_matrices_placed_by_name_equals_llama_cpps_own_placement(monkeypatch):
    """Where llama.cpp's AMX kernels are not offered, its own placement puts the same
    matrices in the repack buffer: the same kernels, so the same logits, bit for bit."""
    real = ggml.cpu_extra_buffer_types()
    if "AMX" in real:
        pytest.skip("llama.cpp's own placement uses its AMX buffer here")
    path = str(hub.pull("qwen2.5-coder-1.5b"))
    prompt = [9707, 11, 1879, 0, 5209, 264, 729, 429]
    own = greedy_reference(path, prompt, 16, n_ctx=128, n_threads=2)
    monkeypatch.setattr(ggml, "cpu_extra_buffer_types", lambda: {"AMX": 0, **real})
    monkeypatch.setattr(weights, "amx_runs", lambda: False)
    by_name = greedy_reference(path, prompt, 16, n_ctx=128, n_threads=2)
    assert by_name.tokens == own.tokens
    assert all((a == b).all() for a, b in zip(by_name.logits, own.logits))


class _Child:
    """subprocess.run standing in for the child process that computes in llama.cpp's AMX
    buffer, ending as given; counts its calls."""

    def __init__(self, returncode):
        self.returncode, self.calls = returncode, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return subprocess.CompletedProcess(args, self.returncode, b"", b"")


@pytest.mark.parametrize("returncode,runs,said", [(0, True, ""), (-11, False, "crashed (signal 11)"),
                                                  (3, False, "computed wrong figures")])
def test_the_amx_check_runs_once_per_build_and_is_remembered(monkeypatch, state_dir, capsys, returncode, runs, said):
    (state_dir / weights.FILE).unlink(missing_ok=True)
    child = _Child(returncode)
    monkeypatch.setattr(subprocess, "run", child)
    weights.amx_runs.cache_clear()
    try:
        assert weights.amx_runs() is runs
        err = capsys.readouterr().err
        assert "checking llama.cpp's AMX kernels" in err and said in err
        weights.amx_runs.cache_clear()
        assert weights.amx_runs() is runs and child.calls == 1  # from kernels.json
        assert hub.read_json(state_dir / weights.FILE) == {weights.build_key(): runs}
    finally:
        weights.amx_runs.cache_clear()
        (state_dir / weights.FILE).unlink(missing_ok=True)
