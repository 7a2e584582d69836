"""ggml's C API, as far as ggspec calls it beside llama.cpp's: the backend registry and
devices, reading a graph tensor, and building and computing a one-product graph (the
check of llama.cpp's AMX kernels in ggspec.weights). Types from ggml.h (ggml 0.25)."""

from __future__ import annotations

import ctypes

import llama_cpp._ggml

GGML_TYPE_F32 = 0


class GgmlTensor(ctypes.Structure):
    """The head of ggml.h's `struct ggml_tensor` (ggml 0.25), up to its name."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


class InitParams(ctypes.Structure):
    """`struct ggml_init_params`."""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_p, _s, _i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
lib = ctypes.CDLL(llama_cpp._ggml.libggml._name)  # ggml and, through it, ggml-base: own function objects
for _name, _res, _args in [
    ("ggml_backend_reg_by_name", _p, [ctypes.c_char_p]),
    ("ggml_backend_reg_get_proc_address", _p, [_p, ctypes.c_char_p]),
    ("ggml_backend_reg_dev_count", _s, [_p]),
    ("ggml_backend_reg_dev_get", _p, [_p, _s]),
    ("ggml_backend_dev_count", _s, []),
    ("ggml_backend_dev_get", _p, [_s]),
    ("ggml_backend_dev_type", ctypes.c_int, [_p]),
    ("ggml_backend_dev_by_type", _p, [ctypes.c_int]),
    ("ggml_backend_dev_buffer_type", _p, [_p]),
    ("ggml_backend_dev_supports_op", ctypes.c_bool, [_p, _p]),
    ("ggml_backend_dev_init", _p, [_p, ctypes.c_char_p]),
    ("ggml_backend_buft_name", ctypes.c_char_p, [_p]),
    ("ggml_backend_buft_alloc_buffer", _p, [_p, _s]),
    ("ggml_backend_buffer_free", None, [_p]),
    ("ggml_backend_alloc_ctx_tensors_from_buft", _p, [_p, _p]),
    ("ggml_backend_tensor_set", None, [_p, _p, _s, _s]),
    ("ggml_backend_tensor_get", None, [_p, _p, _s, _s]),
    ("ggml_backend_graph_compute", ctypes.c_int, [_p, _p]),
    ("ggml_backend_free", None, [_p]),
    ("ggml_set_abort_callback", _p, [_p]),
    ("ggml_tensor_overhead", _s, []),
    ("ggml_graph_overhead", _s, []),
    ("ggml_init", _p, [InitParams]),
    ("ggml_free", None, [_p]),
    ("ggml_new_tensor_2d", _p, [_p, ctypes.c_int, _i64, _i64]),
    ("ggml_mul_mat", _p, [_p, _p, _p]),
    ("ggml_new_graph", _p, [_p]),
    ("ggml_build_forward_expand", None, [_p, _p]),
]:
    getattr(lib, _name).restype, getattr(lib, _name).argtypes = _res, _args

DEVICE_CPU = 0  # enum ggml_backend_dev_type


def cpu_device() -> int:
    return lib.ggml_backend_dev_by_type(DEVICE_CPU)


def cpu_extra_buffer_types() -> dict[str, int]:
    """The CPU backend's extra buffer types, by name, in llama.cpp's order of preference
    (e.g. AMX, CPU_REPACK): the ones llama.cpp stores weights in for its own kernels."""
    reg = lib.ggml_backend_reg_by_name(b"CPU")
    address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not address:
        return {}
    found = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(cpu_device())
    out = {}
    for k in range(64):
        if not found or not found[k]:
            break
        out[lib.ggml_backend_buft_name(found[k]).decode()] = found[k]
    return out


class Context:
    """A ggml context that holds tensor and graph descriptions only (no_alloc), freed on
    exit with the buffers allocated for its tensors."""

    def __init__(self, n_tensors: int, graph: bool = False):
        size = lib.ggml_tensor_overhead() * n_tensors + (lib.ggml_graph_overhead() if graph else 0)
        self.handle = lib.ggml_init(InitParams(size, None, True))
        self.buffers: list[int] = []

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc) -> None:
        for b in self.buffers:
            lib.ggml_backend_buffer_free(b)
        lib.ggml_free(self.handle)

    def matrix(self, qtype: int, n_cols: int, n_rows: int) -> int:
        return lib.ggml_new_tensor_2d(self.handle, qtype, n_cols, n_rows)

    def allocate(self, buft: int) -> None:
        """Memory in a buffer of type `buft` for every tensor of the context without any."""
        self.buffers.append(lib.ggml_backend_alloc_ctx_tensors_from_buft(self.handle, buft))


def tensor(address: int) -> GgmlTensor:
    return ctypes.cast(address, ctypes.POINTER(GgmlTensor)).contents
