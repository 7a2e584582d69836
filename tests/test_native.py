"""llama.cpp's own tools side by side (`ggspec bench --native DIR`): command lines, parsing
of what the real binaries print (captured in tests/data), errors, and real runs when the
binaries are built (GGSPEC_NATIVE_DIR, see tools/build_llama_cpp.py)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig, ggml, native, weights
from ggspec.bench import WORKLOADS, run_grid, table, variants
from ggspec.cli import cli
from ggspec.errors import GgspecError
from ggspec.native import (BINARIES, MODES, LlamaCpp, NativeRun, NativeVariant, check_dir, parse_completion,
                           parse_speculative)

DATA = Path(__file__).parent / "data"
NATIVE_DIR = os.environ.get("GGSPEC_NATIVE_DIR")
needs_binaries = pytest.mark.skipif(not (NATIVE_DIR and Path(NATIVE_DIR).is_dir()),
                                    reason="set GGSPEC_NATIVE_DIR to a directory built by tools/build_llama_cpp.py")
GREEDY = SamplingConfig(temperature=0.0)


def fake_binaries(directory: Path, script: str = "exit 0") -> Path:
    """Executables with the two binaries' names that run `script` (for error paths only)."""
    directory.mkdir(exist_ok=True)
    for name in BINARIES:
        path = directory / name
        path.write_text(f"#!/bin/sh\n{script}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return directory


@pytest.fixture
def llama(tmp_path):
    return LlamaCpp(fake_binaries(tmp_path / "bin"), Path("/m/target.gguf"), Path("/m/draft.gguf"),
                    threads=2, n_ctx=4096)


def options(cmd: list[str]) -> dict[str, str]:
    """-flag value pairs of a command line (flags without a value map to '')."""
    out = {}
    for i, arg in enumerate(cmd[1:], 1):
        if arg.startswith("-") and not arg[1:2].isdigit():
            nxt = cmd[i + 1] if i + 1 < len(cmd) else ""
            out[arg] = "" if nxt.startswith("-") and not nxt[1:2].isdigit() else nxt
    return out


def test_plain_runs_llama_completion_on_the_prompt_text_as_is(llama, tmp_path):
    cmd = llama.command(NativeVariant("plain"), tmp_path / "p.txt", 192, GREEDY)
    assert cmd[0] == str(llama.directory / "llama-completion")
    opts = options(cmd)
    assert opts["-m"] == "/m/target.gguf" and opts["-f"] == str(tmp_path / "p.txt")
    assert (opts["-n"], opts["-c"], opts["-t"], opts["-tb"], opts["-ngl"]) == ("192", "4096", "2", "2", "all")
    assert opts["--temp"] == "0.0" and "--seed" not in opts
    # no chat template of llama.cpp's, no escape processing: ggspec's rendered text is the prompt
    assert {"-no-cnv", "--no-escape", "--no-display-prompt"} <= set(opts)
    assert "--spec-type" not in opts and "-md" not in opts and "--ignore-eos" not in opts
    cmd = llama.command(NativeVariant("plain"), tmp_path / "p.txt", 192, SamplingConfig(temperature=0, ignore_eos=True))
    assert "--ignore-eos" in options(cmd)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "plain"])
def test_each_speculative_mode_is_one_spec_type_of_llama_speculative_simple(llama, tmp_path, mode):
    cmd = llama.command(NativeVariant(mode), tmp_path / "p.txt", 64,
                        SamplingConfig(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, seed=7))
    assert cmd[0] == str(llama.directory / "llama-speculative-simple")
    opts = options(cmd)
    assert opts["--spec-type"] == mode and opts["-n"] == "64" and opts["--no-escape"] == ""
    assert (opts["--temp"], opts["--top-k"], opts["--top-p"], opts["--min-p"], opts["--seed"]) == (
        "0.8", "40", "0.9", "0.05", "7")
    assert "-no-cnv" not in opts  # llama-speculative-simple has no conversation mode (and rejects the flag)
    assert ("-md" in opts) == (mode == "draft-simple")
    if mode == "draft-simple":
        assert (opts["-md"], opts["-ngld"], opts["-td"]) == ("/m/draft.gguf", "all", "2")


