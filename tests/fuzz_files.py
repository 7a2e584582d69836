"""Corrupted model and head files, and a runner that feeds them to ggspec in worker processes.

`corrupt_files` writes seeded variants of a valid GGUF: truncated at random offsets, bytes
flipped in the header, key-values, tensor infos or data, tensor types replaced, counts and
lengths made huge. `run` hands them to worker processes (this file, run as a script) in
batches: each file goes through `Model` (and one decode when it loads) or the heads loader,
and through `ggspec info`. A worker reports each file's outcome; a worker that dies or
stalls marks its current file as a crash or a hang, and a new worker takes the rest.

    python tests/fuzz_files.py --files 2000 --seed 7     # a larger run than CI's
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TAG = "@@fuzz "
HUGE = (2**31 - 1, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1)
MEMORY_LIMIT = 4 << 30  # address space of a worker: a runaway allocation fails instead


# ---------------------------------------------------------------------------------------
# Where the fields of a GGUF file lie
# ---------------------------------------------------------------------------------------

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class Layout:
    """Byte offsets of a valid GGUF's fields: (offset, size) of each integer that counts or
    sizes something, of each type field, and the regions of key-values, tensor infos, data."""

    counts: list[tuple[int, int]] = field(default_factory=list)  # u64 / u32 counts and lengths
    types: list[tuple[int, int]] = field(default_factory=list)  # value / element type fields (u32)
    tensor_types: list[int] = field(default_factory=list)  # ggml type field of each tensor (u32)
    tensor_offsets: list[int] = field(default_factory=list)  # data offset of each tensor (u64)
    scalars: list[tuple[int, int]] = field(default_factory=list)  # (offset, size) of each integer value
    tokens: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of each token text
    kv: tuple[int, int] = (0, 0)
    infos: tuple[int, int] = (0, 0)
    data: tuple[int, int] = (0, 0)


def layout(buf: bytes) -> Layout:
    out = Layout(counts=[(8, 8), (16, 8)])
    pos = 24

    def u(fmt: str) -> int:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> tuple[int, int]:
        nonlocal pos
        out.counts.append((pos, 8))
        n = u("<Q")
        pos += n
        return pos - n, n

    def value(vtype: int, key: bytes = b"") -> None:
        nonlocal pos
        if vtype in _SCALAR_SIZES:
            if vtype not in (6, 7, 12):  # integers
                out.scalars.append((pos, _SCALAR_SIZES[vtype]))
            pos += _SCALAR_SIZES[vtype]
        elif vtype == 8:
            string()
        else:
            out.types.append((pos, 4))
            etype = u("<I")
            out.counts.append((pos, 8))
            n = u("<Q")
            for _ in range(n if etype == 8 else 0):
                span = string()
                if key == b"tokenizer.ggml.tokens":
                    out.tokens.append(span)
            if etype in _SCALAR_SIZES:
                pos += n * _SCALAR_SIZES[etype]

    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    for _ in range(n_kv):
        at, n = string()
        out.types.append((pos, 4))
        value(u("<I"), bytes(buf[at:at + n]))
    out.kv = (24, pos)
    for _ in range(n_tensors):
        string()
        out.counts.append((pos, 4))
        n_dims = u("<I")
        for _ in range(n_dims):
            out.counts.append((pos, 8))
            pos += 8
        out.tensor_types.append(pos)
        pos += 4
        out.tensor_offsets.append(pos)
        pos += 8
    out.infos = (out.kv[1], pos)
    out.data = ((pos + 31) // 32 * 32, len(buf))
    return out


# ---------------------------------------------------------------------------------------
# Corruptions
# ---------------------------------------------------------------------------------------

def _flip(buf: bytearray, lo: int, hi: int, rng: np.random.Generator, n: int) -> None:
    for at in rng.integers(lo, max(hi, lo + 1), n):
        buf[at] ^= int(rng.integers(1, 256))


def corrupt(data: bytes, lay: Layout, kind: str, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    if kind == "truncate":  # anywhere, but half the cuts in the header
        end = lay.data[0] if rng.random() < 0.5 else len(data)
        return bytes(buf[:int(rng.integers(0, end))])
    if kind == "flip-header":
        _flip(buf, 0, 24, rng, int(rng.integers(1, 3)))
    elif kind == "flip-kv":
        _flip(buf, *lay.kv, rng, int(rng.integers(1, 9)))
    elif kind == "flip-infos":
        _flip(buf, *lay.infos, rng, int(rng.integers(1, 9)))
    elif kind == "flip-data":
        _flip(buf, *lay.data, rng, int(rng.integers(1, 65)))
    elif kind == "dtype":  # a tensor's type: another valid one, or no type at all
        at = lay.tensor_types[int(rng.integers(len(lay.tensor_types)))]
        struct.pack_into("<I", buf, at, int(rng.choice([0, 1, 2, 8, 12, 14, 30, 39, 40, 41, 255, 2**31])))
    elif kind == "value-type":  # a key-value's (or array element's) type
        at, _ = lay.types[int(rng.integers(len(lay.types)))]
        struct.pack_into("<I", buf, at, int(rng.integers(0, 16)))
    elif kind == "huge-count":  # a count, length, rank or dimension
        at, size = lay.counts[int(rng.integers(len(lay.counts)))]
        big = int(rng.choice(HUGE)) % (1 << (8 * size))
        buf[at:at + size] = big.to_bytes(size, "little")
    elif kind == "kv-number":  # an integer value (a size, a token id, a flag) made extreme
        at, size = lay.scalars[int(rng.integers(len(lay.scalars)))]
        big = int(rng.choice([0, 1, 255, *HUGE, 2**16 - 1]))
        buf[at:at + size] = (big % (1 << (8 * size))).to_bytes(size, "little")
    elif kind == "duplicate-token" and lay.tokens:  # a token's text written over another's
        by_length: dict[int, list[int]] = {}
        for at, n in lay.tokens:
            by_length.setdefault(n, []).append(at)
        pairs = [ats for ats in by_length.values() if len(ats) > 1]
        a, b = rng.choice(pairs[int(rng.integers(len(pairs)))], 2, replace=False)
        n = next(n for at, n in lay.tokens if at == a)
        buf[b:b + n] = buf[a:a + n]
    elif kind == "duplicate-token":  # a file without tokens: a key's text instead
        _flip(buf, *lay.kv, rng, 1)
    elif kind == "tensor-offset":
        at = lay.tensor_offsets[int(rng.integers(len(lay.tensor_offsets)))]
        struct.pack_into("<Q", buf, at, int(rng.choice([1, 31, len(data), *HUGE[3:]])) % 2**64)
    else:
        raise ValueError(kind)
    return bytes(buf)


KINDS = ("truncate", "flip-header", "flip-kv", "flip-infos", "flip-data", "dtype", "value-type",
         "huge-count", "tensor-offset", "kv-number", "duplicate-token")


def corrupt_files(source: Path, what: str, n: int, out_dir: Path, seed: int) -> list[dict]:
    """n corrupted copies of `source` in out_dir, the kinds in turn; jobs for `run`."""
    data = source.read_bytes()
    lay = layout(data)
    rng = np.random.default_rng([seed, len(data)])
    jobs = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        path = out_dir / f"{what}-{i:04}-{kind}.gguf"
        path.write_bytes(corrupt(data, lay, kind, rng))
        jobs.append({"path": str(path), "what": what, "kind": kind})
    return jobs


# ---------------------------------------------------------------------------------------
# The worker: one process, many files
# ---------------------------------------------------------------------------------------

def _one_line_error(e: BaseException, path: str) -> str | None:
    """Why `e` is not an acceptable error for `path` (None: it is)."""
    from ggspec.errors import GgspecError
    msg = str(e)
    if not isinstance(e, (GgspecError, ValueError)):
        return f"{type(e).__name__}: {msg}"
    if "\n" in msg.strip() or not msg:
        return f"not one line: {msg!r}"
    if Path(path).name not in msg:
        return f"does not name the file: {msg!r}"
    return None


def _check(job: dict, target: str) -> dict:
    from click.testing import CliRunner

    from ggspec.backend import Context, Model
    from ggspec.cli import cli
    from ggspec.config import BackendConfig
    from ggspec.heads import load_heads

    path, problems, loaded = job["path"], [], []
    if job["what"] == "abort":  # the runner's own test: a process that dies
        os.abort()
    if job["what"] == "hang":  # ... and one that stalls
        time.sleep(3600)
    try:
        if job["what"] == "model":
            with Model(path, BackendConfig(n_gpu_layers=0)) as m:
                with Context(m, BackendConfig(n_ctx=64, n_batch=16, n_threads=1, n_gpu_layers=0)) as ctx:
                    ctx.eval(m.tokenize("hello world")[:8] or [0])
        else:
            load_heads(path, target)
        loaded.append(job["what"])
    except Exception as e:  # every outcome is recorded; what is not a clean error is a problem
        if (why := _one_line_error(e, path)) is not None:
            problems.append(why)
    result = CliRunner().invoke(cli, ["info", path])
    if result.exit_code == 0:
        loaded.append("info")
    elif not (result.exit_code == 1 and result.output.splitlines()[-1:][0].startswith("Error: ")
              and "Traceback" not in result.output):  # llama.cpp's own error log may precede
        problems.append(f"info: exit {result.exit_code}: {result.output[-300:]!r} {result.exception!r}")
    return {"loaded": loaded, "problems": problems}


def _peak_rss_kb() -> int:
    """This process's peak resident memory (VmHWM: ru_maxrss would include the parent's,
    which Linux carries across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(jobs_file: str, start: int, target: str) -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    jobs = json.loads(Path(jobs_file).read_text())
    for i in range(start, len(jobs)):
        print(TAG + json.dumps({"i": i, "started": True}), flush=True)
        outcome = _check(jobs[i], target)
        outcome.update(i=i, rss_kb=_peak_rss_kb())
        print(TAG + json.dumps(outcome), flush=True)


