"""`opsbot serve` and `opsbot worker` give freed memory back to the system (bot/memory.py): with
glibc's own rising trim threshold, a freed heap top of ~30 MiB stayed resident."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import bot.cli

ROOT = Path(__file__).resolve().parents[2]
PROBE = r"""
import sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
if sys.argv[1] == "fixed":
    from bot.memory import return_freed_memory
    assert return_freed_memory()
big = bytes(16 * 2**20)
del big  # a large block glibc mapped on its own, freed: glibc raises its thresholds (to 16 and 32 MiB)
junk = [bytes(1000 + i % 7) for i in range(30_000)]  # ~30 MiB on the heap (past Python's small-object allocator)
top = rss()
del junk
print(top - rss())
"""


def _given_back(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_given_back_once_the_threshold_is_fixed() -> None:
    assert _given_back("as-is") < 5  # what glibc does alone: the ~30 MiB freed stay resident
    assert _given_back("fixed") > 20


def test_serve_and_worker_fix_it_before_they_start(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def serve(*args: Any, **kwargs: Any) -> None:
        calls.append("serve" if kwargs["http"] else "worker")

    monkeypatch.setattr(bot.cli, "return_freed_memory", lambda: calls.append("fixed") or True)
    monkeypatch.setattr(bot.cli, "_serve", serve)
    monkeypatch.setattr(bot.cli.Settings, "from_env", staticmethod(lambda: None))
    monkeypatch.setattr(bot.cli, "_config_path", lambda args: "<test>")
    bot.cli.cmd_serve(argparse.Namespace(no_worker=False))
    bot.cli.cmd_worker(argparse.Namespace())
    assert calls == ["fixed", "serve", "fixed", "worker"]
