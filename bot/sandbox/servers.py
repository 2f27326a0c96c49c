"""Real PostgreSQL and Redis servers for the tests, on loopback, private to the test run.

``initdb``/``pg_ctl`` from the system (Debian's ``postgresql`` package; as root they run as the
``postgres`` user) and ``redis-server``. ``scripts/bootstrap`` installs them when missing. When
``OPSBOT_TEST_DATABASE_URL`` / ``OPSBOT_TEST_REDIS_URL`` are set, those servers are used instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    path = found[0] if found else shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} not found: run scripts/bootstrap (it installs PostgreSQL)")
    return path


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@contextlib.contextmanager
def postgres_server(root: str | None = None, *, env_var: str | None = "OPSBOT_TEST_DATABASE_URL") -> Iterator[str]:
    """Yields a superuser URL. With ``root``, the cluster lives there and is kept (reused next
    time); without, it is a temporary one, deleted afterwards. Stopped on exit either way."""
    if env_var and os.environ.get(env_var):
        yield os.environ[env_var]
        return
    keep = root is not None
    root = root or tempfile.mkdtemp(prefix="opsbot-pg-")
    data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
    os.makedirs(sock, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
    port = free_port()
    if not os.path.exists(os.path.join(data, "PG_VERSION")):
        init = subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                                            "--no-sync", "--locale=C"]), capture_output=True, text=True)
        if init.returncode != 0:
            hint = " (as root, PostgreSQL runs as the postgres user, which must be able to reach this folder)" if os.geteuid() == 0 else ""
            raise RuntimeError(f"initdb failed in {data}{hint}: {init.stderr.strip()[-500:]}")
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=200"
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", data, "-o", opts, "-l", os.path.join(root, "log"), "-w", "start"]),
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        mode = "fast" if keep else "immediate"
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", data, "-m", mode, "-w", "stop"]), capture_output=True)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def redis_server(root: str | None = None, *, env_var: str | None = "OPSBOT_TEST_REDIS_URL") -> Iterator[str]:
    if env_var and os.environ.get(env_var):
        yield os.environ[env_var]
        return
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        raise RuntimeError("redis-server not found: run scripts/bootstrap (it installs Debian's redis-server)")
    port = free_port()
    keep = root is not None
    root = root or tempfile.mkdtemp(prefix="opsbot-redis-")
    os.makedirs(root, exist_ok=True)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", root, "--protected-mode", "yes"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            break
        time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
