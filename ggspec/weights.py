"""Where llama.cpp keeps a model's weights on the CPU, and whether its AMX kernels run here.

On a CPU with Intel AMX (Xeon from Sapphire Rapids on), llama.cpp offers an AMX buffer type
first among the CPU's extra buffer types: the matrices its AMX kernels take are stored there
and their products run on AMX tiles; of the rest, those its AVX2 kernels repack go to the
repack buffer (CPU_REPACK). Built by Debian 12's GCC 12, those AMX kernels end
the process at their first product: that GCC's `_tile_loadconfig` tells the compiler it
reads 8 of the tile configuration's 64 bytes, the stores of the rest are dropped, and
`ldtilecfg` faults on what the stack held (llama.cpp issue 20824). So where the AMX buffer
type is offered, ggspec computes one product in it in a child process, once per llama.cpp
build and CPU (`amx_runs`, remembered in kernels.json in the state directory), and where
that crashes or computes wrong figures, models load without the extra buffer types
(llama.cpp's `use_extra_bufts`, its `--no-repack`) and each matrix the repack buffer takes
is placed there by name (`place`), as llama.cpp places it when there is no AMX.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from . import ggml, hub, machine
from .ggml import GGML_TYPE_F32, lib
from .gguffile import Header, TensorInfo

AMX = "AMX"
REPACK = "CPU_REPACK"
FILE = "kernels.json"
CHECK_TIMEOUT = 120  # seconds for the child process to load llama.cpp and compute one product
# llama.cpp's weights that only matrix products read (llm_tensor_info_mapping: GGML_OP_MUL_MAT)
_MATRIX = re.compile(r"blk\.(\d+)\.((?:attn_(?:q|k|v|qkv|output)|ffn_(?:gate|up|down)(?:_shexp)?)\.weight)"
                     r"|output\.weight")
_Q8_0 = gguf.GGMLQuantizationType.Q8_0


class _Override(ctypes.Structure):
    """`struct llama_model_tensor_buft_override`: tensors whose name matches the regular
    expression `pattern` are stored in a buffer of type `buft`."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def place(params: llama_cpp.llama_model_params, header: Header):
    """Set `params` to load the model of `header` without llama.cpp's AMX buffer where its
    AMX kernels do not run here (amx_runs); else leave them. Returns what must live until
    llama_model_load_from_file returns (the override array), or None."""
    if amx_usable():
        return None
    bufts = ggml.cpu_extra_buffer_types()
    params.use_extra_bufts = False
    pattern = repack_pattern(header, bufts.get(REPACK))
    if pattern is None:
        return None
    return override(params, pattern, bufts[REPACK])


def override(params: llama_cpp.llama_model_params, pattern: str, buft: int):
    """Set `params` to store the tensors whose names match `pattern` in buffers of type
    `buft`; returns the override array, which must live until the load returns."""
    overrides = (_Override * 2)(_Override(pattern.encode(), buft))  # then the {NULL, NULL} end
    params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
    return overrides


def amx_usable() -> bool:
    """Whether llama.cpp may put weights in its AMX buffer here: it offers none, or its AMX
    kernels run (amx_runs)."""
    return AMX not in ggml.cpu_extra_buffer_types() or amx_runs()


def repack_pattern(header: Header, repack: int | None) -> str | None:
    """A regular expression matching exactly the names of the model's matrices that the
    repack buffer type `repack` takes (llama.cpp's own test: does the CPU device support a
    product of the matrix held in that buffer type), grouped by name so that llama.cpp's
    std::regex stays short; None where it takes none."""
    if repack is None:
        return None
    layers = defaultdict(list)  # "attn_q.weight" -> the layers whose one is taken; "" for output.weight
    for name, t in header.tensors.items():
        m = _MATRIX.fullmatch(name)
        if m and len(t.shape) == 2 and _repack_takes(t, repack):
            layers[m.group(2) or ""].append(m.group(1))
    if not layers:
        return None
    parts = [r"output\.weight" if not kind else rf"blk\.({'|'.join(ids)})\.{re.escape(kind)}"
             for kind, ids in layers.items()]
    return "^(" + "|".join(parts) + ")$"