# ---------------------------------------------------------------------------------------
# The parent: batches, crashes and hangs
# ---------------------------------------------------------------------------------------

@dataclass
class Report:
    results: dict[int, dict] = field(default_factory=dict)
    crashes: list[tuple[int, str]] = field(default_factory=list)  # (job, the worker's last stderr)
    hangs: list[int] = field(default_factory=list)
    workers: int = 0
    max_rss_kb: int = 0
    seconds: float = 0.0

    def problems(self, jobs: list[dict]) -> list[str]:
        out = [f"{jobs[i]['path']}: crash: {err}" for i, err in self.crashes]
        out += [f"{jobs[i]['path']}: hang" for i in self.hangs]
        out += [f"{jobs[i]['path']}: {p}" for i, r in sorted(self.results.items()) for p in r["problems"]]
        return out


def run(jobs: list[dict], target: str, *, timeout: float = 30.0, env: dict | None = None) -> Report:
    """Every job through worker processes; a new worker resumes after a crash or hang."""
    report = Report()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        jobs_file = Path(tmp) / "jobs.json"
        jobs_file.write_text(json.dumps(jobs))
        start = 0
        while start < len(jobs):
            report.workers += 1
            err_path = Path(tmp) / f"stderr-{report.workers}.txt"
            with open(err_path, "wb") as err:
                proc = subprocess.Popen([sys.executable, __file__, "--worker", str(jobs_file), str(start), target],
                                        stdout=subprocess.PIPE, stderr=err, text=True,
                                        env={**os.environ, "GGML_NO_BACKTRACE": "1", **(env or {})})
                lines: queue.Queue = queue.Queue()
                threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)],
                                 daemon=True).start()
                current = None
                while True:
                    try:
                        line = lines.get(timeout=timeout)
                    except queue.Empty:
                        proc.kill()
                        report.hangs.append(current if current is not None else start)
                        break
                    if line is None:
                        break
                    if not line.startswith(TAG):
                        continue
                    msg = json.loads(line[len(TAG):])
                    if msg.get("started"):
                        current = msg["i"]
                    else:
                        report.results[msg["i"]] = msg
                        report.max_rss_kb = max(report.max_rss_kb, msg["rss_kb"])
                        current = None
                proc.wait()
            if current is not None and current not in report.hangs:
                lines_ = err_path.read_text(errors="replace").strip().splitlines()
                why = [x for x in lines_ if "GGML_ASSERT" in x or "error" in x.lower()] or lines_
                report.crashes.append((current, f"exit {proc.returncode}: " + " | ".join(why[-2:])))
            done = [i for i in (*report.results, *report.hangs, *(c for c, _ in report.crashes))]
            start = max(done) + 1 if done else len(jobs)
    report.seconds = time.perf_counter() - t0
    return report


