"""Corrupted model and head files (see fuzz_files.py) through Model, the heads loader and
`ggspec info`: each ends in a one-line error naming the file, or loads; no process crash,
no hang, bounded memory. Seeded: a failure names the file and the run replays."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from fuzz_files import KINDS, make_jobs, run

FILES = 2000
SEED = 20261125
ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_corrupted_files_end_in_one_line_errors_or_load(tmp_path):
    jobs, target = make_jobs(tmp_path, FILES, SEED)
    report = run(jobs, target, env=ENV)
    problems = report.problems(jobs)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:30])
    assert len(report.results) == FILES and report.workers == 1
    assert report.max_rss_kb < 1 << 20  # KiB: under 1 GiB
    loaded = Counter(jobs[i]["kind"] for i, r in report.results.items() if jobs[i]["what"] in r["loaded"])
    failed = Counter(jobs[i]["kind"] for i, r in report.results.items() if jobs[i]["what"] not in r["loaded"])
    assert loaded["flip-data"] > 0 and failed["truncate"] > 0 and failed["huge-count"] > 0
    assert set(loaded) | set(failed) == set(KINDS)


def test_the_runner_reports_crashes_and_hangs(tmp_path, target_path):
    """A worker that aborts or stalls costs only its current file; the others still run."""
    jobs = [{"path": target_path, "what": "abort", "kind": "-"},
            {"path": target_path, "what": "model", "kind": "-"},
            {"path": target_path, "what": "hang", "kind": "-"},
            {"path": target_path, "what": "model", "kind": "-"}]
    report = run(jobs, target_path, timeout=5, env=ENV)
    assert [i for i, _ in report.crashes] == [0] and report.hangs == [2]
    assert sorted(report.results) == [1, 3] and report.workers == 3
    assert all(r["loaded"] == ["model", "info"] and not r["problems"] for r in report.results.values())
