"""The only module that talks to llama.cpp (through llama-cpp-python's C API).

`Model` owns a `llama_model *`; `Context` owns a `llama_context *` and its `llama_batch`.
Each frees its handle exactly once (`close()`, `with`, or garbage collection), and a
context is always freed before the model it was created from (it holds a reference).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import secrets
import socket
import struct
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Sequence

import jinja2
import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from . import ggml, weights
from .config import BackendConfig
from .errors import DecodeError, GgspecError, ModelFileError, SessionFileError, VocabMismatchError
from .ggml import GGML_TYPE_F32, GgmlTensor, lib as _ggml
from .gguffile import check_model_file
from .text import utf8
from .tokens import C_SPACE, Marker, common_prefix, split_markers
from .tree import Tree

ALL_LAYERS = 0x7FFFFFFF
DECODE_ERRORS = {
    1: "no free KV-cache slot for the batch (the context is full)",
    2: "aborted",
    -1: "invalid input batch",
}

llama_cpp.llama_backend_init()


GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5
# ggml-rpc's socket errors: a client then aborts (the abort hook below says so in one line),
# a server drops that client
RPC_SOCKET_ERRORS = (b"recv failed", b"send failed")
_log = {"verbose": False, "last": 0}


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level != GGML_LOG_LEVEL_CONT:
        _log["last"] = level if not text.startswith(RPC_SOCKET_ERRORS) else 0
    if _log["verbose"] or _log["last"] == GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text.decode("utf-8", "replace"))


def set_verbose(verbose: bool) -> None:
    """Show all of llama.cpp's log lines on stderr (only its errors when False)."""
    _log["verbose"] = verbose


llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
set_verbose(os.environ.get("GGSPEC_VERBOSE", "") not in ("", "0"))


def default_threads() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Owner:
    """Owns one C handle and frees it exactly once: close(), `with`, or garbage collection."""

    _handle = None

    @property
    def handle(self):
        if self._handle is None:
            raise RuntimeError(f"{type(self).__name__} is closed")
        return self._handle

    def _free(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._handle is not None:
            self._free()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


_NAME_OFFSET = GgmlTensor.name.offset


def layer_input_name(layer: int) -> str:
    """The graph tensor holding the input of target layer `layer`: the token embeddings
    for layer 0, else the output of the layer before."""
    return "embd" if layer == 0 else f"l_out-{layer - 1}"


class _Taps:
    """llama.cpp's graph evaluation callback (cb_eval), copying named F32 tensors of
    every row of a decode: rows (n_batch, len(names) * n_embd), tap k in columns k*n_embd..."""

    def __init__(self, names: Sequence[str], n_embd: int, n_batch: int):
        self.index: dict[bytes, list[int]] = {}  # name -> its taps (a name may repeat)
        for k, n in enumerate(names):
            self.index.setdefault(n.encode(), []).append(k)
        self.n_embd = n_embd
        self.rows = np.zeros((n_batch, len(names) * n_embd), dtype=np.float32)
        self.seen = np.zeros(len(names), dtype=np.int64)  # rows filled per tap this decode
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._eval)

    def _eval(self, tensor, ask, user_data) -> bool:
        # llama.cpp asks about every node of the graph (about a thousand a decode): the
        # name alone answers almost all of them, read without building the struct
        taps = self.index.get(ctypes.string_at(tensor + _NAME_OFFSET))
        if taps is None:
            return not ask
        t = ctypes.cast(tensor, ctypes.POINTER(GgmlTensor)).contents
        if ask:  # do we want this tensor's data once it is computed?
            return t.type == GGML_TYPE_F32 and t.ne[0] == self.n_embd
        n, s = t.ne[1], self.seen[taps[0]]  # a decode split in ubatches calls once per ubatch
        block = np.empty((n, self.n_embd), dtype=np.float32)
        _ggml.ggml_backend_tensor_get(tensor, block.ctypes.data, 0, block.nbytes)
        for k in taps:
            self.rows[s:s + n, k * self.n_embd:(k + 1) * self.n_embd] = block
            self.seen[k] = s + n
        return True  # go on computing


