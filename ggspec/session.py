"""Save a session to one file and resume it: an Engine's state, and a chat's.

What is saved: for the target's context and the draft model's, the KV cache of sequence 0
(llama.cpp's llama_state_seq_get_data) and the tokens it holds; the controller's estimates
(verification costs, acceptance of copies, of the draft model and of Medusa heads); the
generator that seeds generations given no seed; and, for a chat, its system prompt,
messages, settings and stats. A resumed session goes on as one that never stopped: its
caches hold the same bytes, so nothing cached is prefilled again, and it commits the same
tokens (greedy, or sampled with the same seeds).

The file, format version 1 (integers little-endian):

    magic     8 bytes  b"GGSPECSS"
    version   u32      FORMAT_VERSION
    header    u64      length of the JSON header
    blobs     u64      length of the binary section
    header    JSON (UTF-8): the models' fingerprints (path, size, sha256, vocabulary
              digest, context size), the cached tokens, the estimates, the chat
    blobs     the KV caches, each at the [offset, offset + length) its header entry gives
    checksum  32 bytes, sha256 of every byte before it

This fixed prefix is read first: the version before anything whose layout it decides,
and the lengths, which tell a truncated file from a corrupted one. Not .npz (a zip): it
has per-member CRC32s but no checksum over the whole, and it is written member by
member, so a partly written file can look whole until a member is read; not pickle, which
runs code when loaded. This layout streams the KV caches (tens to hundreds of MB) to
disk once, without copies, and lets the reader check every byte before it trusts any.

Saving writes a temporary file in the same directory, fsyncs it, renames it over the
target (os.replace) and fsyncs the directory: a crash leaves the old file or the new
one, never a mix. The file is readable by its owner only (it holds the conversation). Loading checks the file, the models and every value before it changes
anything; llama.cpp's restore of the caches goes last, and where it refuses, the caches
it had replaced are put back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, TypeVar

import numpy as np

from . import __version__, hub
from .backend import Context, Model
from .errors import SessionFileError

if TYPE_CHECKING:
    from .engine import Engine

MAGIC = b"GGSPECSS"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<8sIQQ")  # magic, version, header length, blobs length
CHECKSUM = 32  # bytes of sha256
T = TypeVar("T")


def save(engine: Engine, path: str | os.PathLike, chat: dict | None = None) -> None:
    """Write the engine's state (and a chat's, plain data) to `path`, atomically."""
    path = Path(path).expanduser()
    contexts = _contexts(engine)
    header = {"ggspec": __version__, "models": _fingerprints(engine)}
    with engine.idle():
        blobs = [ctx.save_state() for ctx in contexts.values()]
        offsets = np.cumsum([0, *(b.size for b in blobs)])
        header["caches"] = {role: {"tokens": list(ctx.tokens), "offset": int(o), "length": int(b.size)}
                            for (role, ctx), o, b in zip(contexts.items(), offsets, blobs)}
        header["controller"] = {name: None if part is None else part.state()
                                for name, part in estimators(engine).items()}
        header["rng"] = engine.rng.bit_generator.state
        header["chat"] = chat
    text = json.dumps(header, ensure_ascii=False).encode()
    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, len(text), int(offsets[-1]))
    try:
        write_atomic(path, [prefix, text, *blobs])
    except OSError as e:
        raise SessionFileError(f"could not save the session to {path}: {e.strerror or e}; "
                               "a file that was there is unchanged") from None


def load(engine: Engine, path: str | os.PathLike, parse_chat: Callable[[dict], T] | None = None) -> T | None:
    """Put the state saved in `path` into the engine; with parse_chat, also read the chat
    part (parse_chat raises KeyError, TypeError or ValueError where it does not fit) and
    return what parse_chat made of it. Refuses with SessionFileError, the engine unchanged."""
    path = Path(path).expanduser()
    header, blobs = _read(path)
    with engine.idle():
        try:
            _check_models(engine, header, path)
            if parse_chat is not None and header["chat"] is None:
                raise SessionFileError(f"{path} holds no chat (it was saved with Engine.save); "
                                       "load it with Engine.load")
            chat = None if parse_chat is None else parse_chat(header["chat"])
            _restore(engine, header, blobs)
        except SessionFileError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise SessionFileError(f"{path} holds a session this engine cannot take ({type(e).__name__}: "
                                   f"{e}); start a new session") from None
    return chat


def write_atomic(path: Path, parts: Iterable) -> None:
    """Write the byte buffers `parts` and their sha256 to `path`: to a temporary file in
    the same directory, fsynced, then renamed over `path`. On any error the temporary
    file is removed and `path` is untouched."""
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                digest.update(part)
                f.write(part)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself durable (not possible everywhere)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read(path: Path) -> tuple[dict, memoryview]:
    """The header and the blobs of a session file, after checking its magic, version,
    length and checksum."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SessionFileError(f"no session file {path}; give a file saved with /save or Engine.save") from None
    except OSError as e:
        raise SessionFileError(f"cannot read {path}: {e.strerror or e}") from None
    again = "save the session again"
    if not data.startswith(MAGIC):
        if not MAGIC.startswith(data):
            raise SessionFileError(f"{path} is not a ggspec session file; give a file saved with /save "
                                   "or Engine.save")
        raise SessionFileError(f"{path} is truncated ({len(data)} bytes): {again}")
    if len(data) < PREFIX.size:
        raise SessionFileError(f"{path} is truncated ({len(data)} bytes): {again}")
    _, version, n_header, n_blobs = PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SessionFileError(f"{path} is in session format version {version}; this ggspec ({__version__}) "
                               f"reads version {FORMAT_VERSION}: load it with the ggspec that saved it")
    size = PREFIX.size + n_header + n_blobs + CHECKSUM
    if len(data) < size:
        raise SessionFileError(f"{path} is truncated ({len(data):,} of {size:,} bytes): it was not completely "
                               f"written or copied; {again}")
    if len(data) > size or hashlib.sha256(memoryview(data)[:-CHECKSUM]).digest() != data[-CHECKSUM:]:
        raise SessionFileError(f"{path} is corrupted (its checksum does not match its contents); {again}")
    start = PREFIX.size + n_header
    return json.loads(data[PREFIX.size:start]), memoryview(data)[start:start + n_blobs]


