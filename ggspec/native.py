"""llama.cpp's own tools, run side by side with ggspec: `llama-completion` (plain decoding)
and `llama-speculative-simple` (llama.cpp's speculative decoding, one --spec-type a run).

`tools/build_llama_cpp.py` builds both from the llama.cpp that the installed
llama-cpp-python vendors. Each run is a subprocess on the same GGUF files, threads, context
size and prompt text as the engine; its decode speed is parsed from what the tool logs:

    llama-completion          common_perf_print: prompt eval time =   161.38 ms /     8 tokens (...)
                              common_perf_print:        eval time =  3545.21 ms /    63 runs   (...)
                              common_perf_print:       total time =  3721.42 ms /    71 tokens
    llama-speculative-simple  decoded   64 tokens in    3.105 seconds, speed:   20.611 t/s
                              n_drafted = 40 / n_accept  = 31
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import ggml, weights
from .config import SamplingConfig
from .errors import GgspecError

COMPLETION = "llama-completion"
SPECULATIVE = "llama-speculative-simple"
BINARIES = (COMPLETION, SPECULATIVE)
BUILD_HINT = "build them with: python tools/build_llama_cpp.py DIR"
# "plain" is llama-completion; the others are --spec-type values of llama-speculative-simple
MODES = ("plain", "draft-simple", "ngram-simple", "ngram-map-k", "ngram-mod", "ngram-cache")
TAIL_CHARS = 1500  # how much of a failed tool's stderr an error quotes
ATTEMPTS = 3  # runs of one generation when a tool's log loses its timing lines
# directories whose tools were killed by a signal on this CPU, which offers llama.cpp's AMX
# buffer: built by GCC 12 without tools/build_llama_cpp.py's flags, their AMX kernels crash
# (ggspec.weights); they run with llama.cpp's way around, all extra buffer types off
_AMX_CRASHED: set[Path] = set()


@dataclass(frozen=True)
class NativeVariant:
    """One llama.cpp run: plain decoding or one of llama.cpp's speculative modes."""

    mode: str

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown llama.cpp mode {self.mode!r}; choose from {', '.join(MODES)}")

    @property
    def label(self) -> str:
        return f"llama.cpp {self.mode}"

    @property
    def method(self) -> str:
        return self.label

    @property
    def draft_max(self) -> None:
        return None  # llama.cpp's modes draft as their defaults say

    @property
    def binary(self) -> str:
        return COMPLETION if self.mode == "plain" else SPECULATIVE