class Model(_Owner):
    """A loaded GGUF model: weights, vocabulary and metadata."""

    def __init__(self, path: str | os.PathLike, cfg: BackendConfig = BackendConfig(), *, heads: bool = False):
        """heads: the file is an EAGLE-3 draft that runs beside its target (refused otherwise)."""
        self.path = Path(path)
        # llama.cpp aborts the process on some malformed files; heads read the target from it
        self.header = check_model_file(self.path, heads=heads)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = ALL_LAYERS if cfg.n_gpu_layers < 0 else cfg.n_gpu_layers
        devices, split = _offload_devices(cfg)  # arrays that must live until the load returns
        if cfg.rpc:
            params.devices = ctypes.addressof(devices)
        if split is not None:
            params.tensor_split = split
        overrides = weights.place(params, self.header)  # likewise (None where nothing is overridden)
        handle = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not handle:
            size = self.path.stat().st_size
            raise ModelFileError(
                f"llama.cpp could not load {self.path} ({size:,} bytes): the file is truncated, "
                "corrupt, or of an architecture this llama.cpp does not support; "
                "download it again (ggspec pull) or check the file"
            )
        self._handle = handle
        self._rpc = cfg.rpc
        _rpc_models.update(cfg.rpc)
        self._vocab = llama_cpp.llama_model_get_vocab(handle)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(handle)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(handle)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.vocab_type = llama_cpp.llama_vocab_type(self.vocab)
        self.eog = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        # a recurrent state (Mamba, RWKV) or a hybrid of one with attention (LFM2,
        # Granite-hybrid, Qwen3-Next, ...): its memory cannot drop the last tokens it read
        self.recurrent = bool(llama_cpp.llama_model_is_recurrent(handle) or llama_cpp.llama_model_is_hybrid(handle))
        self._piece = ctypes.create_string_buffer(256)
        self._bytes: dict[int, bytes] = {}  # token_bytes, as tokens are first rendered
        self._markers: list[Marker] | None = None  # the control tokens, read on first use
        self._templates: dict[bool, Jinja2ChatFormatter] = {}  # by add_generation_prompt, made on first use

    def _free(self) -> None:
        llama_cpp.llama_model_free(self._handle)
        _rpc_models.subtract(self._rpc)

    @property
    def vocab(self):
        """The model's `llama_vocab *` (freed with the model)."""
        self.handle  # raises once the model is closed
        return self._vocab

    def describe(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.handle, buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    @property
    def n_params(self) -> int:
        return llama_cpp.llama_model_n_params(self.handle)

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    @property
    def chat_template(self) -> str | None:
        tmpl = llama_cpp.llama_model_chat_template(self.handle, None)
        return tmpl.decode("utf-8", "replace") if tmpl else None

    @functools.cached_property
    def vocab_sha256(self) -> str:
        """A digest of the tokenizer: its type, BOS / EOS ids and every token's text."""
        digest = hashlib.sha256(f"{self.vocab_type} {self.bos} {self.eos} {self.n_vocab}".encode())
        for t in range(self.n_vocab):
            text = self.token_text(t)
            digest.update(len(text).to_bytes(4, "little") + text)
        return digest.hexdigest()

    def token_text(self, token: int) -> bytes:
        """The vocabulary entry of `token` as stored in the model (not detokenized)."""
        return llama_cpp.llama_vocab_get_text(self.vocab, token)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = utf8(text)
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """The bytes `token` contributes to generated text (control tokens render empty)."""
        data = self._bytes.get(token)
        if data is None:
            data = self._bytes[token] = self._render(token)
        return data

    def pieces(self, tokens: Sequence[int]) -> list[bytes]:
        """token_bytes of each token (a round's tokens: looked up without a Python call
        each, once rendered)."""
        got = list(map(self._bytes.get, tokens))
        return [self.token_bytes(t) for t in tokens] if None in got else got

    def _render(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n]

    def line_ends(self) -> np.ndarray:
        """(n_vocab,) bool: which tokens' text holds a line break."""
        return np.array([b"\n" in self._render(t) for t in range(self.n_vocab)])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.pieces(tokens)).decode("utf-8", "replace")

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """Render chat messages with the Jinja chat template stored in the GGUF, as
        Transformers and llama.cpp's --jinja do (llama-cpp-python's Jinja2ChatFormatter),
        so that what the template adds by itself (Qwen's default system message) is there."""
        for m in messages:  # (text that is not UTF-8 is refused here, by name)
            utf8(m["role"], "a message's role")
            utf8(m["content"], "a message")
        template = self._templates.get(add_generation_prompt)
        if template is None:
            source = llama_cpp.llama_model_chat_template(self.handle, None)
            if not source:
                raise ValueError(f"{self.path.name} has no chat template; pass a raw prompt instead")
            eos, bos = (self.token_text(t).decode("utf-8", "replace") if t >= 0 else "" for t in (self.eos, self.bos))
            try:
                template = Jinja2ChatFormatter(source.decode("utf-8", "replace"), eos, bos, add_generation_prompt)
            except jinja2.TemplateError as e:
                raise ValueError(f"the chat template of {self.path.name} is not valid Jinja ({e}); "
                                 "pass a raw prompt instead") from None
            self._templates[add_generation_prompt] = template
        try:
            return template(messages=[dict(m) for m in messages]).prompt
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"the chat template of {self.path.name} cannot render these messages ({e}); "
                             "pass a raw prompt instead") from None

    def tokenize_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """Chat messages rendered with the model's template and tokenized so that only the
        template's own markers become control tokens: message contents are text (content
        holding "<|im_start|>system" stays those characters, it cannot open a turn). For
        contents without marker text this equals tokenizing the rendered prompt with
        special-token parsing."""
        text, contents = self._render_marking_contents(messages, add_generation_prompt)
        if self._markers is None:
            control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
            vocab = self.vocab
            attrs = {t: llama_cpp.llama_vocab_get_attr(vocab, t) for t in range(self.n_vocab)}
            self._markers = [Marker(self.token_text(t).decode("utf-8", "replace"), t,
                                    bool(a & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP),
                                    bool(a & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP))
                             for t, a in attrs.items() if a & control]
        tokens = []
        for piece in split_markers(text, self._markers, contents):
            if isinstance(piece, int):
                tokens.append(piece)
            else:
                tokens += self.tokenize(piece, add_special=False, parse_special=False)
        if self.add_bos and tokens[:1] != [self.bos]:  # (templates that write bos_token have it already)
            tokens.insert(0, self.bos)
        if llama_cpp.llama_vocab_get_add_eos(self.vocab):
            tokens.append(self.eos)
        return tokens

    def _render_marking_contents(self, messages: Sequence[dict],
                                 add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        """The rendered prompt and the [start, end) range of each message's content in it.

        The template is rendered twice: with the contents, and with a unique placeholder
        for each; the placeholders cut the second rendering into the template's own text,
        and the first must be those pieces around the contents (as given, or trimmed as
        some templates do)."""
        nonce = secrets.token_hex(8)
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        shape = self.apply_chat_template(
            [{**m, "content": f"\ue000{nonce}.{i}\ue001"} if m["content"] else m for i, m in enumerate(messages)],
            add_generation_prompt=add_generation_prompt)
        parts = re.split(f"\ue000{nonce}\\.(\\d+)\ue001", shape)
        templates, order = parts[0::2], [int(i) for i in parts[1::2]]  # T0 content T1 content ... Tk
        pos, ranges = 0, []
        for k, i in enumerate(order):
            if not text.startswith(templates[k], pos):
                break
            pos += len(templates[k])
            content = messages[i]["content"]
            rendered = next((r for r in (content, content.strip(C_SPACE))
                             if text.startswith(r + templates[k + 1], pos)), None)
            if rendered is None:
                break
            ranges.append((pos, pos + len(rendered)))
            pos += len(rendered)
        else:
            if text[pos:] == templates[-1]:
                return text, ranges
        raise ValueError(f"the chat template of {self.path.name} changes message contents in a way "
                         "ggspec cannot follow; pass a raw prompt instead")


def _context_params(cfg: BackendConfig, n_ctx: int, n_batch: int, n_seq_max: int, n_threads: int):
    """llama_context_params with these sizes, threads and cfg's flash attention."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = n_seq_max
    params.n_threads = params.n_threads_batch = n_threads
    if cfg.flash_attn is not None:
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if cfg.flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    return params


def _open_context(model: Model, params, stack: ExitStack):
    """A llama_context over model and a llama_batch of params' sizes, freed by stack."""
    handle = llama_cpp.llama_init_from_model(model.handle, params)
    if not handle:
        raise ModelFileError(f"llama.cpp could not create a context of {params.n_ctx} tokens "
                             f"for {model.path}; try a smaller context size")
    stack.callback(llama_cpp.llama_free, handle)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, params.n_seq_max)
    stack.callback(llama_cpp.llama_batch_free, batch)
    return handle, batch


