"""Test infrastructure: real PostgreSQL and Redis (started once per session), and per test a
fresh opsbot database, a fresh platform database, a Kubernetes emulator, a fake Slack and the
opsbot app itself, wired like production."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from bot.adapters.audit_log import AuditLog
from bot.adapters.store import Store
from bot.config import Config, load_config
from bot.sandbox.demo import PLATFORM_SCHEMA, seed_cluster
from bot.sandbox.kube_apiserver import KubeApiServer
from bot.sandbox.servers import postgres_server, redis_server
from bot.sandbox.slack_api import FakeSlack
from tests.harness import Harness

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "policies" / "examples" / "nova-rms.yaml"



ALICE, BOTH, CAROL, DAN, EVE, MALLORY = "U0ALICE", "U0BOTH", "U0CAROL", "U0DAN", "U0EVE", "U0MALLORY"
FAILED_EVENT = "8f2c1b9e-5d4a-4c3b-9a1e-0f6d2c8b7a51"


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def state_template(pg_admin: str) -> str:
    """A database with opsbot's migrations applied; each test copies it."""
    name = "opsbot_template"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")

    async def migrate() -> None:
        store = Store(_with_db(pg_admin, name), min_size=1, max_size=1)
        await store.open()
        try:
            await store.migrate()
        finally:
            await store.close()

    asyncio.run(migrate())
    return name


def fresh_db(pg_admin: str, template: str | None = None) -> str:
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    return _with_db(pg_admin, name)


@pytest.fixture
def state_db(pg_admin: str, state_template: str) -> str:
    return fresh_db(pg_admin, state_template)


@pytest_asyncio.fixture
async def trail(state_db: str) -> AsyncIterator[AuditLog]:
    """The audit trail of a fresh state database (a pool of 4)."""
    store = Store(state_db, max_size=4)
    await store.open()
    yield AuditLog(store)
    await store.close()


@pytest.fixture
def platform_db(pg_admin: str) -> str:
    url = fresh_db(pg_admin)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(PLATFORM_SCHEMA)
    return url


@pytest.fixture
def queue_prefix() -> str:
    return "t" + uuid.uuid4().hex[:8]


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeApiServer]:
    """The emulator, seeded like Nova's production namespace: nova-worker at 3 replicas, nova-api
    with three revisions of history (1.4.0 → 1.4.1 → 1.4.2)."""
    with KubeApiServer() as api:
        seed_cluster(api.cluster)
        api.kubeconfig(str(tmp_path / "kubeconfig"), context="nova-prod")
        yield api


@pytest.fixture
def kubeconfig(kube: KubeApiServer, tmp_path: Path) -> str:
    return str(tmp_path / "kubeconfig")


def example_config(platform_db: str, redis_url: str, queue_prefix: str, *, env: dict[str, str] | None = None,
                   **overrides: Any) -> Config:
    """The Nova example as the tests run it. ``env`` adds variables, e.g. NOVA_API_URL / NOVA_WORKER_URL
    for the health probes (unset, they are the example's in-cluster defaults, which no test calls)."""
    env = {"NOVA_DATABASE_URL": platform_db, "NOVA_REDIS_URL": redis_url, **(env or {})}
    config = load_config(EXAMPLE, env=env)
    queues = {k: q.model_copy(update={"prefix": queue_prefix}) for k, q in config.queues.items()}
    return config.model_copy(update={"queues": queues, **overrides})


@pytest.fixture
def config(platform_db: str, redis_url: str, queue_prefix: str) -> Config:
    return example_config(platform_db, redis_url, queue_prefix)


@pytest_asyncio.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


@pytest_asyncio.fixture
async def bot(config: Config, slack: FakeSlack, state_db: str, redis_url: str, kubeconfig: str,
              queue_prefix: str) -> AsyncIterator[Harness]:
    h = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                            queue_prefix=queue_prefix)
    yield h
    try:
        await asyncio.wait_for(h.stop(), timeout=60)
    except TimeoutError:  # say what was stuck rather than hang the whole run
        import io

        out = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(file=out)
        raise AssertionError("the bot did not stop within 60 s; tasks:\n" + out.getvalue()) from None

