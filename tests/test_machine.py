"""What keeps the machine busy while ggspec measures: other processes, long- or short-lived,
and not ggspec's own finished children."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ggspec import machine

pytestmark = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux's /proc")
SPIN = [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < {}: pass"]


def _spin(seconds: float) -> list[str]:
    return [SPIN[0], SPIN[1], SPIN[2].format(seconds)]


def test_a_process_started_during_the_measurement_is_named_with_all_its_time():
    before = machine.snapshot()
    spinner = subprocess.Popen(_spin(3))
    try:
        time.sleep(1.5)
        busy = machine.busy_since(before)
    finally:
        spinner.kill()
        spinner.wait()
    assert any(f"({spinner.pid})" in b for b in busy), busy


def test_processes_too_short_lived_for_any_snapshot_are_counted():
    """A shell that runs one short computation after another: each ends before any look at
    /proc, and the shell waits for it, so only the machine's busy time shows them."""
    shell = subprocess.Popen(["sh", "-c", 'for i in 1 2 3 4 5 6 7 8 9 10; do "$0" "$1" "$2"; done', *_spin(0.15)])
    before = machine.snapshot()
    time.sleep(1.2)
    busy = machine.busy_since(before)
    shell.wait()
    assert any(b.startswith("short-lived processes: ") for b in busy), busy


def test_ggspecs_own_finished_children_do_not_count():
    before = machine.snapshot()
    for _ in range(3):
        subprocess.run(_spin(0.3), check=True)
    busy = machine.busy_since(before)
    assert not any(b.startswith("short-lived processes: ") for b in busy), busy