STATE_FLAGS = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY  # the recurrent part only (a hybrid's attention cache is cut)


class Context(_Owner):
    """An inference context over a Model: KV cache, batch, logits (and hidden states).

    `tokens` mirrors what sequence 0 of the KV cache holds; `eval`/`truncate` keep it true.

    A recurrent or hybrid model's memory cannot drop its last tokens (llama.cpp issue
    #20039). Where llama.cpp offers rollback slots for the architecture, the context keeps
    `rollback` of them (the states after each of the last decode's final tokens) and
    truncate() rolls back through them; otherwise, before a decode that may be cut back,
    checkpoint() saves the recurrent state (llama.cpp's partial state: for a hybrid, the
    attention cache is still cut), and truncate() restores it and replays the kept tokens.
    """

    def __init__(self, model: Model, cfg: BackendConfig = BackendConfig(), *,
                 n_seq_max: int = 1, embeddings: bool = False, shared_cache: bool | None = None,
                 rollback: int = 0, taps: Sequence[str] = ()):
        if model.recurrent and n_seq_max > 1:
            raise ValueError(f"{model.path.name} keeps a recurrent state, which cannot branch: a context "
                             "over it holds one sequence (no tree drafts, no Medusa heads)")
        self.model = model
        self.cfg = cfg
        params = _context_params(cfg, cfg.n_ctx, cfg.n_batch, n_seq_max, cfg.n_threads or default_threads())
        params.n_rs_seq = rollback if model.recurrent else 0
        # one cache that sequences share cells of (trees, seq_cp) or, with
        # shared_cache=False, a cache of n_ctx / n_seq_max cells per independent sequence
        params.kv_unified = n_seq_max > 1 if shared_cache is None else shared_cache
        params.embeddings = embeddings
        if embeddings:
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        # taps: graph tensors (layer_input_name) copied for every row of each decode
        self._taps = _Taps(taps, model.n_embd, cfg.n_batch) if taps else None
        if self._taps is not None:
            params.cb_eval = self._taps.callback
        with ExitStack() as stack:
            handle, batch = _open_context(model, params, stack)
            self._cleanup = stack.pop_all()
        self._handle = handle
        self._batch = batch
        self._mem = llama_cpp.llama_get_memory(handle)
        self.n_ctx = llama_cpp.llama_n_ctx(handle)      # llama.cpp may round the request up
        self.n_batch = llama_cpp.llama_n_batch(handle)  # and clamp the batch to the context
        self.n_seq_max = n_seq_max
        self.n_rs_seq = llama_cpp.llama_n_rs_seq(handle)  # 0 where the architecture has no rollback
        self.n_threads = params.n_threads
        self.embeddings = embeddings
        self._positions = np.zeros(0, dtype=np.int64)  # of the rows of the last decode (taps, embeddings)
        self.n_vocab = model.n_vocab
        self.tokens: list[int] = []
        self._stale = False  # the cache may hold cells beyond `tokens` (a call was interrupted)
        self.busy_seconds = 0.0  # time spent inside llama_decode
        n = cfg.n_batch
        self._nseq = np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))
        # the rows are written through ctypes pointers: for a round's few rows, numpy's
        # conversions cost more (twice as much for five rows, right after a decode)
        self._tok, self._pos, self._out = batch.token, batch.pos, batch.logits
        self._views: dict[tuple[int, int], np.ndarray] = {}
        self._rollback = 0  # tokens the memory can roll back now (slots of the last decode)
        self._saved = (ctypes.c_uint8 * 0)()  # a saved recurrent state (llama.cpp's format) ...
        self._saved_at: int | None = None  # ... of the first _saved_at tokens
        # a recurrent state that can be neither rolled back nor saved: decode without drafts
        self.can_rewind = not model.recurrent or llama_cpp.llama_state_seq_get_size_ext(handle, 0, STATE_FLAGS) > 0
        self._single_sequence()

    def _single_sequence(self) -> None:
        """Every batch row in sequence 0 only (set once; a tree batch sets its own ids)."""
        for i in range(self.n_batch):
            self._batch.seq_id[i][0] = 0
        self._nseq[:] = 1
        self._tree_ids = False

    def _free(self) -> None:
        self._cleanup.close()  # the batch, then the context

    @property
    def handle(self):
        if self.model._handle is None:
            raise RuntimeError("the Context's model is closed")
        return super().handle

    @property
    def _memory(self):
        """The context's `llama_memory_t` (freed with the context)."""
        self.handle  # raises once the context or its model is closed
        return self._mem

    def decode(self, tokens: Sequence[int], positions: Sequence[int],
               seq_ids: Sequence[Sequence[int]] | None, want: Sequence[int]) -> np.ndarray:
        """Run ONE llama_decode over `tokens` (at most n_batch).

        seq_ids[i] lists the sequences token i belongs to (None: all in sequence 0);
        want[i] asks for row i's logits. Returns a zero-copy (n_wanted, n_vocab) float32
        view that stays valid until the next decode on this context.
        """
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"a batch holds 1 to {self.n_batch} tokens, got {n}")
        handle = self._writable()
        tok, pos, out = self._tok, self._pos, self._out
        for i in range(n):
            tok[i], pos[i], out[i] = tokens[i], positions[i], want[i]
        if seq_ids is None:
            if self._tree_ids:  # a tree batch left other ids: back to sequence 0
                self._single_sequence()
        else:
            self._tree_ids = True
            for i, ids in enumerate(seq_ids):
                self._nseq[i] = len(ids)
                for j, s in enumerate(ids):
                    self._batch.seq_id[i][j] = s
        return self._run(handle, n, n - out[:n].count(0), positions, seq_ids is None)

    def _writable(self):
        """The handle, checked before anything is written into the batch (which close()
        frees too)."""
        handle = self._handle
        if handle is None or self.model._handle is None:
            handle = self.handle  # raises
        return handle

    def _run(self, handle, n: int, n_out: int, positions: Sequence[int], sequential: bool) -> np.ndarray:
        """llama_decode of the n rows written into the batch, n_out of which asked for
        logits (sequential: all in sequence 0): their (n_out, n_vocab) view."""
        self._batch.n_tokens = n
        if self._taps is not None:
            self._taps.seen[:] = 0
        if self._taps is not None or self.embeddings:
            self._positions = np.array(positions, dtype=np.int64)
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(handle, self._batch)
        # fetching the logits waits for the backend to finish and copy them: llama.cpp's time
        address = _logits_address(handle) if rc == 0 and n_out else None
        self.busy_seconds += time.perf_counter() - t0
        if rc != 0:
            reason = DECODE_ERRORS.get(rc, "unknown error")
            raise DecodeError(f"llama_decode failed with code {rc}: {reason}")
        self._rollback = min(self.n_rs_seq, n - 1) if sequential else 0
        if n_out == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        if self.embeddings and n_out < n:  # llama.cpp then outputs every row: pick (a copy)
            return self._logits_view(address, n)[np.array(self._out[:n]) != 0]
        return self._logits_view(address, n_out)

    def _logits_view(self, address: int, rows: int) -> np.ndarray:
        """A (rows, n_vocab) view of llama.cpp's logits buffer, made once per buffer
        address and row count (building one costs more than a plain round's other Python
        work once llama_decode has cooled the CPU caches)."""
        view = self._views.get((address, rows))
        if view is None:
            if len(self._views) > 64:  # llama.cpp moved its buffer: the old views are stale
                self._views.clear()
            data = (ctypes.c_float * (rows * self.n_vocab)).from_address(address)
            view = self._views[address, rows] = np.ctypeslib.as_array(data).reshape(rows, self.n_vocab)
        return view

    def hidden(self, n_rows: int) -> np.ndarray:
        """Zero-copy (n_rows, n_embd) view of the last decode's output embeddings
        (the input of the output layer) of its first n_rows rows: with embeddings=True
        llama.cpp outputs every row of a batch, whatever rows asked for logits."""
        ptr = llama_cpp.llama_get_embeddings(self.handle)
        if not ptr:
            raise RuntimeError("this context was created without embeddings=True")
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.model.n_embd))

    def tapped(self, n_rows: int) -> np.ndarray:
        """(n_rows, n_taps * n_embd) view of the tapped tensors of the last decode's first
        n_rows rows (taps in the order given at creation)."""
        if self._taps is None:
            raise RuntimeError("this context was created without taps")
        if (self._taps.seen < n_rows).any():
            raise RuntimeError(f"llama.cpp computed {self._taps.seen.min()} rows of a tapped "
                               f"tensor, {n_rows} asked (is a tap name wrong?)")
        return self._taps.rows[:n_rows]

    def tapped_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions (n,), tapped tensors (n, n_taps * n_embd)) of every row of the last
        decode (views, valid until the next decode)."""
        n = len(self._positions) if self._taps is not None else 0
        return self._positions[:n], self.tapped(n)

    def hidden_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions (n,), output embeddings (n, n_embd)) of every row of the last decode
        (views, valid until the next decode; embeddings=True)."""
        n = len(self._positions)
        return self._positions, self.hidden(n) if n else np.zeros((0, self.model.n_embd), np.float32)

    def eval(self, tokens: Sequence[int], *, logits: str = "last") -> np.ndarray:
        """Append `tokens` to sequence 0 at the next positions, in n_batch chunks.

        logits: "last" -> (1, n_vocab) for the final token, "all" -> one row per token
        (only when len(tokens) <= n_batch), "none" -> empty.
        """
        n = len(tokens)
        p0 = len(self.tokens)
        if p0 + n > self.n_ctx:
            raise DecodeError(f"{p0 + n} tokens do not fit in the context of {self.n_ctx}")
        if n > self.n_batch:  # a chunk per decode
            if logits == "all":
                raise ValueError(f"logits for every row need a batch of at most {self.n_batch} tokens")
            last = (n - 1) // self.n_batch * self.n_batch
            for start in range(0, last, self.n_batch):
                self.eval(tokens[start:start + self.n_batch], logits="none")
            return self.eval(tokens[last:], logits=logits)
        if self._stale:
            self.truncate(p0)
        if n == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        # the mirror grows only after a successful decode: an interrupt or error in
        # between leaves it a prefix of the cache, and the next call truncates the rest
        self._stale = True
        if n == 1:  # (a plain round's, a drafted token's: without decode()'s lists and frames)
            handle = self._writable()
            if self._tree_ids:
                self._single_sequence()
            self._tok[0] = tokens[0]
            self._pos[0] = p0
            self._out[0] = n_out = int(logits != "none")
            out = self._run(handle, 1, n_out, (p0,), True)
        else:
            want = [logits == "all"] * n
            want[-1] = logits != "none"
            out = self.decode(tokens, range(p0, p0 + n), None, want)
        self.tokens.extend(tokens)
        self._stale = False
        return out

    def eval_tree(self, tokens: Sequence[int], tree: Tree) -> np.ndarray:
        """ONE llama_decode of [pending, *nodes]: the pending token extends sequence 0 and
        node i sits at depth tree.depths[i] after it, on the sequences of the paths through
        it; every other path first shares the cached prefix (seq_cp). Logits for every row:
        (len(tokens), n_vocab)."""
        n = len(self.tokens)
        n_paths = len(tree.paths)
        if n_paths > self.n_seq_max:
            raise ValueError(f"a tree of {n_paths} paths needs a context with n_seq_max >= {n_paths}")
        if n + len(tokens) > self.n_ctx:
            raise DecodeError(f"{n + len(tokens)} tokens do not fit in the context of {self.n_ctx}")
        if self._stale:
            self.truncate(n)
        self._stale = True  # until keep_path: the tree's cells lie beyond `tokens`
        for s in range(1, n_paths):
            self.seq_cp(0, s, 0, n)
        positions = [n, *(n + tree.depths)]
        rows = self.decode(tokens, positions, tree.seq_ids(), np.ones(len(tokens), dtype=np.int8))
        self.tokens.append(tokens[0])
        return rows

    def keep_path(self, path: int, tokens: Sequence[int]) -> None:
        """After eval_tree: keep in sequence 0 the first len(tokens) nodes of path `path`
        (their tokens) and drop every other cell the tree added."""
        n, m = len(self.tokens), len(tokens)
        if path == 0:
            self.seq_rm(0, n + m, -1)
        else:
            self.seq_rm(0, n, -1)
            self.seq_cp(path, 0, n, n + m)
        self.seq_keep(0)
        self.tokens.extend(tokens)
        self._stale = False

    def set_threads(self, n: int) -> None:
        """Use n CPU threads for the next decodes (single tokens and batches)."""
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"threads must be a positive integer, got {n!r}")
        llama_cpp.llama_set_n_threads(self.handle, n, n)
        self.n_threads = n

    def truncate(self, n: int) -> None:
        """Drop every cached position >= n, in every sequence (also cells a failed or
        interrupted call left beyond `tokens`). The mirror shrinks first: interrupted in
        between, it is still a prefix of the cache. Where the memory cannot drop them (a
        recurrent state past its rollback slots), the state saved by checkpoint() at or
        before n is restored (else the memory is cleared) and the tokens up to n replayed."""
        if n >= len(self.tokens) and not self._stale:
            return  # nothing beyond n (a plain round, a draft accepted whole)
        self._stale = True
        del self.tokens[n:]
        if self._saved_at is not None and self._saved_at > n:
            self._saved_at = None  # saved for tokens this cache no longer holds
        if self._cut(n):
            self._stale = False
            return
        kept = self.tokens[:]
        held = self._saved_at or 0
        del self.tokens[held:]
        if not (held and self._restore()):
            held, self._saved_at = 0, None
            llama_cpp.llama_memory_clear(self._memory, True)
        self._stale = False
        self.eval(kept[held:], logits="none")

    def _cut(self, n: int) -> bool:
        """Drop every cached position >= n if the memory can, without decoding."""
        if not self.model.recurrent:
            return bool(llama_cpp.llama_memory_seq_rm(self._memory, -1, n, -1))
        end = llama_cpp.llama_memory_seq_pos_max(self._memory, 0) + 1
        if n < end:
            # a rollback slot holds the state r tokens back only within the last decode
            # (llama.cpp would read a stale slot for more): check before asking
            if end - n > self._rollback:
                return False
            self._rollback = 0  # a slot serves once, until the next decode
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, 0, n, -1))

    def checkpoint(self, tokens: int, keep: int) -> None:
        """The next eval of `tokens` tokens may be cut back to its first `keep`: where the
        memory cannot drop the rest itself (a recurrent state without enough rollback
        slots), save the state now (truncate() restores it and replays what it keeps)."""
        if not self.model.recurrent or tokens <= keep or (keep >= 1 and tokens - keep <= self.n_rs_seq):
            return
        if self._stale:
            self.truncate(len(self.tokens))
        if self.can_rewind:
            self._save()

    def _save(self) -> bool:
        handle = self.handle
        self._saved_at = None
        size = llama_cpp.llama_state_seq_get_size_ext(handle, 0, STATE_FLAGS)
        if len(self._saved) != size:
            self._saved = (ctypes.c_uint8 * size)()
        if size == 0 or llama_cpp.llama_state_seq_get_data_ext(handle, self._saved, size, 0, STATE_FLAGS) == 0:
            self.can_rewind = False
            print(f"ggspec: llama.cpp could not save the recurrent state of {self.model.path.name}, "
                  "so a rejected draft cannot be undone: decoding without drafts", file=sys.stderr)
            return False
        self._saved_at = len(self.tokens)
        return True

    def _restore(self) -> bool:
        """Bring the memory back to the saved state (for a hybrid: the recurrent part; its
        attention cache is cut at the same position)."""
        if not llama_cpp.llama_state_seq_set_data_ext(self.handle, self._saved, len(self._saved), 0, STATE_FLAGS):
            return False
        self._rollback = 0
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, 0, self._saved_at, -1))

    def time_state_copy(self, repeats: int = 3) -> float:
        """Seconds one save or one restore of the recurrent state takes (the fastest of
        `repeats` save-and-restore pairs, halved; the state is the same afterwards), 0 for
        a model without one. Its size does not grow with the text."""
        if not self.model.recurrent or not self.can_rewind:
            return 0.0
        if self._stale:
            self.truncate(len(self.tokens))
        best = np.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            if not (self._save() and self._restore()):
                return 0.0
            best = min(best, time.perf_counter() - t0)
        return best / 2

    def sync(self, tokens: Sequence[int]) -> int:
        """Keep the longest cached prefix shared with `tokens`; return its length."""
        n = common_prefix(self.tokens, tokens)
        self.truncate(n)
        return n

    def clear(self) -> None:
        self._stale = True
        self.tokens.clear()  # before the cache, as in truncate
        self._saved_at = None
        llama_cpp.llama_memory_clear(self._memory, True)
        self._stale = False

    def save_state(self) -> np.ndarray:
        """Sequence 0 of the KV cache, the cells of `tokens`, as llama.cpp serialises it
        (llama_state_seq_get_data): a (n_bytes,) uint8 array."""
        if self._stale:
            self.truncate(len(self.tokens))
        handle = self.handle
        data = np.empty(llama_cpp.llama_state_seq_get_size(handle, 0), dtype=np.uint8)
        n = llama_cpp.llama_state_seq_get_data(handle, _bytes_pointer(data), data.size, 0)
        if n != data.size:
            raise DecodeError(f"llama.cpp wrote {n} of the {data.size} bytes of the KV cache")
        return data

    def load_state(self, data, tokens: Sequence[int]) -> tuple[np.ndarray, list[int]]:
        """Replace sequence 0 with a saved state (from save_state) that holds `tokens`;
        return the state it replaced and its tokens. If llama.cpp refuses it, the previous
        state is put back and SessionFileError raised."""
        previous, kept = self.save_state(), list(self.tokens)
        if self._set_state(data, tokens):
            return previous, kept
        if not self._set_state(previous, kept):
            self.clear()  # could not even put it back: an empty cache, which the mirror says
        raise SessionFileError(f"llama.cpp refused the saved KV cache of {self.model.path.name} "
                               "(saved with other context settings?); the session is unchanged")

    def _set_state(self, data, tokens: Sequence[int]) -> bool:
        handle = self.handle
        data = np.frombuffer(data, dtype=np.uint8)
        self._stale = True
        self.tokens.clear()  # until the cache holds `tokens`: a prefix of it on every path
        self._saved_at, self._rollback = None, 0  # a recurrent checkpoint or slot is of the old state
        n = llama_cpp.llama_state_seq_set_data(handle, _bytes_pointer(data), data.size, 0)
        held = llama_cpp.llama_memory_seq_pos_max(self._memory, 0) + 1
        if n != data.size or held != len(tokens):
            return False
        self.tokens.extend(tokens)
        self._stale = False
        return True

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_cp(self._memory, src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_keep(self._memory, seq)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq, p0, p1))