def test_native_modes_choose_what_runs_after_plain(tmp_path):
    bin_dir = fake_binaries(tmp_path / "bin")
    chosen = LlamaCpp(bin_dir, Path("t.gguf"), Path("d.gguf"), 2, 2048, modes=("ngram-mod", "draft-simple"))
    assert [v.mode for v in chosen.variants()] == ["plain", "draft-simple", "ngram-mod"]  # MODES order
    assert [v.mode for v in LlamaCpp(bin_dir, Path("t.gguf"), None, 2, 2048, modes=()).variants()] == ["plain"]
    with pytest.raises(ValueError, match="draft-simple needs a draft model"):
        LlamaCpp(bin_dir, Path("t.gguf"), None, 2, 2048, modes=("draft-simple",))
    with pytest.raises(ValueError, match="unknown llama.cpp mode 'ngram'"):
        LlamaCpp(bin_dir, Path("t.gguf"), None, 2, 2048, modes=("ngram",))


def test_bench_native_mode_errors(tmp_path, target_path):
    runner = CliRunner()
    got = runner.invoke(cli, ["bench", "-m", str(target_path), "--native-mode", "ngram-mod", "--allow-busy"])
    assert got.exit_code == 2 and "--native-mode chooses among llama.cpp's modes: add --native DIR" in got.output
    got = runner.invoke(cli, ["bench", "-m", str(target_path), "--no-draft", "--native", str(fake_binaries(tmp_path / "b")),
                              "--native-mode", "draft-simple", "--allow-busy", "-w", "code"])
    assert got.exit_code == 1
    assert got.output.strip().splitlines()[-1] == ("Error: --native-mode: llama.cpp draft-simple needs a draft model; "
                                                   "load one with -d/--draft")
    got = runner.invoke(cli, ["bench", "-m", str(target_path), "--native-mode", "ngram"])
    assert got.exit_code == 2 and "'ngram' is not one of" in got.output


def test_gpu_layers_follow_the_engine_settings(tmp_path):
    llama = LlamaCpp(fake_binaries(tmp_path / "bin"), Path("t.gguf"), Path("d.gguf"), 4, 2048,
                     n_gpu_layers=0, n_gpu_layers_draft=12)
    opts = options(llama.command(NativeVariant("draft-simple"), tmp_path / "p.txt", 8, GREEDY))
    assert (opts["-ngl"], opts["-ngld"]) == ("0", "12")


@pytest.mark.parametrize("amx_offered", [True, False])
def test_tools_killed_where_amx_is_offered_run_again_without_extra_buffer_types(tmp_path, monkeypatch, capsys,
                                                                                amx_offered):
    """Built by GCC 12, llama.cpp's AMX kernels crash at their first product (ggspec.weights):
    such a build's tools run again, and from then on, with --no-repack. Elsewhere a crash
    is an error."""
    monkeypatch.setattr(native, "_AMX_CRASHED", set())
    offered = {weights.AMX: 1, weights.REPACK: 2} if amx_offered else {weights.REPACK: 2}
    monkeypatch.setattr(ggml, "cpu_extra_buffer_types", lambda: offered)
    log = tmp_path / "calls"
    script = (f'echo "$*" >> {log}\n'
              f'case "$*" in *--no-repack*) cat {DATA / "llama-completion.stderr.txt"} >&2 ;; *) kill -SEGV $$ ;; esac')
    llama = LlamaCpp(fake_binaries(tmp_path / "bin", script), Path("t.gguf"), Path("d.gguf"), 2, 2048)
    plain = NativeVariant("plain")
    assert "--no-repack" not in llama.command(plain, tmp_path / "p.txt", 8, GREEDY)
    if not amx_offered:
        with pytest.raises(GgspecError, match=r"llama-completion failed \(exit code -11\)"):
            llama.run(plain, "Hello", 8, GREEDY)
        return
    assert llama.run(plain, "Hello", 8, GREEDY) == parse_completion((DATA / "llama-completion.stderr.txt").read_text())
    assert "llama-completion was killed by signal 11" in capsys.readouterr().err
    assert llama.run(plain, "Hello", 8, GREEDY).tokens == 47
    calls = log.read_text().splitlines()
    assert ["--no-repack" in c for c in calls] == [False, True, True]  # one crash, then without AMX
    for variant in llama.variants():
        assert "--no-repack" in llama.command(variant, tmp_path / "p.txt", 8, GREEDY)


