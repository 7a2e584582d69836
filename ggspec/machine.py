"""What this machine is and whether something else is using it: timings taken while
another process computes are wrong (two busy cores halve llama.cpp's speed)."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

LOAD_LIMIT = 0.5      # 1-minute load average above this: busy
PROCESS_LIMIT = 0.1   # another process using more than this share of a core: busy


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by every process but this one: pid -> (name, seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    return out


def _others_total() -> float:
    """CPU seconds every process but this one has used since boot: the machine's busy time
    (/proc/stat) less this process's own and its finished children's (ggspec's own runs of
    llama.cpp's tools, one after another). It counts processes too short-lived for any
    snapshot of /proc to see (a build's compiler runs, a test's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    busy = sum(int(f) for k, f in enumerate(fields[:8]) if k not in (3, 4))  # less idle, iowait
    own = Path("/proc/self/stat").read_text()
    own_fields = own[own.rindex(")") + 2:].split()
    return (busy - sum(int(f) for f in own_fields[11:15])) / tick  # utime stime cutime cstime


@dataclass(frozen=True)
class Snapshot:
    at: float
    used: dict[int, tuple[str, float]]
    others: float  # _others_total then


def snapshot() -> Snapshot:
    """Every other process's CPU time now (nothing where /proc is not available)."""
    if not Path("/proc/self/stat").exists():
        return Snapshot(time.monotonic(), {}, 0.0)
    return Snapshot(time.monotonic(), _cpu_seconds(), _others_total())


def busy_since(before: Snapshot) -> list[str]:
    """Other processes that used more than PROCESS_LIMIT of a core since `before`, as
    "name (pid): 85%" (one started since then counted in full), and, as "short-lived
    processes: 40%", the CPU used beyond theirs by processes no snapshot saw."""
    if not before.used:
        return []
    seconds = max(time.monotonic() - before.at, 1e-3)
    busy, seen = [], 0.0
    for pid, (name, used) in _cpu_seconds().items():
        share = (used - before.used.get(pid, (name, 0.0))[1]) / seconds
        seen += max(share, 0.0)
        if share > PROCESS_LIMIT:
            busy.append(f"{name} ({pid}): {100 * share:.0f}%")
    unseen = (_others_total() - before.others) / seconds - seen
    if unseen > PROCESS_LIMIT:
        busy.append(f"short-lived processes: {100 * unseen:.0f}%")
    return busy


def busy_processes(seconds: float = 1.0) -> list[str]:
    """Other processes using more than PROCESS_LIMIT of a core, watched for `seconds`."""
    before = snapshot()
    time.sleep(seconds)
    return busy_since(before)


@dataclass(frozen=True)
class MachineState:
    cpu: str
    cpus: int
    load: float           # 1-minute load average
    busy: list[str]       # other processes using CPU now

    @property
    def idle(self) -> bool:
        return self.load <= LOAD_LIMIT and not self.busy

    def describe(self, threads: int | None = None) -> str:
        line = f"{self.cpu}, {self.cpus} CPUs"
        if threads:
            line += f", {threads} threads"
        line += f", load {self.load:.2f}"
        if self.busy:
            line += "; busy: " + ", ".join(self.busy)
        return line


def state(seconds: float = 1.0) -> MachineState:
    """The machine now (watching other processes for `seconds`)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return MachineState(cpu_name(), os.cpu_count() or 1, load, busy_processes(seconds))


def check_idle(threads: int | None = None, *, allow_busy: bool = False) -> MachineState:
    """The machine's state; raises RuntimeError naming what keeps it busy unless it is
    idle or allow_busy."""
    now = state()
    if not now.idle and not allow_busy:
        raise RuntimeError(f"the machine is busy ({now.describe(threads)}): timings now would be "
                           f"wrong; stop the other work and wait for the load to fall below "
                           f"{LOAD_LIMIT}, or pass --allow-busy")
    return now


def idle_or_exit(threads: int | None = None, *, allow_busy: bool = False) -> MachineState:
    """check_idle for the measuring scripts in tools/: exits with its message when busy."""
    try:
        return check_idle(threads, allow_busy=allow_busy)
    except RuntimeError as e:
        raise SystemExit(f"Error: {e}") from None
