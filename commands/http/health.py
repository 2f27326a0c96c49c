"""`/ops health [<service>]` — call the configured probes of one service, or of all, side by side,
and show each one's status, latency and what its body says (seeds 002, 003, 004: "API health
`/v1/health`", "`/health`, `/metrics`, worker `/readyz`", "Verify `/healthz`, `/readyz`, `/metrics`").
Read-only.

Every probe has its own timeout (≤ 1.5 s, ``health.<service>.probes[].timeout``) and they all run
at once, so the answer comes within the read-only deadline (2 s) even when a service hangs: that
probe is shown as not answering. The URLs are the config's; people only pick a service by name.

What is shown of a body, at most ``EXCERPT`` characters, scrubbed of secret-shaped text:
* JSON: ``status``, ``version``, ``checks`` and the top-level booleans (``ok``, ``db_ok``, ``ready``…);
* with ``metric:``: that metric's line(s) of a Prometheus text exposition;
* otherwise: its first line.
A probe is healthy when its status is ``expect`` (default: any 2xx), its JSON does not say
otherwise (``status`` fail/error/down/unhealthy, a false ``ok``/``ready``/``healthy``/``*_ok``) and,
with ``metric:``, the metric is in the body.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bot.config import Config, HealthProbe, health_environment
from bot.domain import Plan
from bot.errors import Refused
from bot.messages import plural
from bot.ports import Context, ProbeResponse
from commands.base import Command, Params, named
from commands.shown import untrusted

JSON_BYTES = 64 * 1024
METRICS_BYTES = 2 * 1024 * 1024
EXCERPT = 400
VALUE_CHARS = 160
METRIC_LINES = 5
INTERESTING = ("status", "version", "checks")
_BAD_STATUS = {"fail", "failed", "error", "down", "unhealthy", "critical"}
GRACE = 0.2  # beyond the longest probe timeout, before a probe that is still running is given up on


def check_service(config: Config, service: str | None) -> None:
    if not config.health:
        raise Refused("no health probes are configured here (no `health:` section in the config).")
    if service is not None:
        named(config.health, service, "service", "services with health probes")


def _bad_flag(key: str) -> bool:
    return key in ("ok", "ready", "healthy", "live", "alive") or key.endswith("_ok")


def json_excerpt(body: str) -> tuple[str, bool] | None:
    """(what a JSON body says, whether it says "unhealthy"), or None when the body is no JSON object."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    parts: list[str] = []
    unhealthy = False
    for key in INTERESTING:
        if key in doc:
            value = doc[key]
            text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
            parts.append(f"{key}={text[:VALUE_CHARS]}")
            if key == "status" and isinstance(value, str) and value.lower() in _BAD_STATUS:
                unhealthy = True
    flags = [(k, v) for k, v in doc.items() if isinstance(v, bool) and k not in INTERESTING][:8]
    for key, value in flags:
        parts.append(f"{key}={'true' if value else 'false'}")
        if not value and _bad_flag(key):
            unhealthy = True
    return " ".join(parts) or "a JSON object without status, version or checks", unhealthy


def metric_lines(body: str, metric: str) -> list[str]:
    """The sample lines of ``metric`` in a Prometheus text exposition (no comments, other metrics)."""
    found = []
    for line in body.splitlines():
        if line.startswith(metric) and line[len(metric):len(metric) + 1] in (" ", "{", "\t"):
            found.append(line.strip())
            if len(found) == METRIC_LINES:
                break
    return found