def test_draft_simple_runs_only_with_a_draft_model(tmp_path):
    no_draft = LlamaCpp(fake_binaries(tmp_path / "bin"), Path("t.gguf"), None, 2, 2048)
    assert [v.mode for v in no_draft.variants()] == [m for m in MODES if m != "draft-simple"]
    with pytest.raises(ValueError, match="draft model"):
        no_draft.command(NativeVariant("draft-simple"), tmp_path / "p.txt", 8, GREEDY)
    with pytest.raises(ValueError, match="unknown llama.cpp mode 'ngram'"):
        NativeVariant("ngram")


def test_parse_llama_completion_output():
    run = parse_completion((DATA / "llama-completion.stderr.txt").read_text())
    assert run == NativeRun(prompt_tokens=433, tokens=47, seconds=pytest.approx(28.33558 - 9.18605))  # total - prompt
    assert run.tokens_per_second == pytest.approx(47 / 19.14953)
    assert (run.drafted, run.accepted) == (0, 0)


@pytest.mark.parametrize("mode", ["ngram-mod", "draft-simple"])
def test_parse_llama_speculative_simple_output(mode):
    text = (DATA / f"llama-speculative-simple.{mode}.stderr.txt").read_text()
    expected = {"ngram-mod": NativeRun(prompt_tokens=433, tokens=94, seconds=pytest.approx(16.266), drafted=87,
                                       accepted=68),
                "draft-simple": NativeRun(prompt_tokens=433, tokens=52, seconds=pytest.approx(60.704), drafted=39,
                                          accepted=39)}[mode]
    assert parse_speculative(text) == expected


def test_output_without_timings_is_refused():
    with pytest.raises(ValueError, match="'eval time'"):
        parse_completion("common_perf_print: prompt eval time = 1.0 ms / 3 tokens (...)\n")
    with pytest.raises(ValueError, match="'total time'"):
        parse_completion("common_perf_print: prompt eval time = 1.0 ms / 3 tokens (...)\n"
                         "common_perf_print:        eval time = 9.0 ms / 2 runs (...)\n")
    with pytest.raises(ValueError, match="'decoded N tokens'"):
        parse_speculative((DATA / "llama-completion.stderr.txt").read_text())


