"""Benchmarks: the grid runner, its table and plot, and `ggspec bench` (tiny models)."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig
from ggspec.bench import (WORKLOADS, Row, Variant, first_difference, plot, run_grid, table, variants,
                          workload_from_file)
from ggspec.stats import Stats
from ggspec.cli import cli


@pytest.fixture(scope="module")
def engine(target_path, draft_path):
    with Engine(target_path, draft_path, target_config=BackendConfig(n_ctx=2048, n_threads=1),
                spec=SpecConfig(draft_max=4)) as e:
        yield e


@pytest.fixture(scope="module")
def rows(engine):
    calls = []
    grid = variants([("draft", ()), ("lookup", ())], [2, 4])
    got = run_grid(engine, [WORKLOADS["code"], WORKLOADS["edit"]], grid, repetitions=2, max_tokens=12,
                   on_run=lambda *args: calls.append(args))
    assert len(calls) == 2 * len(grid) * 2
    return got


def test_builtin_workloads_are_the_documented_sizes():
    assert set(WORKLOADS) == {"code", "edit", "rewrite", "qa", "prose", "revise"}
    module = WORKLOADS["edit"].prompt.split("```python\n")[1]
    assert 55 <= len(module.splitlines()) <= 70
    assert 45 <= len(WORKLOADS["rewrite"].prompt.split("```javascript\n")[1].splitlines()) <= 60
    assert 350 <= len(WORKLOADS["qa"].prompt.split()) <= 500
    assert len(WORKLOADS["revise"].turns) == 2


def test_variants_put_the_baseline_first_and_pair_methods_with_their_ks():
    assert variants([("draft", ()), ("none", ()), ("draft", ())], [2, 4, 2]) == [
        Variant("none"), Variant("draft", 2), Variant("draft", 4)]
    assert [v.label for v in variants([("lookup", ()), ("auto", (8, 16))], [3])] == [
        "none", "lookup k=3", "auto k=8", "auto k=16"]


def test_a_two_turn_workload_answers_the_first_turn_before_timing(engine):
    got = run_grid(engine, [WORKLOADS["revise"]], variants([], [2]), max_tokens=6)
    first = engine.generate([{"role": "user", "content": WORKLOADS["revise"].turns[0]}], max_tokens=6,
                            sampling=SamplingConfig(temperature=0), spec=SpecConfig("none")).text
    prompt = engine.tokenize([{"role": "user", "content": WORKLOADS["revise"].turns[0]},
                              {"role": "assistant", "content": first},
                              {"role": "user", "content": WORKLOADS["revise"].turns[1]}])
    assert got[0].stats.prefill_tokens + got[0].stats.cached_tokens == len(prompt)


def test_grid_rows_sum_the_repetitions_and_compare_with_plain_decoding(rows):
    assert all(len(r.ratios) == 2 for r in rows)
    assert [(r.workload, r.variant.label) for r in rows[:5]] == [
        ("code", "none"), ("code", "draft k=2"), ("code", "draft k=4"), ("code", "lookup k=2"), ("code", "lookup k=4")]
    assert len(rows) == 10
    for row in rows:
        s = row.stats
        assert s.generated_tokens == 24 and s.method == row.variant.method  # 2 x 12: tiny models never stop
        assert row.speedup > 0
        assert 0 <= s.acceptance_rate <= 1
        assert len(s.position_acceptance) <= (row.variant.draft_max or 0)
    assert all(r.speedup == 1.0 for r in rows if r.variant.method == "none")
    assert all(r.stats.draft_tokens > 0 for r in rows if r.variant.method == "draft")
    data = rows[1].to_dict()
    assert data["method"] == "draft" and data["draft_max"] == 2
    assert data["stats"]["generated_tokens"] == 24


def test_every_other_repetition_runs_the_variants_in_reverse_order(engine):
    calls = []
    rows = run_grid(engine, [WORKLOADS["code"]], variants([("lookup", ())], [2]), repetitions=3, max_tokens=4,
                    on_run=lambda workload, variant, r, stats: calls.append((r, variant.label)))
    assert calls == [(0, "none"), (0, "lookup k=2"), (1, "lookup k=2"), (1, "none"), (2, "none"), (2, "lookup k=2")]
    assert rows[0].ratios == [1.0, 1.0, 1.0]  # each repetition's ratio is to its own `none`
    assert len(rows[1].ratios) == 3


def test_greedy_rows_record_that_exact_methods_gave_plain_decodings_answer(rows):
    assert all(r.left_plain_at == [None, None] for r in rows)
    assert all(r.to_dict()["left_plain_at"] == [None, None] for r in rows)
    lines = table(rows).splitlines()
    assert lines[0].split()[5] == "answer" and all(" same " in line for line in lines[2:])


def test_sampled_rows_record_no_comparison(engine):
    got = run_grid(engine, [WORKLOADS["code"]], variants([("lookup", ())], [2]), max_tokens=4,
                   sampling=SamplingConfig(temperature=0.8, seed=1))
    assert all(r.left_plain_at == [] for r in got) and "answer" not in table(got)


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2 and first_difference([1, 2, 3], [1, 2]) == 2
    assert first_difference([], []) is None


def test_table_names_answers_that_left_plain_decodings():
    rows = [Row("qa", Variant("none"), Stats(), [1.0], left_plain_at=[None, None, None]),
            Row("qa", Variant("auto", 16), Stats(), [1.1], left_plain_at=[24, None, 30])]
    lines = table(rows).splitlines()
    assert lines[0].split()[5] == "answer"
    assert lines[2].split()[4] == "same" and lines[3].split()[5:7] == ["2/3", "@24"]
    assert any(line.startswith("answer: repetitions whose greedy answer left") for line in lines)


def test_table_has_a_line_per_row(rows):
    lines = table(rows).splitlines()
    assert lines[0].split()[:3] == ["workload", "method", "tok/s"]
    assert len(lines) == 2 + len(rows)
    assert lines[2].split()[:2] == ["code", "none"] and "1.00" in lines[2]


def test_plot_writes_a_png(rows, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    plot(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prompt_file_becomes_a_workload(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("  Say hello.\n")
    assert workload_from_file(path).name == "mine" and workload_from_file(path).prompt == "Say hello."
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        workload_from_file(path)


def test_bench_command_json(target_path, draft_path, tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("hello world")
    got = CliRunner().invoke(cli, ["bench", "-m", target_path, "-d", draft_path, "--threads", "1", "-w", "code",
                                   "--prompt-file", str(extra), "--method", "draft", "-k", "2,3", "-n", "6",
                                   "--json", "--allow-busy"])
    assert got.exit_code == 0, got.output
    data = json.loads(got.stdout)
    assert (data["target"], data["draft"]) == (target_path, draft_path)
    assert data["params"]["temperature"] == 0.0 and data["params"]["max_tokens"] == 6
    cells = [(r["workload"], r["method"], r["draft_max"]) for r in data["rows"]]
    assert cells == [(w, m, k) for w in ("code", "extra") for m, k in (("none", None), ("draft", 2), ("draft", 3))]


def test_bench_with_prompt_files_alone_runs_only_them(target_path, tmp_path):
    extra = tmp_path / "mine.txt"
    extra.write_text("hello world")
    got = CliRunner().invoke(cli, ["bench", "-m", target_path, "--threads", "1", "--prompt-file", str(extra),
                                   "--method", "none", "-n", "2", "-r", "1", "--json", "--allow-busy"])
    assert got.exit_code == 0, got.output
    assert {r["workload"] for r in json.loads(got.stdout)["rows"]} == {"mine"}


def test_bench_command_table(target_path):
    got = CliRunner().invoke(cli, ["bench", "-m", target_path, "--threads", "1", "-w", "prose", "-n", "4",
                                   "--allow-busy"])
    assert got.exit_code == 0, got.output
    assert got.stdout.splitlines()[1].startswith("machine: ")
    methods = [line.split()[1] for line in got.stdout.splitlines()[4:]]
    assert methods[0] == "none" and "lookup" in methods  # every method these models allow


def test_bench_refuses_a_busy_machine(target_path, monkeypatch):
    from ggspec import machine
    monkeypatch.setattr(machine, "busy_processes", lambda seconds=1.0: ["make (4242): 97%"])
    got = CliRunner().invoke(cli, ["bench", "-m", target_path, "-n", "4"])
    assert got.exit_code == 1
    assert "Error: the machine is busy" in got.stderr and "make (4242): 97%" in got.stderr
    assert "--allow-busy" in got.stderr


def test_bench_method_with_its_own_draft_lengths(target_path):
    got = CliRunner().invoke(cli, ["bench", "-m", target_path, "--threads", "1", "-w", "prose", "-n", "4",
                                   "--method", "lookup:2,5", "--json", "--allow-busy"])
    assert got.exit_code == 0, got.output
    rows = json.loads(got.stdout)["rows"]
    assert [(r["method"], r["draft_max"]) for r in rows] == [("none", None), ("lookup", 2), ("lookup", 5)]
    got = CliRunner().invoke(cli, ["bench", "-m", target_path, "--method", "fast:2", "--allow-busy"])
    assert got.exit_code == 2 and "unknown method 'fast'" in got.stderr


@pytest.mark.parametrize("args", [["-k", "0"], ["-k", "4,65"], ["--method", "lookup:2,0"]])
def test_bench_refuses_a_draft_length_out_of_range_before_loading(args, tmp_path):
    """(the model does not exist: a refusal after loading would say that instead)"""
    got = CliRunner().invoke(cli, ["bench", "-m", str(tmp_path / "none.gguf"), *args, "--allow-busy"])
    assert got.exit_code == 2 and "draft lengths run from 1 to 64" in got.stderr


def test_bench_refuses_a_method_these_models_cannot_run(target_path):
    got = CliRunner().invoke(cli, ["bench", "-m", target_path, "--method", "draft", "--allow-busy"])
    assert got.exit_code == 1 and "Error: method draft is not available" in got.stderr


def test_plot_without_matplotlib_is_one_line_before_the_run(target_path, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    got = CliRunner().invoke(cli, ["bench", "-m", target_path, "--plot", str(tmp_path / "x.png"), "--allow-busy"])
    assert got.exit_code == 1
    assert got.stderr.strip() == "Error: plotting needs matplotlib: pip install 'ggspec[plot]'"