# llama.cpp's staging API (src/llama-ext.h) is exported only as C++ symbols (Itanium ABI:
# Linux, macOS): looked up by their mangled names in llama-cpp-python's own handle to
# libllama (each lookup a new function object, argtypes set here); None where absent
_libllama = llama_cpp.llama_cpp._lib


# llama_get_logits returning the address as an int (llama_cpp's binding returns a pointer
# object, which costs a cast per round to key the cached views)
_logits_address = _libllama["llama_get_logits"]
_logits_address.restype, _logits_address.argtypes = ctypes.c_void_p, [ctypes.c_void_p]


def _staging(mangled: str, restype, argtypes):
    try:
        f = _libllama[mangled]
    except AttributeError:
        return None
    f.restype, f.argtypes = restype, argtypes
    return f


_set_embeddings_nextn = _staging("_Z26llama_set_embeddings_nextnP13llama_contextbb", None,
                                 [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool])
_get_embeddings_nextn = _staging("_Z26llama_get_embeddings_nextnP13llama_context",
                                 ctypes.POINTER(ctypes.c_float), [ctypes.c_void_p])


def eagle_graph_missing() -> str | None:
    """Why llama.cpp's eagle3 graph cannot be driven here (None: it can)."""
    if _set_embeddings_nextn is None or _get_embeddings_nextn is None:
        return ("this llama.cpp does not export llama_set_embeddings_nextn / llama_get_embeddings_nextn "
                "(C++ symbols of its staging API), which return the EAGLE draft's pre-norm output; "
                "use the numpy EAGLE path (--eagle-backend numpy)")
    return None


