"""The audit spool: attempts recorded while opsbot's database is down, kept on local disk until
they can be appended to the audit trail.

Every attempt gets an audit row, including the ones refused *because* PostgreSQL is unreachable.
Those rows cannot be written where they belong, so ``Audit.record`` puts them here instead: one
JSON line per entry, in a file owned by this process (``spool-<pid>-<random>.jsonl`` in the spool
directory), flushed and fsynced before the user is told it is kept. When the database is back,
``drain`` appends them in order. Each entry carries an id that goes into its audit row
(``result.spooled.id``); the append skips an id already in the trail, so a crash between the
append and the file rewrite, or two processes draining the same file, never makes two rows. A line
that can never be appended (corrupt, or refused by PostgreSQL) is moved to ``quarantine.jsonl``
in the same directory, logged at error level and counted (``opsbot_audit_spool_quarantined_total``),
so that it cannot hold up the lines after it, nor the audit poster.

Bounded: at most ``max_entries`` entries and ``max_bytes`` bytes per process; past that ``put``
raises ``SpoolFull``, and when the directory or file cannot be written ``SpoolUnavailable``; for
both (``BackendUnavailable``) the caller says the attempt could not be recorded (the attempt itself
is refused anyway: nothing runs while the database is down).

Files left by a process that died are drained by the next process that uses the same directory:
each writer holds an exclusive ``flock`` on its own file for its lifetime, so a file whose lock
can be taken has no writer left. In Kubernetes the directory is an ``emptyDir`` mounted at
``OPSBOT_SPOOL_DIR`` (manifests/base/deployment.yaml; the root filesystem is read-only): it
survives a container restart, not the loss of the pod; SECURITY.md lists that residual risk.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from bot.errors import BackendUnavailable
from bot.messages import plural

log = logging.getLogger(__name__)

Entry = dict[str, Any]


SPOOL = "the local audit spool"


class SpoolFull(BackendUnavailable):
    def __init__(self, detail: str) -> None:
        super().__init__(SPOOL, detail)


class SpoolUnavailable(BackendUnavailable):
    """The spool directory or file cannot be written (no writable volume mounted, disk full,
    permissions). Like ``SpoolFull``, the caller says the attempt could not be recorded."""

    def __init__(self, detail: str) -> None:
        super().__init__(SPOOL, detail)


class AuditSpool:
    def __init__(self, directory: str | Path, *, max_entries: int = 10_000, max_bytes: int = 10 * 1024 * 1024,
                 on_quarantine: Callable[[], None] | None = None) -> None:
        self.directory = Path(directory)
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.on_quarantine = on_quarantine  # a metric: called once per line moved to quarantine
        self._path = self.directory / f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._file: IO[str] | None = None
        self._entries = 0
        self._lock = asyncio.Lock()

    def _open(self) -> IO[str]:
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            f = open(self._path, "a+", encoding="utf-8")  # held for the process's lifetime
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                raise
            self._file = f
        return self._file

    @property
    def pending(self) -> int:
        """Entries of this process not yet in the audit trail."""
        return self._entries

    async def put(self, entry: Entry, *, why: str) -> Entry:
        """Keep ``entry`` (the keyword arguments of an audit append); returns it with its spool
        marker (``result.spooled``: id, when, why), which the audit row will carry."""
        async with self._lock:
            try:
                f = self._open()
                size = f.seek(0, os.SEEK_END)
            except OSError as exc:
                log.error("audit spool: cannot open %s: %s (is a writable volume mounted at OPSBOT_SPOOL_DIR?)", self._path, exc)
                raise SpoolUnavailable(f"cannot write {self._path}: {exc}") from exc
            if self._entries >= self.max_entries or size >= self.max_bytes:
                raise SpoolFull(f"it already holds {plural(self._entries, 'attempt')} ({size:,} bytes), its limit")
            marker = {"id": uuid.uuid4().hex, "at": datetime.now(UTC).isoformat(timespec="microseconds"), "why": why}
            kept = {**entry, "result": {**(entry.get("result") or {}), "spooled": marker}}
            try:
                f.write(json.dumps(kept, ensure_ascii=False, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:  # disk full, I/O error: leave no half line behind
                with contextlib.suppress(OSError):
                    f.truncate(size)
                    f.seek(0, os.SEEK_END)
                log.error("audit spool: cannot write %s: %s", self._path, exc)
                raise SpoolUnavailable(f"cannot write {self._path}: {exc}") from exc
            self._entries += 1
            return kept

    async def drain(self, append: Callable[[Entry], Awaitable[bool]]) -> int:
        """Append what is kept, oldest first; returns how many rows were appended. ``append``
        returns False when the entry's id is already in the trail. Stops when the database is away
        again (``BackendUnavailable``) and keeps the rest. A line that can never be appended (not
        JSON, not an object, refused by PostgreSQL) is moved to ``quarantine.jsonl`` with a log line
        at error level, and the drain goes on."""
        done = 0
        async with self._lock:
            if self._file is not None and self._entries:
                appended, self._entries = await self._drain_file(self._file, append)
                done += appended
        for other in sorted(self.directory.glob("spool-*.jsonl")) if self.directory.is_dir() else []:
            if other == self._path:
                continue
            with contextlib.suppress(OSError), open(other, "r+", encoding="utf-8") as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its process is alive and drains it itself
                appended, remaining = await self._drain_file(f, append)
                done += appended
                if not remaining:
                    other.unlink()
        return done

    async def _drain_file(self, f: IO[str], append: Callable[[Entry], Awaitable[bool]]) -> tuple[int, int]:
        """(rows appended, entries still kept) for one spool file."""
        f.seek(0)
        lines = [line for line in f.read().splitlines() if line.strip()]
        done, stop = 0, len(lines)
        for i, line in enumerate(lines):
            why = ""
            try:
                entry = json.loads(line)
            except ValueError as exc:
                entry, why = None, f"not JSON ({exc})"
            if not why and not isinstance(entry, dict):
                why = f"not a JSON object (a {type(entry).__name__})"
            if not why:
                try:
                    if await append(entry):
                        done += 1
                except BackendUnavailable as exc:
                    log.warning("audit spool: the database is not back yet (%s); %d attempt(s) still kept", exc, len(lines) - i)
                    stop = i
                    break
                except Exception as exc:  # the row itself is refused (bad arguments, a value PostgreSQL rejects)
                    why = f"refused: {type(exc).__name__}: {str(exc).strip()[:300]}"
            if why:
                try:
                    self._quarantine(f.name, i + 1, line, why)
                except OSError as exc:  # keep it (and the rest) where it is rather than lose it
                    log.error("audit spool %s: line %d cannot be quarantined (%s); it is kept", f.name, i + 1, exc)
                    stop = i
                    break
        rest = lines[stop:]
        f.seek(0)
        f.truncate()
        if rest:
            f.write("\n".join(rest) + "\n")
        f.flush()
        os.fsync(f.fileno())
        f.seek(0, os.SEEK_END)
        if done:
            log.info("audit spool: %d attempt(s) appended to the audit trail", done)
        return done, len(rest)

    @property
    def quarantine_path(self) -> Path:
        return self.directory / "quarantine.jsonl"

    def _quarantine(self, source: str, number: int, line: str, why: str) -> None:
        """Move a line that can never be appended out of the way (so it does not stop the drain for
        ever), keeping it whole for a person to look at: one JSON object per line in
        ``quarantine.jsonl`` (never drained: it does not match ``spool-*.jsonl``)."""
        record = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "source": str(source), "line": number, "why": why,
                  "raw": line}
        with open(self.quarantine_path, "a", encoding="utf-8") as q:
            fcntl.flock(q.fileno(), fcntl.LOCK_EX)  # other processes draining other files append too
            q.write(json.dumps(record, ensure_ascii=False) + "\n")
            q.flush()
            os.fsync(q.fileno())
        log.error("audit spool %s: line %d moved to quarantine (%s): %s; that attempt is NOT in the audit trail, look at it there: %r",
                  source, number, self.quarantine_path, why, line[:200])
        if self.on_quarantine is not None:
            self.on_quarantine()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            with contextlib.suppress(OSError):
                if self._path.stat().st_size == 0:
                    self._path.unlink()
