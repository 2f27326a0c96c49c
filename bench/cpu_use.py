"""Where the CPU went during a bench run, from /proc (Linux): per process (children that exited
included) and for the whole machine, so a bench can tell "the machine is out of CPU" from "the
program serialises": a run whose machine is ~100 % busy cannot scale further, whatever the code does.

    usage = CpuUse({"worker-0": pid, "postgres": postmaster_pid, ...})  # sampled at start
    ...run...
    report = usage.stop()   # {"machine_busy_pct": .., "seconds": .., "cpu_s": {"worker-0": .., ...}}
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu(pid: int, *, tree: bool = False) -> float:
    """User + system CPU seconds of ``pid`` (its threads, and children it has reaped); with
    ``tree``, plus its live children's (a postmaster's backends)."""
    try:
        f = _stat(pid)
    except OSError:
        return 0.0
    total = sum(int(x) for x in f[11:15]) / _TICK  # utime stime cutime cstime
    if tree:
        for child in children(pid):
            try:
                c = _stat(child)
            except OSError:
                continue
            total += (int(c[11]) + int(c[12])) / _TICK
    return total


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(int(entry))[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def find_pid(*words: str) -> int | None:
    """The first process whose command line contains every one of ``words``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(w in cmd for w in words):
            return int(entry)
    return None


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (busy: not idle, not iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # guest time is already in user
    return total - fields[3] - fields[4], total


class CpuUse:
    def __init__(self, processes: dict[str, tuple[int, bool]]) -> None:
        """``processes``: name → (pid, whole tree)."""
        self.processes = processes
        self.started = time.monotonic()
        self.machine0 = machine_ticks()
        self.cpu0 = {name: process_cpu(pid, tree=tree) for name, (pid, tree) in processes.items()}

    def stop(self) -> dict[str, object]:
        busy1, total1 = machine_ticks()
        seconds = time.monotonic() - self.started
        cpu = {name: round(process_cpu(pid, tree=tree) - self.cpu0[name], 2) for name, (pid, tree) in self.processes.items()}
        busy, total = busy1 - self.machine0[0], total1 - self.machine0[1]
        cores = os.cpu_count() or 1
        ours = sum(cpu.values())
        return {"seconds": round(seconds, 2), "cores": cores,
                "machine_busy_pct": round(100 * busy / total, 1) if total else None,  # 100 = every core busy
                "ours_pct": round(100 * ours / (seconds * cores), 1) if seconds else None,
                "others_cpu_s": round(max(0.0, busy / _TICK - ours), 2), "cpu_s": cpu}