def _contexts(engine: Engine) -> dict[str, Context]:
    """The contexts whose caches a session holds, by role."""
    draft = engine.drafters.get("draft")
    return {"target": engine.ctx, **({"draft": draft.ctx} if draft is not None else {})}


def estimators(engine: Engine) -> dict:
    """What learns from the rounds (each with state() and set_state()), None where absent."""
    return {"costs": engine.costs, "auto": engine.drafters["auto"], "medusa": engine.drafters.get("medusa"),
            "eagle": engine.drafters.get("eagle")}


def _fingerprint(model: Model, ctx: Context) -> dict:
    return {"path": str(model.path.resolve()), "size": model.path.stat().st_size, "sha256": hub.file_sha256(model.path),
            "vocab_sha256": model.vocab_sha256, "n_ctx": ctx.n_ctx}


def _fingerprints(engine: Engine) -> dict:
    contexts = _contexts(engine)
    return {"target": _fingerprint(engine.target, contexts["target"]),
            "draft": None if engine.draft is None else _fingerprint(engine.draft, contexts["draft"])}


def _check_models(engine: Engine, header: dict, path: Path) -> None:
    """Refuse a file saved with other models, heads or context sizes, naming what to load."""
    saved, have = header["models"], _fingerprints(engine)
    for kind, what, flag in (("medusa", "Medusa heads", "--heads"), ("eagle", "an EAGLE-3 draft", "--eagle")):
        if (header["controller"][kind] is not None) != (kind in engine.drafters):
            raise SessionFileError(f"{path} was saved with {what}; load it with the same ({flag} FILE)"
                                   if kind not in engine.drafters else
                                   f"{path} was saved without {what}; load it without {flag}")
    for role, flag in (("target", "-m"), ("draft", "-d")):
        want, got = saved[role], have[role]
        if want is None and got is None:
            continue
        if want is None:
            raise SessionFileError(f"{path} was saved without a draft model; load it without one (--no-draft)")
        name = Path(want["path"]).name
        if got is None:
            raise SessionFileError(f"{path} was saved with the draft model {name}; load it with that "
                                   f"model ({flag} {want['path']})")
        if [want[k] for k in ("size", "sha256", "vocab_sha256")] != [got[k] for k in ("size", "sha256", "vocab_sha256")]:
            raise SessionFileError(f"{path} was saved with the {role} model {name} (sha256 {want['sha256'][:12]}), "
                                   f"not {Path(got['path']).name} (sha256 {got['sha256'][:12]}); load it with "
                                   f"that model ({flag} {want['path']})")
        if want["n_ctx"] != got["n_ctx"]:
            raise SessionFileError(f"{path} was saved with a context of {want['n_ctx']} tokens for the {role}, "
                                   f"this one has {got['n_ctx']}; load it with --ctx-size {want['n_ctx']}")


def _restore(engine: Engine, header: dict, blobs: memoryview) -> None:
    """Check every saved value, then replace the engine's state with them: estimates
    first, the caches last; if llama.cpp refuses a cache, all is put back as it was."""
    rng = np.random.default_rng()
    rng.bit_generator.state = header["rng"]
    contexts = _contexts(engine)
    if set(header["caches"]) != set(contexts):
        raise ValueError(f"caches for {sorted(header['caches'])}, this engine has {sorted(contexts)}")
    caches = {role: (_cache(blobs, header["caches"][role], ctx), ctx) for role, ctx in contexts.items()}
    parts = estimators(engine)
    saved = header["controller"]
    if set(saved) != set(parts):
        raise ValueError(f"estimates of {sorted(saved)}, this engine has {sorted(parts)}")
    before = {name: part.state() for name, part in parts.items() if part is not None}
    replaced: list[tuple[Context, np.ndarray, list[int]]] = []
    try:
        for name, state in before.items():
            parts[name].set_state(saved[name])
        for (data, tokens), ctx in caches.values():
            replaced.append((ctx, *ctx.load_state(data, tokens)))
    except BaseException:
        for name, state in before.items():
            parts[name].set_state(state)
        for ctx, data, tokens in replaced:
            ctx.load_state(data, tokens)
        raise
    engine.rng = rng


def _cache(blobs: memoryview, entry: dict, ctx: Context) -> tuple[memoryview, list[int]]:
    """A saved cache's bytes and tokens, checked against the context they go into."""
    tokens = [int(t) for t in entry["tokens"]]
    start, length = int(entry["offset"]), int(entry["length"])
    if not (0 <= start and 0 <= length and start + length <= len(blobs)):
        raise ValueError(f"a cache at bytes {start}..{start + length} of {len(blobs)}")
    if len(tokens) >= ctx.n_ctx or any(not 0 <= t < ctx.n_vocab for t in tokens):
        raise ValueError(f"{len(tokens)} cached tokens that do not fit a context of {ctx.n_ctx}")
    return blobs[start:start + length], tokens