def test_a_missing_directory_or_binary_is_one_clear_error(tmp_path):
    with pytest.raises(GgspecError, match=r"no such directory; build them with: python tools/build_llama_cpp.py"):
        check_dir(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    fake_binaries(tmp_path / "half")
    (tmp_path / "half" / "llama-speculative-simple").unlink()
    with pytest.raises(GgspecError, match="llama-speculative-simple missing or not executable"):
        check_dir(tmp_path / "half")
    got = CliRunner().invoke(cli, ["bench", "--native", str(tmp_path / "nowhere"), "--allow-busy"])
    assert got.exit_code == 1
    assert got.stderr.strip().splitlines() == [
        f"Error: --native {tmp_path / 'nowhere'}: no such directory; build them with: "
        "python tools/build_llama_cpp.py DIR"]


def test_a_crash_or_unparsable_output_names_the_binary_and_its_stderr(tmp_path):
    crashing = LlamaCpp(fake_binaries(tmp_path / "a", "echo 'llama_model_load: error loading model' >&2; exit 134"),
                        Path("t.gguf"), None, 1, 512)
    with pytest.raises(GgspecError, match=r"llama-completion failed \(exit code 134\).*\n.*error loading model"):
        crashing.run(NativeVariant("plain"), "hello", 8, GREEDY)
    runs = tmp_path / "runs"
    silent = LlamaCpp(fake_binaries(tmp_path / "b", f"echo run >> {runs}; echo 'just text' >&2"), Path("t.gguf"),
                      None, 1, 512)
    with pytest.raises(GgspecError, match=r"llama-speculative-simple: no 'decoded N tokens' line in its output "
                                          r"\(3 runs\).*\n.*just text"):
        silent.run(NativeVariant("ngram-cache"), "hello", 8, GREEDY)
    assert runs.read_text().count("run") == 3


def test_a_run_whose_log_lost_its_timings_is_repeated(tmp_path):
    """The tools' logger thread is not flushed at exit: a fast run can end before its summary is written."""
    runs, log = tmp_path / "runs", DATA / "llama-speculative-simple.ngram-mod.stderr.txt"
    script = f'echo run >> {runs}; [ $(wc -l < {runs}) -ge 2 ] && cat {log} >&2; exit 0'
    llama = LlamaCpp(fake_binaries(tmp_path / "bin", script), Path("t.gguf"), None, 1, 512)
    assert llama.run(NativeVariant("ngram-mod"), "hello", 8, GREEDY).tokens == 94
    assert runs.read_text().count("run") == 2


def test_the_prompt_file_holds_the_exact_prompt_text(tmp_path):
    """llama.cpp's -f drops one trailing newline: the file gets one more than the prompt."""
    out = tmp_path / "seen.txt"
    llama = LlamaCpp(fake_binaries(tmp_path / "bin", f'while [ "$1" != "-f" ]; do shift; done; cp "$2" {out}; exit 1'),
                     Path("t.gguf"), None, 1, 512)
    with pytest.raises(GgspecError):
        llama.run(NativeVariant("plain"), "<|im_start|>user\nhi \\n there<|im_end|>\n", 8, GREEDY)
    assert out.read_text() == "<|im_start|>user\nhi \\n there<|im_end|>\n\n"


# ---------------------------------------------------------------- with the real binaries

@needs_binaries
def test_native_rows_on_tiny_models_read_the_prompt_as_ggspec_does(target_path, draft_path):
    with Engine(target_path, draft_path, target_config=BackendConfig(n_ctx=2048, n_threads=1),
                spec=SpecConfig(draft_max=4)) as engine:
        llama = LlamaCpp(Path(NATIVE_DIR), engine.target.path, engine.draft.path, 1, engine.n_ctx)
        rows = run_grid(engine, [WORKLOADS["code"]], variants([("lookup", ())], [3]), repetitions=2, max_tokens=12,
                        native=llama)
    assert [r.variant.label for r in rows] == ["none", "lookup k=3", *(f"llama.cpp {m}" for m in MODES)]
    for row in rows[2:]:
        assert len(row.ratios) == 2 and len(row.native_ratios) == 2 and row.stats.generated_tokens >= 2 * 11
        ours = rows[0].stats
        assert row.stats.prefill_tokens == ours.prefill_tokens + ours.cached_tokens  # the same prompt, twice
    assert rows[2].native_ratios == [1.0, 1.0]  # llama.cpp plain over itself
    assert rows[3].stats.draft_tokens > 0  # draft-simple drafted
    assert "x llama.cpp" in table(rows).splitlines()[0]


@pytest.mark.real
@needs_binaries
def test_bench_native_on_the_real_pair():
    got = CliRunner().invoke(cli, ["bench", "-w", "edit", "--method", "lookup", "-k", "3", "-n", "16",
                                   "--native", NATIVE_DIR, "--json", "--allow-busy"])
    assert got.exit_code == 0, got.output
    rows = json.loads(got.stdout)["rows"]
    assert [r["method"] for r in rows] == ["none", "lookup", *(f"llama.cpp {m}" for m in MODES)]
    for row in rows[2:]:
        assert row["tokens_per_second"] > 0 and row["speedup"] > 0 and row["native_speedup"] > 0