class EagleContext(_Owner):
    """llama.cpp's own eagle3 graph over an EAGLE-3 draft `model`, with its own KV cache.

    encode(): its encoder, fc over the target's three tapped features (rows of 3 * target
    hidden) -> g. decode(): its one-layer decoder; row i carries token i and g_i (batch
    embeddings), at positions[i], in sequences seq_ids[i]; returns the logits over the
    target vocabulary (-inf off the draft's d2t) and the pre-norm output of each row
    (llama.cpp's "nextn" embeddings, which deeper steps feed back as g). A draft without
    its own token embedding or output uses the target's: `target` is the context it reads
    them through (llama.cpp's ctx_other), and must outlive this one (it is held here).
    """

    def __init__(self, model: Model, target: Context, n_ctx: int, n_seq_max: int):
        missing = eagle_graph_missing()
        if missing:
            raise GgspecError(missing)
        if model.metadata("general.architecture") != "eagle3":
            raise ModelFileError(f"{model.path} is not an eagle3 draft")
        self.model, self.target = model, target
        n_batch = target.n_batch
        params = _context_params(target.cfg, n_ctx, n_batch, n_seq_max, target.n_threads)
        params.kv_unified = True  # sequences share the cells of the committed rows (seq_cp)
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        params.ctx_other = target.handle
        self.n_embd = model.n_embd
        self.n_embd_enc = 3 * int(model.metadata("eagle3.target_hidden_size"))
        self._g = np.zeros((n_batch, self.n_embd), dtype=np.float32)  # the decoder's g rows
        with ExitStack() as stack:
            handle, batch = _open_context(model, params, stack)  # the batch: tokens, and g below
            stack.callback(setattr, batch, "embd", None)  # _g is not the batch's to free
            batch.embd = self._g.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            enc = llama_cpp.llama_batch_init(n_batch, self.n_embd_enc, 1)  # feature rows
            stack.callback(llama_cpp.llama_batch_free, enc)
            self._cleanup = stack.pop_all()
        self._handle, self._batch, self._enc = handle, batch, enc
        _set_embeddings_nextn(handle, True, True)  # pre-norm rows of the output rows
        self._mem = llama_cpp.llama_get_memory(handle)
        self.n_ctx, self.n_batch, self.n_seq_max = llama_cpp.llama_n_ctx(handle), n_batch, n_seq_max
        self.n_vocab = model.n_vocab
        self.busy_seconds = 0.0
        self._tok = np.ctypeslib.as_array(batch.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(batch.pos, shape=(n_batch,))
        self._nseq = np.ctypeslib.as_array(batch.n_seq_id, shape=(n_batch,))
        self._out = np.ctypeslib.as_array(batch.logits, shape=(n_batch,))
        self._features = np.ctypeslib.as_array(enc.embd, shape=(n_batch, self.n_embd_enc))
        self._enc_pos = np.ctypeslib.as_array(enc.pos, shape=(n_batch,))
        np.ctypeslib.as_array(enc.n_seq_id, shape=(n_batch,))[:] = 1
        for i in range(n_batch):
            enc.seq_id[i][0] = 0
        np.ctypeslib.as_array(enc.logits, shape=(n_batch,))[:] = 1

    def _free(self) -> None:
        self._cleanup.close()  # the batches, then the context

    @property
    def handle(self):
        if self.model._handle is None or self.target._handle is None:
            raise RuntimeError("the EagleContext's draft or target is closed")
        return super().handle

    def _run(self, call, batch) -> None:
        t0 = time.perf_counter()
        rc = call(self.handle, batch)
        self.busy_seconds += time.perf_counter() - t0
        if rc != 0:
            raise DecodeError(f"llama.cpp's eagle3 graph failed with code {rc}: "
                              f"{DECODE_ERRORS.get(rc, 'unknown error')}")

    def encode(self, features: np.ndarray) -> np.ndarray:
        """g = fc(features) by the eagle3 encoder: (n, 3 * target hidden) -> (n, h), a copy."""
        features = np.asarray(features, dtype=np.float32)
        out = np.empty((len(features), self.n_embd), dtype=np.float32)
        for s in range(0, len(features), self.n_batch):  # the encoder takes one ubatch at a time
            chunk = features[s:s + self.n_batch]
            self._features[:len(chunk)] = chunk
            self._enc.n_tokens = len(chunk)
            # positions unused by the encoder, but checked: after sequence 0's, as llama.cpp's own driver
            self._enc_pos[:len(chunk)] = self.seq_pos_max(0) + 1 + np.arange(len(chunk))
            self._run(llama_cpp.llama_encode, self._enc)
            out[s:s + len(chunk)] = np.ctypeslib.as_array(_get_embeddings_nextn(self.handle),
                                                          shape=(len(chunk), self.n_embd))
        return out

    def decode(self, tokens: Sequence[int], g: np.ndarray, positions: Sequence[int],
               seq_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """ONE llama_decode of rows (token, g) (at most n_batch). Returns views, valid until
        the next call: logits (n, n_vocab), pre-norm outputs (n, h). Every row is an output
        (the eagle3 graph does not select output rows: llama.cpp would return its first ones)."""
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"a batch holds 1 to {self.n_batch} rows, got {n}")
        b = self._batch
        b.n_tokens = n
        self._tok[:n], self._pos[:n], self._out[:n] = tokens, positions, 1
        self._g[:n] = g
        for i, ids in enumerate(seq_ids):
            self._nseq[i] = len(ids)
            for j, s in enumerate(ids):
                b.seq_id[i][j] = s
        self._run(llama_cpp.llama_decode, b)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.handle), shape=(n, self.n_vocab))
        pre = np.ctypeslib.as_array(_get_embeddings_nextn(self.handle), shape=(n, self.n_embd))
        return logits, pre

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.handle  # raises once closed
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        self.handle
        llama_cpp.llama_memory_seq_rm(self._mem, seq, p0, p1)

    def seq_pos_max(self, seq: int) -> int:
        self.handle
        return llama_cpp.llama_memory_seq_pos_max(self._mem, seq)