def verdict(probe: HealthProbe, resp: ProbeResponse) -> tuple[str, str]:
    """(icon, text after the status) for one probe's answer."""
    if resp.status is None:
        return ":x:", untrusted(resp.error, 200)
    ok = resp.status == probe.expect if probe.expect is not None else 200 <= resp.status < 300
    notes = [] if ok or probe.expect is None else [f"expected {probe.expect}"]
    if 300 <= resp.status < 400:
        notes.append("a redirect (not followed)")
    excerpt = ""
    said_unhealthy = False
    if probe.metric:
        lines = metric_lines(resp.body, probe.metric)
        if lines:
            excerpt = "; ".join(lines)
        else:
            excerpt = f"metric {probe.metric} is not in the body" + (" (read the first 2 MiB)" if resp.truncated else "")
            ok = False
    elif resp.body.strip():
        parsed = None if resp.truncated else json_excerpt(resp.body)
        if parsed is not None:
            excerpt, said_unhealthy = parsed
        elif resp.truncated and resp.body.lstrip().startswith(("{", "[")):
            excerpt = "a JSON body over 64 KiB (not read)"
        else:
            excerpt = resp.body.strip().splitlines()[0]
    icon = ":white_check_mark:" if ok and not said_unhealthy else (":warning:" if ok else ":x:")
    if said_unhealthy:
        notes.append("the body says unhealthy")
    text = f"{resp.status} in {resp.seconds * 1000:.0f} ms" + (f" ({', '.join(notes)})" if notes else "")
    return icon, text + (f" — {untrusted(excerpt, EXCERPT)}" if excerpt else "")


class Health(Command):
    name = "health"
    words = ("health",)
    usage = "/ops health [<service>]"
    summary = "Call a service's configured health probes (or every service's), in parallel: status, latency, body."
    mutating = False
    backend = "the health probes"

    def parse(self, args: list[str], flags: dict[str, Any], config: Config) -> Params:
        if len(args) > 1:
            raise self.usage_error(f"unexpected argument{'s' if len(args) > 2 else ''} `{untrusted(' '.join(args[1:]), 80)}`; "
                                   "name one service or none.")
        check_service(config, args[0] if args else None)
        return {"service": args[0] if args else None}

    def _skeleton(self, params: Params, config: Config, **fields: Any) -> Plan:
        service = params.get("service")
        env = config.health[service].environment if service else health_environment(config)
        return Plan(command=self.name, target=f"health/{service or '*'}", target_label=f"health of {service or 'every service'}",
                    environment=env, target_name=service or "health", target_kind="health", params=params, mutating=False, **fields)

    def locate(self, params: Params, config: Config) -> Plan | None:
        service = params.get("service")
        if not config.health or (service and service not in config.health):
            return None
        return self._skeleton(params, config, summary=f"health {service or 'of every service'} (not read)")

    async def plan(self, params: Params, ctx: Context) -> Plan:
        config = ctx.config
        service = params.get("service")
        check_service(config, service)
        services = [service] if service else sorted(config.health)
        probes = [(svc, p) for svc in services for p in config.health[svc].probes]
        calls = [asyncio.ensure_future(ctx.http.get(p.url, timeout=p.timeout, max_bytes=METRICS_BYTES if p.metric else JSON_BYTES))
                 for _, p in probes]
        await asyncio.wait(calls, timeout=max(p.timeout for _, p in probes) + GRACE)
        lines, healthy = [], 0
        for (svc, probe), call in zip(probes, calls, strict=True):
            if call.done() and not call.cancelled() and call.exception() is None:
                resp = call.result()
            else:
                call.cancel()
                resp = ProbeResponse(status=None, seconds=probe.timeout, error=f"no answer within {probe.timeout:g} s")
            icon, text = verdict(probe, resp)
            healthy += icon == ":white_check_mark:"
            lines.append(f"{icon} `{svc}/{probe.name}` {text}")
        who = service or plural(len(services), "service")
        if healthy == len(probes):
            state = f"all {plural(len(probes), 'probe')} healthy" if len(probes) > 1 else f"{plural(len(probes), 'probe')} healthy"
        else:
            state = f"{healthy} of {plural(len(probes), 'probe')} healthy"
        return self._skeleton(params, config, summary=f"health of {who}: {state}", details=tuple(lines),
                              facts={"probes": len(probes), "healthy": healthy})
