"""The process environment, read once into a frozen ``Settings``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from bot.errors import ConfigError

# Above this, admitted commands would wait on the database pool (10 connections) for longer than
# Slack's patience; a larger bound would only turn honest "busy" answers into slow ones.
MAX_IN_FLIGHT_CAP = 1000


@dataclass(frozen=True, kw_only=True)
class Settings:
    slack_bot_token: str
    slack_signing_secret: str
    slack_app_token: str | None
    slack_api_url: str
    database_url: str
    redis_url: str
    config_path: str
    kubeconfig: str | None
    host: str
    port: int
    worker_id: str
    actions_queue: str = "opsbot-actions"
    queue_prefix: str = "bull"
    spool_dir: str = ".opsbot/spool"  # audit rows kept while the database is down (bot/adapters/spool.py)
    # A running request whose worker's heartbeat (every 5 s) stopped this long ago becomes `unknown`.
    worker_lease: float = 120.0
    # How many `/ops` commands one process works on at once after the ack (bot/pipeline.py
    # ``Admission``; past it, "opsbot is busy"). The default is sized from the database pool.
    max_in_flight: int = 100

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        missing = [k for k in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "DATABASE_URL", "REDIS_URL") if not env.get(k)]
        if missing:
            raise ConfigError(
                "missing environment variable(s): " + ", ".join(missing) + " (see README.md, 'Configuration')"
            )
        port = env.get("PORT", "3000")
        if not port.isdigit():
            raise ConfigError(f"PORT must be a number, got {port!r}")
        api_url = env.get("SLACK_API_URL", "https://slack.com/api/")
        lease = env.get("OPSBOT_WORKER_LEASE", "120")
        if not lease.isdigit() or not 15 <= int(lease) <= 3600:
            raise ConfigError(f"OPSBOT_WORKER_LEASE is seconds between 15 and 3600 (3 heartbeats at least), got {lease!r}")
        max_in_flight = env.get("OPSBOT_MAX_IN_FLIGHT", "100").strip()
        if not max_in_flight.isascii() or not max_in_flight.isdigit() or not 1 <= int(max_in_flight) <= MAX_IN_FLIGHT_CAP:
            raise ConfigError(f"OPSBOT_MAX_IN_FLIGHT is how many commands one process works on at once: a whole number from 1 "
                              f"to {MAX_IN_FLIGHT_CAP} (default 100), got {max_in_flight[:40]!r}")
        return cls(
            slack_bot_token=env["SLACK_BOT_TOKEN"],
            slack_signing_secret=env["SLACK_SIGNING_SECRET"],
            slack_app_token=env.get("SLACK_APP_TOKEN") or None,
            slack_api_url=api_url if api_url.endswith("/") else api_url + "/",
            database_url=env["DATABASE_URL"],
            redis_url=env["REDIS_URL"],
            config_path=env.get("OPSBOT_CONFIG", "policies/default.yaml"),
            kubeconfig=env.get("KUBECONFIG") or None,
            host=env.get("HOST", "0.0.0.0"),
            port=int(port),
            worker_id=env.get("OPSBOT_WORKER_ID") or env.get("HOSTNAME") or f"pid-{os.getpid()}",
            actions_queue=env.get("OPSBOT_ACTIONS_QUEUE", "opsbot-actions"),
            spool_dir=env.get("OPSBOT_SPOOL_DIR", ".opsbot/spool"),
            worker_lease=float(lease),
            max_in_flight=int(max_in_flight),
        )