def _bytes_pointer(data: np.ndarray):
    return data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


VOCAB_MAX_SIZE_DIFFERENCE = 128
VOCAB_CHECK_START_TOKEN_ID = 5


def check_vocab_compatible(target: Model, draft: Model) -> None:
    """Refuse a draft whose tokenizer differs from the target's (llama.cpp's rules in
    common/speculative.cpp): same vocabulary type, BOS/EOS ids and add-BOS flag, sizes
    within 128, and identical token text for every shared id from 5 up."""
    name = f"draft {draft.path.name} and target {target.path.name}"
    facts = [("vocabulary type", target.vocab_type, draft.vocab_type),
             ("add-BOS flag", target.add_bos, draft.add_bos),
             ("BOS token id", target.bos, draft.bos),
             ("EOS token id", target.eos, draft.eos)]
    for what, t, d in facts:
        if t != d:
            raise VocabMismatchError(f"{name} do not share a tokenizer: {what} {d} != {t}")
    if abs(target.n_vocab - draft.n_vocab) > VOCAB_MAX_SIZE_DIFFERENCE:
        raise VocabMismatchError(f"{name} do not share a tokenizer: vocabulary sizes "
                                 f"{draft.n_vocab} and {target.n_vocab} differ by more than "
                                 f"{VOCAB_MAX_SIZE_DIFFERENCE}")
    for i in range(VOCAB_CHECK_START_TOKEN_ID, min(target.n_vocab, draft.n_vocab)):
        t, d = target.token_text(i), draft.token_text(i)
        if t != d:
            raise VocabMismatchError(f"{name} do not share a tokenizer: token {i} is {d!r} in "
                                     f"the draft but {t!r} in the target")