def _repack_takes(t: TensorInfo, repack: int) -> bool:
    with ggml.Context(3) as c:
        w = c.matrix(int(t.qtype), t.shape[1], t.shape[0])
        product = lib.ggml_mul_mat(c.handle, w, c.matrix(GGML_TYPE_F32, t.shape[1], 512))
        weights = ggml.tensor(w)
        weights.buffer = lib.ggml_backend_buft_alloc_buffer(repack, 0)  # as llama.cpp's loader asks
        try:
            return lib.ggml_backend_dev_supports_op(ggml.cpu_device(), product)
        finally:
            lib.ggml_backend_buffer_free(weights.buffer)
            weights.buffer = None


def build_key() -> str:
    """A digest naming this llama.cpp build (its library file and features) and this CPU."""
    library = Path(llama_cpp._ggml.libggml._name)
    st = library.stat()
    facts = [str(library), st.st_size, st.st_mtime_ns, llama_cpp.__version__,
             llama_cpp.llama_print_system_info().decode(), machine.cpu_name()]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:32]


@functools.cache
def amx_runs() -> bool:
    """Whether llama.cpp's AMX kernels compute a product right on this CPU, asked in a child
    process (a crash ends the process that computes) once per llama.cpp build and CPU."""
    store = hub.state_dir() / FILE
    data = hub.read_json(store)
    key = build_key()
    if isinstance(data.get(key), bool):
        return data[key]
    print("ggspec: checking llama.cpp's AMX kernels on this CPU (once for this llama.cpp build)",
          file=sys.stderr)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    try:
        child = subprocess.run([sys.executable, "-c", "import sys, ggspec.weights as w; "
                                "sys.exit(0 if w.amx_product_right() else 3)"],
                               env=env, capture_output=True, timeout=CHECK_TIMEOUT)
        outcome = ("crashed (signal %d)" % -child.returncode if child.returncode < 0 else
                   "computed wrong figures" if child.returncode == 3 else
                   f"failed (exit status {child.returncode})" if child.returncode else None)
    except subprocess.TimeoutExpired:
        outcome = f"did not finish in {CHECK_TIMEOUT} s"
    if outcome:
        print(f"ggspec: llama.cpp's AMX kernels {outcome} on this CPU (built by GCC 12, they crash: "
              "llama.cpp issue 20824); models load without the AMX buffer, the matrices llama.cpp "
              "repacks for AVX2 still repacked. Built by another compiler, or by GCC 12 with "
              "-fno-tree-dse -fno-dse in CMAKE_C_FLAGS and CMAKE_CXX_FLAGS, llama-cpp-python runs them "
              "(README: Intel CPUs with AMX).", file=sys.stderr)
    data[key] = outcome is None
    hub.write_json(store, data, "the check of llama.cpp's AMX kernels")
    return data[key]


def amx_product_right() -> bool:
    """Compute one product of a Q8_0 matrix held in llama.cpp's AMX buffer with 16 rows and
    compare it with numpy's on the same quantized figures (the AMX kernels quantize the
    rows to 8 bits: about 1% apart). Run by amx_runs in a child process."""
    rng = np.random.default_rng(0)
    n_in, n_out, n_rows = 256, 64, 16
    w = gguf.quants.quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), _Q8_0)
    x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    want = x @ gguf.quants.dequantize(w, _Q8_0).T
    got = np.empty_like(want)
    device = ggml.cpu_device()
    compute = lib.ggml_backend_dev_init(device, None)
    try:
        with ggml.Context(1) as cw, ggml.Context(3, graph=True) as cx:
            wt = cw.matrix(int(_Q8_0), n_in, n_out)
            cw.allocate(ggml.cpu_extra_buffer_types()[AMX])
            xt = cx.matrix(GGML_TYPE_F32, n_in, n_rows)
            yt = lib.ggml_mul_mat(cx.handle, wt, xt)
            graph = lib.ggml_new_graph(cx.handle)
            lib.ggml_build_forward_expand(graph, yt)
            cx.allocate(lib.ggml_backend_dev_buffer_type(device))
            lib.ggml_backend_tensor_set(wt, w.ctypes.data, 0, w.nbytes)
            lib.ggml_backend_tensor_set(xt, x.ctypes.data, 0, x.nbytes)
            if lib.ggml_backend_graph_compute(compute, graph) != 0:
                return False
            lib.ggml_backend_tensor_get(yt, got.ctypes.data, 0, got.nbytes)
    finally:
        lib.ggml_backend_free(compute)
    return bool(np.allclose(got, want, rtol=0, atol=0.05 * np.abs(want).max()))
