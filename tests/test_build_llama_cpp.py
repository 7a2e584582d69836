"""tools/build_llama_cpp.py: the flags that keep a GCC 12 build's AMX tile configuration whole."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import build_llama_cpp  # noqa: E402

# what each compiler's immintrin.h defines _tile_loadconfig as, preprocessed
GCC_12 = ('_tile_loadconfig (const void *__config)\n{\n'
          '  __asm__ volatile ("ldtilecfg\\t%X0" :: "m" (*((const void **)__config)));\n}\n')
CLANG = ('static __inline__ void __attribute__((__always_inline__, __nodebug__, __target__("amx-tile")))\n'
         '_tile_loadconfig(const void *__config) {\n  __builtin_ia32_tile_loadconfig(__config);\n}\n')


def fake_compiler(tmp_path: Path, output: str, status: int = 0) -> Path:
    (tmp_path / "header.txt").write_text(output)
    cxx = tmp_path / "fake-c++"
    cxx.write_text(f"#!/bin/sh\ncat > /dev/null\ncat {tmp_path / 'header.txt'}\nexit {status}\n")
    cxx.chmod(0o755)
    return cxx


@pytest.mark.parametrize("header, status, flags", [
    (GCC_12, 0, ["-DCMAKE_C_FLAGS=-fno-tree-dse -fno-dse", "-DCMAKE_CXX_FLAGS=-fno-tree-dse -fno-dse"]),
    (CLANG, 0, []),
    ("error: unrecognized command-line option '-mamx-tile'", 1, []),  # not an x86 compiler
])
def test_the_flags_follow_the_compilers_tile_loadconfig(tmp_path, monkeypatch, header, status, flags):
    monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, header, status)))
    assert build_llama_cpp.tile_config_flags() == flags


def test_no_compiler_no_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert build_llama_cpp.tile_config_flags() == []


gcc = shutil.which("g++")
gcc_major = int(subprocess.run([gcc, "-dumpversion"], capture_output=True, text=True).stdout.split(".")[0]) if gcc else 0


@pytest.mark.skipif(gcc_major != 12, reason="needs GCC 12, whose header drops the configuration's stores")
def test_gcc_12_gets_the_flags_and_they_keep_the_configuration(monkeypatch, tmp_path):
    """The real header matches, and with the flags the compiler stores the rows of the
    tile configuration that llama.cpp's ggml_tile_config_init sets (without them only the
    palette byte and zeros are written)."""
    monkeypatch.setenv("CXX", gcc)
    flags = build_llama_cpp.tile_config_flags()
    assert flags
    source = tmp_path / "config.cpp"
    source.write_text("#include <immintrin.h>\n#include <stdint.h>\n"
                      "struct config { uint8_t palette, start, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };\n"
                      "void init() { alignas(64) config c = {}; c.palette = 1; c.rows[0] = 77; c.colsb[0] = 64;\n"
                      "  _tile_loadconfig(&c); }\n")

    def assembly(*extra: str) -> str:
        return subprocess.run([gcc, "-O3", "-mamx-tile", *extra, "-S", "-o", "-", str(source)],
                              capture_output=True, text=True, check=True).stdout

    stores_77 = re.compile(r"\$77\b")
    assert not stores_77.search(assembly())
    assert stores_77.search(assembly(*flags[0].split("=", 1)[1].split()))