@dataclass(frozen=True)
class NativeRun:
    """What one llama.cpp run reported: generated tokens over decode seconds (prompt
    excluded) and, for speculative modes, draft tokens proposed and accepted."""

    prompt_tokens: int
    tokens: int
    seconds: float
    drafted: int = 0
    accepted: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def check_dir(directory: str | os.PathLike) -> Path:
    """`directory` if it holds both binaries; otherwise a GgspecError saying what is missing."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise GgspecError(f"--native {path}: no such directory; {BUILD_HINT}")
    missing = [b for b in BINARIES if not os.access(path / b, os.X_OK)]
    if missing:
        raise GgspecError(f"--native {path}: {' and '.join(missing)} missing or not executable; {BUILD_HINT}")
    return path.resolve()


@dataclass(frozen=True)
class LlamaCpp:
    """llama.cpp's binaries in `directory`, run on the engine's models and settings.
    n_gpu_layers -1 offloads every layer, as BackendConfig does; n_gpu_layers_draft None:
    as the target. modes: the modes to run (plain always runs: it is the baseline); None:
    every mode these models allow."""

    directory: Path
    target: Path
    draft: Path | None
    threads: int
    n_ctx: int
    n_gpu_layers: int = -1
    n_gpu_layers_draft: int | None = None
    modes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", check_dir(self.directory))
        for mode in self.modes or ():
            NativeVariant(mode)  # refuses an unknown one
        if self.draft is None and "draft-simple" in (self.modes or ()):
            raise ValueError("llama.cpp draft-simple needs a draft model")

    def variants(self) -> list[NativeVariant]:
        """plain, then the chosen modes (every one these models allow when none was chosen:
        draft-simple needs a draft model), in MODES order."""
        chosen = MODES if self.modes is None else ("plain", *self.modes)
        return [NativeVariant(m) for m in MODES if m in chosen and (m != "draft-simple" or self.draft is not None)]

    def command(self, variant: NativeVariant, prompt_file: Path, max_tokens: int,
                sampling: SamplingConfig) -> list[str]:
        """The command line of one run; the prompt file holds the exact prompt text."""
        draft_layers = self.n_gpu_layers if self.n_gpu_layers_draft is None else self.n_gpu_layers_draft
        layers, draft_layers = _layers(self.n_gpu_layers), _layers(draft_layers)
        cmd = [str(self.directory / variant.binary), "-m", str(self.target), "-f", str(prompt_file),
               "-n", str(max_tokens), "-c", str(self.n_ctx), "-t", str(self.threads), "-tb", str(self.threads),
               "-ngl", layers, "--no-escape",
               "--temp", str(sampling.temperature), "--top-k", str(sampling.top_k), "--top-p", str(sampling.top_p),
               "--min-p", str(sampling.min_p)]
        if sampling.seed is not None:
            cmd += ["--seed", str(sampling.seed)]
        if sampling.ignore_eos:
            cmd.append("--ignore-eos")
        if self.directory in _AMX_CRASHED:
            # its -ot names only devices' own buffer types (CPU, not CPU_REPACK), so not the
            # engine's placement by name: all extra buffer types off, the draft's too
            cmd.append("--no-repack")
        if variant.mode == "plain":
            return cmd + ["-no-cnv", "--no-display-prompt"]  # the prompt is already chat-templated
        cmd += ["--spec-type", variant.mode]
        if variant.mode == "draft-simple":
            if self.draft is None:
                raise ValueError("llama.cpp draft-simple needs a draft model")
            cmd += ["-md", str(self.draft), "-ngld", draft_layers, "-td", str(self.threads)]
        return cmd

    def run(self, variant: NativeVariant, prompt: str, max_tokens: int, sampling: SamplingConfig) -> NativeRun:
        """Run one generation of `prompt` (text, used verbatim) and parse its speeds.

        Both tools log through a worker thread that nobody flushes at exit (common/log.cpp
        says so), so a run that succeeded can lose its last lines: such a run is repeated,
        up to ATTEMPTS times in all. A tool killed by a signal where llama.cpp offers its
        AMX buffer is run again, and from then on, with --no-repack (_AMX_CRASHED)."""
        parse = parse_completion if variant.mode == "plain" else parse_speculative
        with tempfile.TemporaryDirectory(prefix="ggspec-native-") as tmp:
            prompt_file = Path(tmp) / "prompt.txt"
            # -f drops one trailing newline of the file: add one so the prompt keeps its own
            prompt_file.write_text(prompt + "\n", encoding="utf-8")
            cmd = self.command(variant, prompt_file, max_tokens, sampling)
            for _ in range(ATTEMPTS):
                try:
                    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                          errors="replace")
                except OSError as e:
                    raise GgspecError(f"could not run {cmd[0]}: {e}; {BUILD_HINT}") from None
                if done.returncode < 0 and self.directory not in _AMX_CRASHED \
                        and weights.AMX in ggml.cpu_extra_buffer_types():
                    print(f"ggspec: {variant.binary} was killed by signal {-done.returncode}; its AMX kernels "
                          "crash here (built by GCC 12 without tools/build_llama_cpp.py's flags?): running "
                          "llama.cpp's tools with --no-repack", file=sys.stderr)
                    _AMX_CRASHED.add(self.directory)
                    cmd = self.command(variant, prompt_file, max_tokens, sampling)
                    continue
                if done.returncode != 0:
                    raise GgspecError(f"{variant.binary} failed (exit code {done.returncode}); "
                                      f"its stderr ends:\n{done.stderr[-TAIL_CHARS:]}")
                try:
                    return parse(done.stderr)
                except ValueError as e:
                    error = e
        raise GgspecError(f"{variant.binary}: {error} ({ATTEMPTS} runs); "
                          f"its stderr ends:\n{done.stderr[-TAIL_CHARS:]}")


def _layers(n: int) -> str:
    return "all" if n < 0 else str(n)


_PROMPT_EVAL = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
_EVAL = re.compile(r":\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs")
_TOTAL = re.compile(r"total time =\s*([\d.]+) ms")
_ENCODED = re.compile(r"encoded\s+(\d+) tokens in")
_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
_DRAFTED = re.compile(r"n_drafted\s*=\s*(\d+)")
_ACCEPTED = re.compile(r"n_accept\s*=\s*(\d+)")


def _find(pattern: re.Pattern, text: str, what: str) -> re.Match:
    match = pattern.search(text)
    if match is None:
        raise ValueError(f"no {what} line in its output")
    return match


def parse_completion(stderr: str) -> NativeRun:
    """llama-completion's timings: one decode call ("run") per generated token after the
    prompt, over the wall time after the prompt (its total less the prompt's evaluation:
    decoding, sampling and the tool's own work, as ggspec's decode time counts them)."""
    prompt = _find(_PROMPT_EVAL, stderr, "'prompt eval time'")
    runs = _find(_EVAL, stderr, "'eval time'").group(2)
    total = float(_find(_TOTAL, stderr, "'total time'").group(1))
    return NativeRun(prompt_tokens=int(prompt.group(2)), tokens=int(runs), seconds=(total - float(prompt.group(1))) / 1000)


def parse_speculative(stderr: str) -> NativeRun:
    """llama-speculative-simple's summary: tokens decoded in wall seconds after the prompt
    (drafting, verification and sampling included), draft tokens proposed and accepted."""
    tokens, seconds = _find(_DECODED, stderr, "'decoded N tokens'").groups()
    return NativeRun(prompt_tokens=int(_find(_ENCODED, stderr, "'encoded N tokens'").group(1)),
                     tokens=int(tokens), seconds=float(seconds),
                     drafted=int(_find(_DRAFTED, stderr, "'n_drafted'").group(1)),
                     accepted=int(_find(_ACCEPTED, stderr, "'n_accept'").group(1)))