# ---------------------------------------------------------------- devices and ggml RPC

RPC_REINSTALL = ("this llama-cpp-python was built without RPC support; reinstall it with: "
                 'CMAKE_ARGS="-DGGML_RPC=on" pip install --no-cache-dir --force-reinstall llama-cpp-python')
RPC_TIMEOUT = 5.0  # seconds a server may take to accept and answer the handshake
RPC_CMD_HELLO = 14  # fixed across protocol versions (ggml-rpc.cpp asserts it)
RPC_HELLO_SIZE = 24  # the request's connection capabilities, none asked for here
DEVICE_GPU, DEVICE_IGPU = 1, 2  # enum ggml_backend_dev_type (ggml.DEVICE_CPU = 0)

_rpc_add_server_t = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_rpc_start_server_t = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                       ctypes.c_void_p)
_rpc_servers: list[str] = []  # every RPC server this process has attached, in order
_rpc_models: Counter[str] = Counter()  # open models on each server: llama.cpp's connection to it is open


def rpc_supported() -> bool:
    """Whether the installed llama.cpp was built with its RPC backend (-DGGML_RPC=on)."""
    return bool(llama_cpp.llama_supports_rpc())


def _rpc_function(name: str, prototype):
    """A function of the RPC backend, looked up as llama.cpp's own tools do."""
    reg = _ggml.ggml_backend_reg_by_name(b"RPC")
    address = _ggml.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    if not address:
        raise GgspecError(RPC_REINSTALL)
    return prototype(address)