def make_jobs(out_dir: Path, n_files: int, seed: int) -> tuple[list[dict], str]:
    """A tiny target and a head file for it, and n_files corruptions of them (3 : 2)."""
    sys.path.insert(0, str(HERE))
    from tinymodels import write_tiny_llama

    from ggspec.heads import MedusaHeads, read_target, save_heads

    target = write_tiny_llama(out_dir / "target.gguf", seed=0)
    info = read_target(target)
    rng = np.random.default_rng(seed)
    d = info.fingerprint.embedding_length
    heads = MedusaHeads(rng.standard_normal((2, 1, d, d)), rng.standard_normal((2, 1, d)),
                        rng.standard_normal((2, 16, d)), token_ids=np.arange(16), tied=False,
                        target=info.fingerprint, acceptance=np.full((2, 4), 0.5))
    head_file = save_heads(out_dir / "heads.gguf", heads, dtype="q8_0")
    n_models = n_files * 3 // 5
    jobs = corrupt_files(target, "model", n_models, out_dir, seed)
    jobs += corrupt_files(head_file, "heads", n_files - n_models, out_dir, seed)
    return jobs, str(target)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", nargs=3, metavar=("JOBS", "START", "TARGET"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        jobs, target = make_jobs(Path(tmp), args.files, args.seed)
        report = run(jobs, target)
        problems = report.problems(jobs)
        loaded = sum(1 for r in report.results.values() if r["loaded"])
        print(f"{len(jobs)} files, seed {args.seed}: {len(report.crashes)} crashes, {len(report.hangs)} hangs, "
              f"{len(problems) - len(report.crashes) - len(report.hangs)} unclean errors, {loaded} loaded somewhere; "
              f"{report.workers} workers, max RSS {report.max_rss_kb / 1024:.0f} MiB, {report.seconds:.1f} s")
        for line in problems:
            print(line)
        return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
