"""`opsbot dev`: the whole product on one laptop, with no Slack workspace and no cluster.

Starts, all on 127.0.0.1: PostgreSQL and Redis (the URLs from DATABASE_URL/REDIS_URL when set,
otherwise private servers whose data lives in ``--data-dir``, stopped on exit and reused next
time), the Kubernetes API emulator (Nova's deployments and their revision history, plus whatever
deployments and cronjobs the config names), the demo platform's databases, BullMQ queues and HTTP
health endpoints (every ``${VAR}`` the config uses is pointed at one of them: bot/sandbox/world.py),
the Slack emulator with the browser playground (the config's users, and made-up members for its
user groups), and the real opsbot app (the same Runtime `opsbot serve` builds) pointed at them
through SLACK_API_URL and a kubeconfig, exactly as in production.

The environment to run `opsbot audit …` and `opsbot policy explain` against that world is printed at
start and kept in ``<data-dir>/env`` while it runs (`opsbot dev env` prints it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml
from aiohttp import web

from bot.config import Config, load_config
from bot.runtime import Runtime
from bot.sandbox import world
from bot.sandbox.demo import PLATFORM_SCHEMA, health_app, seed_cluster, seed_incident
from bot.sandbox.kube_apiserver import KubeApiServer
from bot.sandbox.servers import postgres_server, redis_server
from bot.sandbox.slack_api import FakeSlack
from bot.settings import Settings

DEFAULT_CONFIG = "policies/examples/nova-rms.yaml"
ENV_FILE = "env"  # in the data directory: the running dev world's environment, as `export` lines (`opsbot dev env`)


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def _ensure_database(admin_url: str, name: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')
    return _with_db(admin_url, name)


def people(config: Config) -> dict[str, str]:
    """Everyone the playground's user picker shows, by user id: `alice (engineer)`, `engineer-3 (engineer via S0NXSENG)`."""
    return {uid: p.label for uid, p in world.cast(config)[0].items()}


