"""Build llama.cpp's `llama-completion` and `llama-speculative-simple` from the llama.cpp
source vendored in the installed llama-cpp-python's sdist, for `ggspec bench --native DIR`.

    python tools/build_llama_cpp.py [OUT_DIR]          # default ./llama.cpp-bin
    python tools/build_llama_cpp.py --cuda OUT_DIR     # with -DGGML_CUDA=ON

Downloads the sdist of exactly the installed version with pip (so the binaries run the
same llama.cpp as ggspec), configures a Release build (static, no network features, no
tests), builds only the two targets and copies them into OUT_DIR. Extra CMake arguments
come from CMAKE_ARGS, as for `pip install llama-cpp-python`.

Where the compiler is a GCC whose `_tile_loadconfig` tells it that `ldtilecfg` reads 8 of
the tile configuration's 64 bytes (GCC 12: the rest of the configuration's stores are
dropped, and llama.cpp's AMX kernels crash at their first product; ggspec.weights), the
build turns off dead-store elimination (-fno-tree-dse -fno-dse), which keeps those
stores: on an AMX CPU the tools then run llama.cpp's default placement, AMX kernels
included, rather than falling back to --no-repack.

Progress goes to stderr; stdout gets OUT_DIR's path.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

TARGETS = ("llama-completion", "llama-speculative-simple")
PACKAGE = "llama-cpp-python"


def log(message: str) -> None:
    print(f"build_llama_cpp: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> None:
    log("$ " + shlex.join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr, **kw)


def installed_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        sys.exit(f"build_llama_cpp: {PACKAGE} is not installed in {sys.executable}; install ggspec first")


def vendored_source(version: str, work: Path) -> Path:
    """Download the sdist of `version` into `work` and extract its vendor/llama.cpp."""
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
         f"{PACKAGE}=={version}", "-d", str(work)])
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    log(f"extracting vendor/llama.cpp from {sdist.name}")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        if not members:
            sys.exit(f"build_llama_cpp: {sdist.name} has no vendor/llama.cpp")
        tar.extractall(work, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


def tile_config_flags() -> list[str]:
    """CMake arguments that keep a GCC 12 build's AMX tile configuration whole (see the
    module's docstring); none where the compiler's header is not that one."""
    cxx = os.environ.get("CXX", "c++")
    try:
        header = subprocess.run([cxx, "-mamx-tile", "-E", "-x", "c++", "-"], input="#include <immintrin.h>\n",
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if header.returncode != 0 or not re.search(r'ldtilecfg.*"m" \(\*\(\(const void \*\*\)', header.stdout):
        return []
    flags = "-fno-tree-dse -fno-dse"
    log(f"{cxx}'s _tile_loadconfig declares an 8-byte read: building with {flags} (AMX kernels)")
    return [f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]


def build(src: Path, build_dir: Path, cuda: bool, jobs: int) -> Path:
    """Configure and build the two targets; returns the directory holding the binaries."""
    configure = ["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON",
                 "-DLLAMA_BUILD_EXAMPLES=ON", f"-DGGML_CUDA={'ON' if cuda else 'OFF'}", *tile_config_flags(),
                 *shlex.split(os.environ.get("CMAKE_ARGS", ""))]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    run(configure)
    run(["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs), "--target", *TARGETS])
    return build_dir / "bin"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="llama.cpp-bin", help="where the binaries go [./llama.cpp-bin]")
    ap.add_argument("--cuda", action="store_true", help="build with CUDA (-DGGML_CUDA=ON)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="download and build in DIR and keep it")
    args = ap.parse_args()
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            sys.exit(f"build_llama_cpp: {tool} not found; install a C++ compiler and CMake")
    version = installed_version()
    log(f"{PACKAGE} {version}: building {', '.join(TARGETS)}")
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="ggspec-llama-cpp-") as tmp:
        work = args.keep.resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bin_dir = build(vendored_source(version, work), work / "build", args.cuda, args.jobs)
        out.mkdir(parents=True, exist_ok=True)
        for target in TARGETS:
            shutil.copy2(bin_dir / target, out / target)
    log(f"done: {' '.join(TARGETS)} in {out}")
    print(out)


if __name__ == "__main__":
    main()