def _local_gpus() -> list[int]:
    """The local devices llama.cpp offloads to by default: discrete GPUs, or else integrated ones."""
    devices = [_ggml.ggml_backend_dev_get(i) for i in range(_ggml.ggml_backend_dev_count())]
    kinds = [_ggml.ggml_backend_dev_type(d) for d in devices]
    gpus = [d for d, k in zip(devices, kinds) if k == DEVICE_GPU]
    return gpus or [d for d, k in zip(devices, kinds) if k == DEVICE_IGPU]


def _offload_devices(cfg: BackendConfig):
    """The NULL-terminated device list (RPC servers first, then the local GPUs, llama.cpp's
    order) and the tensor_split array for llama_model_params; (None, None) without either."""
    if not cfg.rpc and cfg.tensor_split is None:
        return None, None
    remote, local = [d for endpoint in cfg.rpc for d in _rpc_devices(endpoint)], _local_gpus()
    devices = remote + local
    split = None
    if cfg.tensor_split is not None:
        if len(cfg.tensor_split) != len(devices):
            raise ValueError(f"tensor_split gives {len(cfg.tensor_split)} shares for {len(devices)} devices "
                             f"({len(remote)} on RPC servers, then {len(local)} local GPUs)")
        split = (ctypes.c_float * llama_cpp.llama_max_devices())(*cfg.tensor_split)
    return (ctypes.c_void_p * (len(devices) + 1))(*devices, None), split


def _rpc_devices(endpoint: str) -> list[int]:
    """The devices of the RPC server at endpoint, connecting to it once per process."""
    add_server = _rpc_function("ggml_backend_rpc_add_server", _rpc_add_server_t)
    if not _rpc_models[endpoint]:  # (a server busy with this process's connection would not answer)
        rpc_hello(endpoint)  # llama.cpp aborts the process when a server cannot be reached
    if endpoint not in _rpc_servers:
        _rpc_servers.append(endpoint)
    _ggml.ggml_set_abort_callback(ctypes.cast(_on_ggml_abort, ctypes.c_void_p))
    reg = add_server(endpoint.encode())
    n = _ggml.ggml_backend_reg_dev_count(reg) if reg else 0
    if n == 0:
        raise GgspecError(f"RPC server {endpoint} has no devices")
    return [_ggml.ggml_backend_reg_dev_get(reg, i) for i in range(n)]


def rpc_hello(endpoint: str, timeout: float | None = None) -> None:
    """Connect to the ggml RPC server at endpoint and exchange the protocol's HELLO, within
    timeout seconds (None: RPC_TIMEOUT); a GgspecError naming the endpoint if that fails."""
    timeout = RPC_TIMEOUT if timeout is None else timeout
    host, _, port = endpoint.rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as e:
        why = f"no answer within {timeout:g} s" if isinstance(e, TimeoutError) else e.strerror or str(e)
        raise GgspecError(f"cannot reach RPC server {endpoint}: {why}; start one there with: "
                          f"ggspec rpc-server --host {host} --port {port}") from None
    with sock:
        try:
            sock.sendall(bytes([RPC_CMD_HELLO]) + struct.pack("<Q", RPC_HELLO_SIZE) + bytes(RPC_HELLO_SIZE))
            answer = sock.recv(8)
        except TimeoutError:
            raise GgspecError(f"RPC server {endpoint} did not answer within {timeout:g} s; a server serves one "
                              "client at a time: is another program using it?") from None
        except OSError:
            answer = b""
    if len(answer) < 8:
        raise GgspecError(f"{endpoint} closed the connection at the RPC handshake: it is not a ggml RPC server, "
                          "or one of another llama.cpp version")


def _refused(endpoint: str) -> bool:
    """Whether nothing accepts connections at endpoint (a server whose queue is full, busy
    with its client, lets the attempt time out instead)."""
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except TimeoutError:
        return False
    except OSError:
        return True
    return False


def _lost_servers(tries: int = 5, pause: float = 0.2) -> list[str]:
    """The attached servers that refuse connections, looking a few times: a server killed
    a moment ago may close its client's connection before its listening socket."""
    for _ in range(tries):
        lost = [e for e in _rpc_servers if _refused(e)]
        if lost:
            return lost
        time.sleep(pause)
    return []


@ctypes.CFUNCTYPE(None, ctypes.c_char_p)
def _on_ggml_abort(message: bytes) -> None:
    """ggml calls this (from any thread) right before abort(). ggml-rpc aborts when a server
    is lost, and the process cannot go on: name the lost servers in one line and exit."""
    text = message.decode("utf-8", "replace")
    if "ggml-rpc" not in text:
        sys.stderr.write(text + "\n")  # abort() follows, as without this hook
        return
    lost = _lost_servers()
    which = f"RPC server {', '.join(lost)}" if lost else f"one of the RPC servers {', '.join(_rpc_servers)}"
    sys.stderr.write(f"Error: lost {which} ({text.split(': ', 1)[-1].strip()}); "
                     "llama.cpp cannot go on without it: restart it and run again\n")
    sys.stderr.flush()
    os._exit(1)


def serve_rpc(endpoint: str, threads: int, cache_dir: str | None = None) -> None:
    """Serve this machine's GPUs (or else its CPU) as a ggml RPC server at endpoint
    ("HOST:PORT") until interrupted. llama.cpp prints its banner on stdout."""
    start = _rpc_function("ggml_backend_rpc_start_server", _rpc_start_server_t)
    devices = _local_gpus() or [ggml.cpu_device()]
    array = (ctypes.c_void_p * len(devices))(*devices)
    cache = None if cache_dir is None else os.fsencode(cache_dir)
    # in a thread: a call into C cannot be interrupted, and Ctrl-C must stop the server
    server = threading.Thread(target=start, args=(endpoint.encode(), cache, threads, len(devices), array),
                              daemon=True, name="ggml-rpc-server")
    server.start()
    while server.is_alive():
        server.join(0.5)
    raise GgspecError(f"the RPC server could not listen on {endpoint} (llama.cpp's reason is above); "
                      "is the address this machine's and the port free?")