def kubeconfig(kube: KubeApiServer, path: Path, config: Config) -> str:
    """One context per environment of the config (its ``kube_context``), all pointing at the
    sandbox cluster, as a real kubeconfig points each at its cluster."""
    namespace = next((d.namespace for d in config.deployments.values()), "default")
    contexts = list(dict.fromkeys(e.kube_context for e in config.environments.values() if e.kube_context)) or ["sandbox"]
    kube.kubeconfig(str(path), context=contexts[0], namespace=namespace)
    data = json.loads(path.read_text())
    data["contexts"] = [{"name": c, "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace}} for c in contexts]
    path.write_text(json.dumps(data))
    return str(path)


def env_lines(env: dict[str, str], *, config_path: str) -> list[str]:
    return [f"# the environment of the running `opsbot dev` world (config {config_path}, pid {os.getpid()})",
            *(f"export {k}={shlex.quote(v)}" for k, v in env.items())]


def print_env(data_dir: str) -> int:
    """`opsbot dev env`: the running dev world's environment again, as `export` lines."""
    path = Path(data_dir) / ENV_FILE
    try:
        text = path.read_text()
    except OSError:
        print(f"opsbot dev env: no running dev world in {data_dir} (start it with scripts/dev or opsbot dev)", file=sys.stderr)
        return 1
    pid = re.search(r"pid (\d+)\)", text)
    if pid:
        try:
            os.kill(int(pid.group(1)), 0)
        except ProcessLookupError:
            print(f"opsbot dev env: the dev world that wrote {path} (pid {pid.group(1)}) is not running; start it again",
                  file=sys.stderr)
            return 1
        except PermissionError:
            pass
    sys.stdout.write(text)
    return 0


@dataclass
class World:
    """What `opsbot dev` started, as the banner and the tests need it."""

    url: str
    config_path: str
    config: Config
    env: dict[str, str]  # what to export for `opsbot audit …`/`opsbot policy explain` against this world
    tour: world.Tour | None
    people: dict[str, world.Person]
    notes: list[str] = field(default_factory=list)
    seeded: list[str] = field(default_factory=list)
    incident_channel: str = ""
    audit_channel: str = ""


async def run(*, config_path: str, host: str, port: int, data_dir: Path,
              ready: Callable[[World], None] | None = None, stop: asyncio.Event | None = None) -> None:
    os.makedirs(data_dir, exist_ok=True)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    env_file = data_dir / ENV_FILE
    with contextlib.ExitStack() as stack:
        admin = stack.enter_context(postgres_server(str(data_dir / "postgres"), env_var="DATABASE_URL"))
        redis_url = stack.enter_context(redis_server(str(data_dir / "redis"), env_var="REDIS_URL"))
        state_url = admin if os.environ.get("DATABASE_URL") else _ensure_database(admin, "opsbot")
        platform_url = _ensure_database(admin, "opsbot_demo_platform")
        with psycopg.connect(platform_url, autocommit=True) as conn:
            conn.execute(PLATFORM_SCHEMA)
        kube = stack.enter_context(KubeApiServer())
        cluster_file = data_dir / "cluster.json"
        if cluster_file.exists():  # the sandbox cluster as the last run left it (revisions, replicas)
            kube.cluster.restore(json.loads(cluster_file.read_text()))
        else:
            seed_cluster(kube.cluster)
            seed_incident(kube.cluster)

        text, config_file = await asyncio.to_thread(_read, config_path)
        metrics = [p.get("metric") for p in _probes(text) if p.get("metric")]
        health = web.AppRunner(health_app(metrics=[str(m) for m in metrics]), access_log=None)  # the demo platform's HTTP endpoints
        await health.setup()
        health_site = web.TCPSite(health, "127.0.0.1", 0)
        await health_site.start()
        health_url = f"http://127.0.0.1:{health_site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        values, _meaning, notes = world.demo_env(text, environ=os.environ, redis_url=redis_url, http_url=health_url,
                                                 database=lambda var: _ensure_database(admin, world.demo_database_name(var)))
        missing: list[str] = []
        config = load_config(config_path, env={**os.environ, **values}, missing_env=missing)
        incident = config.slack.allowed_channels[0] if config.slack.allowed_channels else "C0INCIDENT"
        audit = config.slack.audit_channel or "C0AUDIT"
        if not config.slack.audit_channel:
            config = config.model_copy(update={"slack": config.slack.model_copy(update={"audit_channel": audit})})
            notes.append(f"slack.audit_channel is not set in {config_path}: the playground uses {audit} "
                         "(`opsbot audit verify --against-channel` needs it in the config)")
        seeded = world.seed_targets(kube.cluster, config)
        try:
            seeded += await asyncio.to_thread(world.seed_platform, config)
        except psycopg.Error as exc:
            notes.append(f"the demo tables could not be made: {exc}")
        kubeconfig_path = kubeconfig(kube, data_dir / "kubeconfig", config)

        cast, groups = world.cast(config)
        signing_secret, token = secrets.token_hex(16), "xoxb-playground-" + secrets.token_hex(8)
        slack = FakeSlack(signing_secret=signing_secret, users={uid: p.label for uid, p in cast.items()}, token=token,
                          channels={incident: "incident", audit: "ops-audit"})
        slack.usergroups = groups
        tour = world.make_tour(config, cast, channel=incident, cluster=kube.cluster, providers=world.provider_names(config))
        slack.tour = tour.json() if tour else None

        async def panel() -> dict[str, Any]:
            return await world.panel(config, kube.cluster)

        slack.panel = panel
        await slack.start(host=host, port=port)
        slack.permalink_base = f"http://{host}:{slack.port}"
        settings = Settings(slack_bot_token=token, slack_signing_secret=signing_secret, slack_app_token=None,
                            slack_api_url=slack.api_url, database_url=state_url, redis_url=redis_url, config_path=config_path,
                            kubeconfig=kubeconfig_path, host="127.0.0.1", port=0, worker_id="dev", queue_prefix="bull",
                            spool_dir=str(data_dir / "spool"))
        runtime = Runtime.build(settings, config)
        await runtime.store.open()
        await runtime.store.migrate()
        await runtime.start(with_worker=True)
        runner = web.AppRunner(runtime.web_app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        bot_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        slack.bot_events_url = f"http://127.0.0.1:{bot_port}/slack/events"
        url = f"http://{host}:{slack.port}/"
        exports = {"OPSBOT_CONFIG": config_file, "DATABASE_URL": state_url, "REDIS_URL": redis_url,
                   "KUBECONFIG": kubeconfig_path, "SLACK_API_URL": slack.api_url, "SLACK_BOT_TOKEN": token,
                   "SLACK_SIGNING_SECRET": signing_secret, **values}
        env_file.write_text("\n".join(env_lines(exports, config_path=config_path)) + "\n")
        env_file.chmod(0o600)
        try:
            if ready:
                ready(World(url=url, config_path=config_path, config=config, env=exports, tour=tour, people=cast,
                            notes=notes, seeded=seeded, incident_channel=incident, audit_channel=audit))
            await stop.wait()
        finally:
            with contextlib.suppress(OSError):
                env_file.unlink()
            await runtime.stop()
            await runner.cleanup()
            await health.cleanup()
            await slack.stop()
            cluster_file.write_text(json.dumps(kube.cluster.snapshot()))


def _read(path: str) -> tuple[str, str]:
    """The config file's text (empty when unreadable: load_config says why) and its absolute path."""
    try:
        return Path(path).read_text(), str(Path(path).resolve())
    except OSError:
        return "", str(Path(path).resolve())


def _probes(text: str) -> list[dict[str, Any]]:
    """The health probes of a config file, read as plain YAML (before any ${VAR} is substituted)."""
    with contextlib.suppress(Exception):
        raw = yaml.safe_load(text) or {}
        return [p for svc in (raw.get("health") or {}).values() for p in (svc.get("probes") or []) if isinstance(p, dict)]
    return []


def banner(w: World, *, data_dir: str = ".opsbot/dev") -> str:
    lines = [f"\nopsbot playground: {w.url}   (config: {w.config_path}; Ctrl-C stops everything)"]
    if w.tour:
        lines += [f"  {i}. {step}" for i, step in enumerate(w.tour.steps(), 1)]
    else:
        lines.append("  no rule in this config lets anyone change something here: try /ops help, or a read-only command")
    for note in w.notes:
        lines.append(f"  note: {note}")
    lines.append(f"\nto run `opsbot audit verify --against-channel`, `opsbot audit export` or `opsbot policy explain` against it, "
                 f"in another shell:  eval \"$(opsbot dev env{'' if data_dir == '.opsbot/dev' else f' --data-dir {data_dir}'})\"")
    lines += [f"  {line}" for line in env_lines(w.env, config_path=w.config_path)[1:]]
    member = next((p for p in w.people.values() if p.groups), None)
    if member:
        lines.append(f"  (`policy explain` does not ask Slack for user groups: for {member.name}, add --as {member.id} "
                     f"--group {member.groups[0]})")
    return "\n".join(lines) + "\n"


def main(config: str | None, host: str, port: int, data_dir: str) -> int:
    import logging

    config_path = config or DEFAULT_CONFIG
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    def ready(w: World) -> None:
        print(banner(w, data_dir=data_dir), flush=True)

    try:
        asyncio.run(run(config_path=config_path, host=host, port=port, data_dir=Path(data_dir).resolve(), ready=ready))
    except KeyboardInterrupt:
        pass
    print("opsbot dev: stopped", file=sys.stderr)
    return 0


__all__ = ["World", "main", "people", "print_env", "run"]
