"""The playground's world, built from whatever config `opsbot dev` runs.

- ``demo_env``: a value for every ``${VAR}`` the config uses, chosen by where the config uses it
  (a database URL → a demo database of the sandbox PostgreSQL, a Redis URL → the sandbox Redis, a
  health probe → the demo platform's HTTP endpoints); variables already set are kept.
- ``cast``: the people — every user id under ``roles.*.users`` and, for every ``roles.*.usergroups``
  group, two made-up members — with readable names from their role (``sre-1``, ``engineer-3``).
- ``seed_targets`` / ``seed_platform``: the config's deployments and cronjobs in the sandbox
  cluster; its providers and webhook tables, its flag actions' tables and keys and the tables its
  plan queries read, in the demo databases and Redis, when they are not there yet.
- ``make_tour``: who to be and what to type — a requester, the approvers of the rule that applies,
  an auditor, and an example command — decided by the real policy engine on the config.
- ``panel``: what the commands act on, read live (webhook events, providers, queues, deployments…),
  for the page's side panel, each row with a ready command to copy.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import psycopg
import yaml
from psycopg import sql

from bot.action_config import FlagAction, HttpAction, SqlAction, placeholders, render_text
from bot.config import Config
from bot.domain import Actor, DecisionKind, UserId
from bot.messages import plural
from bot.policy.engine import decide, may_approve
from bot.sandbox.demo import DEMO_TABLES
from bot.sandbox.kube_apiserver import CRONJOBS, DEPLOYMENTS, Cluster, cronjob_manifest, deployment_manifest

# The demo platform's people (policies/examples/nova-rms.yaml) keep their names.
DEMO_NAMES = {"U0ALICE": "alice", "U0BOTH": "bo", "U0CAROL": "carol", "U0DAN": "dan", "U0EVE": "eve"}
GROUP_MEMBERS = 2  # made-up members per Slack user group
DEMO_TOKEN = "opsbot-demo-token"  # what an http action's ${SECRET} header gets in the playground: not a secret
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# ---------------------------------------------------------------------------------------------- environment


def env_refs(text: str) -> dict[str, str]:
    """Every ``${VAR}`` in a config file, with the first key path that uses it (``databases.app.url``)."""
    found: dict[str, str] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, str):
            for m in _ENV_REF.finditer(value):
                found.setdefault(m.group(1), path)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")

    with contextlib.suppress(yaml.YAMLError):
        walk(yaml.safe_load(text), "")
    return found


def env_kind(path: str) -> str | None:
    """What a variable used at ``path`` must be: "database", "redis", "http", "token" (an http
    action's header, e.g. its Authorization), or None (unknown)."""
    top = path.split(".", 1)[0]
    if top == "databases":
        return "database"
    if top == "redis" or path.endswith(".redis_url"):
        return "redis"
    if top == "health":
        return "http"
    if top == "actions":
        parts = path.split(".")
        if len(parts) == 3 and parts[2] == "url":
            return "http"
        if len(parts) == 4 and parts[2] == "headers":
            return "token"
    return None


def demo_database_name(var: str) -> str:
    """The demo database a ``*_DATABASE_URL`` variable gets: Nova's (the demo platform's schema) for
    NOVA_/DEV_DATABASE_URL, one per platform otherwise (NEXUS_DATABASE_URL → opsbot_demo_nexus)."""
    if var in ("NOVA_DATABASE_URL", "DEV_DATABASE_URL"):
        return "opsbot_demo_platform"
    stem = re.sub(r"_(DATABASE|DB|PG|POSTGRES|DSN)(_URL)?$|_URL$", "", var).lower()
    return "opsbot_demo_" + (re.sub(r"[^a-z0-9_]", "_", stem) or "db")


def demo_env(text: str, *, environ: Mapping[str, str], database: Callable[[str], str], redis_url: str,
             http_url: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(values to add to the environment, what each stands for, notes for the banner). ``database``
    maps a variable name to the URL of the demo database made for it."""
    values: dict[str, str] = {}
    meaning: dict[str, str] = {}
    notes: list[str] = []
    for var, path in env_refs(text).items():
        if environ.get(var):
            meaning[var] = "yours (set in the environment)"
            continue
        kind = env_kind(path)
        if kind == "database":
            values[var] = database(var)
            meaning[var] = f"the demo database {demo_database_name(var)}"
        elif kind == "redis":
            values[var], meaning[var] = redis_url, "the sandbox Redis"
        elif kind == "http":
            values[var], meaning[var] = http_url, "the demo platform's HTTP endpoints (health and admin)"
        elif kind == "token":  # made up: the demo platform's admin endpoints take any token
            values[var], meaning[var] = DEMO_TOKEN, "a made-up token the demo platform accepts"
        else:
            notes.append(f"{var} (used at {path}) is not set and the playground cannot tell what it is: "
                         "the config keeps `${" + var + "}` there, so that part will not work here")
    return values, meaning, notes


# ---------------------------------------------------------------------------------------------- people


@dataclass
class Person:
    id: str
    name: str
    roles: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # Slack user groups they are in (made up for the playground)

    @property
    def label(self) -> str:
        via = f" via {', '.join(self.groups)}" if self.groups else ""
        return f"{self.name} ({', '.join(self.roles)}{via})"

    @property
    def actor(self) -> Actor:
        return Actor(UserId(self.id), name=self.name, groups=frozenset(self.groups))


def cast(config: Config) -> tuple[dict[str, Person], dict[str, list[str]]]:
    """(people by user id in picker order, user group id → member ids)."""
    people: dict[str, Person] = {}
    groups: dict[str, list[str]] = {}
    per_role: dict[str, int] = {}

    def name_for(role: str) -> str:
        per_role[role] = per_role.get(role, 0) + 1
        return f"{role}-{per_role[role]}"

    for role, spec in config.roles.items():
        for user in spec.users:
            person = people.get(user) or people.setdefault(user, Person(user, DEMO_NAMES.get(user) or name_for(role)))
            if role not in person.roles:
                person.roles.append(role)
    taken = set(people)
    for role, spec in config.roles.items():
        for group in spec.usergroups:
            if group not in groups:
                base = "U0" + (group[2:] if group.startswith("S0") else group.lstrip("S"))
                members: list[str] = []
                n = 1
                while len(members) < GROUP_MEMBERS:
                    uid = f"{base}{n}"
                    n += 1
                    if uid in taken:
                        continue
                    taken.add(uid)
                    members.append(uid)
                    people[uid] = Person(uid, name_for(role), groups=[group])
                groups[group] = members
            for uid in groups[group]:
                if role not in people[uid].roles:
                    people[uid].roles.append(role)
    return people, groups


# ---------------------------------------------------------------------------------------------- cluster and data


def _replicas(config_min: int, config_max: int, wanted: int = 3) -> int:
    return max(config_min, min(config_max, wanted))


def seed_targets(cluster: Cluster, config: Config) -> list[str]:
    """The config's deployments (two revisions each, so history and rollback have something to
    show) and cronjobs, where the sandbox cluster does not have them yet. Returns what was added."""
    added = []
    for alias, d in config.deployments.items():
        with cluster.lock:
            exists = (DEPLOYMENTS, d.namespace, d.name) in cluster.objects
        if exists:
            continue
        repo = f"ghcr.io/{d.namespace}/{d.name}"
        cluster.create_deployment(d.namespace, deployment_manifest(d.name, f"{repo}:1.0.0", namespace=d.namespace,
                                                                   replicas=_replicas(d.replicas.min, d.replicas.max)))
        current = cluster.get(DEPLOYMENTS, d.namespace, d.name)
        current["metadata"].setdefault("annotations", {})["kubernetes.io/change-cause"] = "release 1.0.1"
        current["spec"]["template"]["spec"]["containers"][0]["image"] = f"{repo}:1.0.1"
        cluster.update_deployment(d.namespace, d.name, current)
        added.append(f"deployment {alias} ({d.namespace}/{d.name})")
    for alias, cj in config.cronjobs.items():
        with cluster.lock:
            exists = (CRONJOBS, cj.namespace, cj.name) in cluster.objects
        if exists:
            continue
        cluster.create_cronjob(cj.namespace, cronjob_manifest(cj.name, f"ghcr.io/{cj.namespace}/{cj.name}:1.0.0",
                                                              schedule="0 3 * * *", namespace=cj.namespace,
                                                              command=["/bin/sh", "-c", "echo backup"]))
        added.append(f"cronjob {alias} ({cj.namespace}/{cj.name})")
    return added


def provider_names(config: Config) -> list[str]:
    """The providers the config names (target groups, rules' targets), for the demo table."""
    named = [t.removeprefix("provider:") for members in config.target_groups.values() for t in members
             if t.startswith("provider:")]
    named += [t.removeprefix("provider:") for rule in config.rules for t in rule.targets if t.startswith("provider:")]
    return list(dict.fromkeys(named))


def _table(schema: str | None, table: str) -> sql.Composable:
    return sql.SQL(".").join([sql.Identifier(schema), sql.Identifier(table)]) if schema else sql.Identifier(table)


def seed_platform(config: Config) -> list[str]:
    """The config's providers and webhook tables in its (demo) databases, created and filled when
    missing. Databases whose URL is not a PostgreSQL URL (not provided) are left alone."""
    done = []
    spec = config.providers
    if spec and config.databases[spec.database].url.startswith("postgres"):
        with psycopg.connect(config.databases[spec.database].url, autocommit=True) as conn:
            if spec.schema_:
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(spec.schema_)))
            table = _table(spec.schema_, spec.table)
            conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({} text PRIMARY KEY, {} boolean NOT NULL DEFAULT true)").format(
                table, sql.Identifier(spec.key), sql.Identifier(spec.active_column)))
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
            names = provider_names(config) or ([] if row and row[0] else ["provider-a", "provider-b", "provider-c"])
            for name in names:
                conn.execute(sql.SQL("INSERT INTO {} ({}, {}) VALUES (%s, true) ON CONFLICT DO NOTHING").format(
                    table, sql.Identifier(spec.key), sql.Identifier(spec.active_column)), (name,))
            done.append(f"providers {', '.join(names)}" if names else "providers")
    hooks = config.webhooks
    if hooks and config.databases[hooks.database].url.startswith("postgres"):
        with psycopg.connect(config.databases[hooks.database].url, autocommit=True) as conn:
            if hooks.schema_:
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(hooks.schema_)))
            table = _table(hooks.schema_, hooks.table)
            cols = [sql.SQL("{} text PRIMARY KEY").format(sql.Identifier(hooks.id_column)),
                    sql.SQL("event_type text NOT NULL DEFAULT 'event'"),
                    sql.SQL("{} text NOT NULL").format(sql.Identifier(hooks.status_column))]
            if hooks.error_column:
                cols.append(sql.SQL("{} text").format(sql.Identifier(hooks.error_column)))
            cols += [sql.SQL("payload jsonb NOT NULL DEFAULT '{}'"), sql.SQL("created_at timestamptz NOT NULL DEFAULT now()")]
            exists = conn.execute("SELECT 1 FROM information_schema.tables WHERE table_schema = coalesce(%s, current_schema()) "
                                  "AND table_name = %s", (hooks.schema_, hooks.table)).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE TABLE {} ({})").format(table, sql.SQL(", ").join(cols)))
                for n, status in enumerate((hooks.replayable or ("failed",))[:2]):
                    conn.execute(sql.SQL("INSERT INTO {} ({}, event_type, {}) VALUES (%s, %s, %s)").format(
                        table, sql.Identifier(hooks.id_column), sql.Identifier(hooks.status_column)),
                        (str(uuid.uuid5(uuid.NAMESPACE_URL, f"opsbot-demo/{hooks.table}/{n}")), "demo.event", status))
                done.append(f"webhook events in {hooks.table}")
    return done + seed_flags(config) + seed_plan_tables(config)


def flag_keys(action: FlagAction) -> list[str]:
    """The keys a flag action can name, when they can be listed: its literal key, or every combination
    of the enum parameters its key names. None can be listed when a free parameter is in the key
    (NexNum's `{provider}`: the rows are the table's own)."""
    names = list(dict.fromkeys(placeholders(action.key)))
    if any(n not in action.params or action.params[n].type != "enum" for n in names):
        return []
    return [render_text(action.key, dict(zip(names, combo, strict=True)))
            for combo in itertools.product(*(action.params[n].values for n in names))]


def _flag_column(values: dict[str, Any]) -> sql.SQL:
    stored = list(values.values())
    if all(isinstance(v, bool) for v in stored):
        return sql.SQL("boolean")
    return sql.SQL("bigint" if all(isinstance(v, int) for v in stored) else "text")


def seed_flags(config: Config) -> list[str]:
    """Each flag action's table (key column, value column typed by its values) and Redis keys, with every
    key that can be listed (``flag_keys``) set to the action's *first* value — the examples list the
    normal state first (`{"off": false, "on": true}` for maintenance). Rows and keys already there
    are left as they are, so a reused data directory keeps what the playground changed."""
    done = []
    for name, action in config.actions.items():
        if not isinstance(action, FlagAction):
            continue
        first = next(iter(action.values.values()))
        keys = flag_keys(action)
        if action.database is not None:
            url = config.databases[action.database].url
            if not url.startswith("postgres"):
                continue
            table = _table(action.schema_, str(action.table))
            key_col, value_col = sql.Identifier(action.key_column), sql.Identifier(action.value_column)
            with psycopg.connect(url, autocommit=True) as conn:
                if action.schema_:
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(action.schema_)))
                conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({} text PRIMARY KEY, {} {} NOT NULL)").format(
                    table, key_col, value_col, _flag_column(action.values)))
                for key in keys:  # no ON CONFLICT: a table of the platform's own may have no unique key
                    conn.execute(sql.SQL("INSERT INTO {} ({}, {}) SELECT %s, %s WHERE NOT EXISTS "
                                         "(SELECT 1 FROM {} WHERE {} = %s)").format(table, key_col, value_col, table, key_col),
                                 (key, first, key))
            done.append(f"flag table {action.table} for {name}" + (f" ({', '.join(keys)})" if keys else ""))
        elif keys:
            import redis

            client = redis.Redis.from_url(config.redis[str(action.redis)].url, socket_connect_timeout=2, socket_timeout=2)
            try:
                for key in keys:
                    client.set(key, str(first), nx=True)
            except redis.RedisError:
                continue  # the sandbox Redis is not there: the flag reads will say so
            finally:
                client.close()
            done.append(f"flags for {name} in Redis ({', '.join(keys)})")
    return done


def seed_plan_tables(config: Config) -> list[str]:
    """The tables the examples' plan queries read (bot/sandbox/demo.py ``DEMO_TABLES``). A plan query is
    free SQL, so its table cannot be derived from the config: the demo tables are explicit, one per
    example platform, keyed by the table's name, and made in the plan's database when a plan query
    of the config names that table."""
    done: list[str] = []
    made: set[tuple[str, str]] = set()
    for action in config.actions.values():
        plan = action.plan if isinstance(action, (SqlAction, HttpAction)) else None
        if plan is None:
            continue
        database = plan.database or getattr(action, "database", None)
        url = config.databases[str(database)].url if database in config.databases else ""
        if not url.startswith("postgres"):
            continue
        for table, ddl in DEMO_TABLES.items():
            if re.search(rf"(?<![\w.]){re.escape(table)}(?![\w.])", plan.query) and (url, table) not in made:
                made.add((url, table))
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(ddl)
                done.append(f"demo rows in {table}")
    return done


# ---------------------------------------------------------------------------------------------- the tour


@dataclass
class Tour:
    command: str  # what the requester types, e.g. "/ops scale api 5"
    summary: str  # what it does: "api: 3 → 5 replicas" (or the command's target)
    requester: Person | None
    approvers: list[Person]
    rule: str | None
    auditor: Person | None

    def steps(self) -> list[str]:
        """The tour as plain lines, for the banner."""
        steps = []
        if self.requester:
            steps.append(f"as {self.requester.label}, type   {self.command}")
        for p in self.approvers:
            steps.append(f"switch to {p.label} and click Approve on the card")
        if self.auditor:
            steps.append(f"switch to {self.auditor.label}: read the audit channel, or type /ops audit")
        else:
            steps.append("read the audit channel (no role may run /ops audit in this config)")
        return steps

    def json(self) -> dict[str, Any]:
        def p(person: Person | None) -> dict[str, str] | None:
            return {"id": person.id, "name": person.name, "label": person.label} if person else None
        return {"command": self.command, "summary": self.summary, "requester": p(self.requester),
                "approvers": [p(a) for a in self.approvers], "rule": self.rule, "auditor": p(self.auditor)}


def _current_replicas(cluster: Cluster | None, namespace: str, name: str) -> int | None:
    if cluster is None:
        return None
    with cluster.lock:
        d = cluster.objects.get((DEPLOYMENTS, namespace, name))
        return int(d["spec"].get("replicas") or 0) if d else None


def candidate_commands(config: Config, cluster: Cluster | None, providers: list[str]) -> list[tuple[str, dict[str, Any], str]]:
    """(command text without /ops, facts for the policy, summary), most telling first: a scale of
    each deployment within its replica range, then a backup, a queue pause, a provider switch."""
    out: list[tuple[str, dict[str, Any], str]] = []
    for alias, d in config.deployments.items():
        lo, hi = d.replicas.min, d.replicas.max
        cur = _current_replicas(cluster, d.namespace, d.name)
        cur = _replicas(lo, hi) if cur is None else cur
        n = min(hi, max(lo, cur + 2))
        if n == cur:
            n = max(lo, cur - 1)
        if n != cur:
            out.append((f"scale {alias} {n}", {"replicas_before": cur, "replicas_after": n}, f"{d.name}: {cur} → {n} replicas"))
    out += [(f"backup {alias}", {}, f"run {cj.name} now") for alias, cj in config.cronjobs.items()]
    out += [(f"queue pause {alias}", {}, f"pause the queue {q.name}") for alias, q in config.queues.items()]
    if config.providers:
        out += [(f"disable provider {name}", {}, f"disable the provider {name}") for name in providers]
    return out


def _approvers(people: list[Person], requester: Person, roles: tuple[str, ...], count: int, each: tuple[str, ...],
               config: Config) -> list[Person] | None:
    able = [p for p in people if may_approve(p.actor, requester=requester.actor, approver_roles=roles, config=config) is None]
    able.sort(key=lambda p: not set(p.roles) <= set(roles))  # those who only approve first (carol before bo)
    chosen: list[Person] = []
    for role in each:  # a distinct person for each role that must approve
        pick = next((p for p in able if p not in chosen and role in config.roles_of(p.id, frozenset(p.groups))), None)
        if pick is None:
            return None
        chosen.append(pick)
    for p in able:
        if len(chosen) >= count:
            break
        if p not in chosen:
            chosen.append(p)
    return chosen if len(chosen) >= count else None


def make_tour(config: Config, people: dict[str, Person], *, channel: str, cluster: Cluster | None = None,
              providers: list[str] | None = None, now: datetime | None = None) -> Tour | None:
    """A tour the config really allows: the first candidate command (see ``candidate_commands``)
    that someone may request and others may approve, as the policy engine decides it; else one
    that someone may run without approval; else None."""
    from commands.registry import command, parse

    now = now or datetime.now(UTC)
    everyone = list(people.values())
    auditor = next((p for p in everyone if "auditor" in p.roles), None) or next(
        (p for p in everyone if decide("audit", p.actor, config, channel_id=channel, now=now).allowed), None)
    fallback: Tour | None = None
    for text, facts, summary in candidate_commands(config, cluster, providers or []):
        try:
            inv = parse(text, config)
        except Exception: # a candidate this config does not take: try the next
            continue
        plan = command(inv.command, config).locate(inv.params, config)
        if plan is None:
            continue
        plan = replace(plan, facts={**plan.facts, **facts})
        asking = []
        for person in everyone:
            d = decide(plan, person.actor, config, channel_id=channel, now=now)
            if d.kind is DecisionKind.NEEDS_APPROVAL:
                approvers = _approvers(everyone, person, d.approver_roles, d.approvals_required, d.approvals_each, config)
                if approvers:  # someone who cannot approve asks first, as an engineer asks and an SRE approves
                    asking.append((bool(set(person.roles) & set(d.approver_roles)), person, approvers, d))
            elif d.kind is DecisionKind.ALLOW and fallback is None:
                fallback = Tour(f"/ops {text}", summary, person, [], d.rule, auditor)
        if asking:
            _, person, approvers, d = min(asking, key=lambda a: a[0])
            return Tour(f"/ops {text}", summary, person, approvers, d.rule, auditor)
    return fallback


# ---------------------------------------------------------------------------------------------- the side panel


def _row(label: str, detail: str, *commands: tuple[str, str]) -> dict[str, Any]:
    return {"label": label, "detail": detail, "commands": [{"label": k, "command": c} for k, c in commands]}


async def _rows(url: str, query: sql.Composed, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=3) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        await cur.execute(query, params)
        return list(await cur.fetchall())


async def _queue_counts(redis_url: str, prefix: str, name: str) -> dict[str, int]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        base = f"{prefix}:{name}"
        async with client.pipeline(transaction=False) as pipe:
            for kind in ("wait", "paused", "active"):
                pipe.llen(f"{base}:{kind}")
            for kind in ("prioritized", "delayed", "failed", "completed"):
                pipe.zcard(f"{base}:{kind}")
            pipe.hexists(f"{base}:meta", "paused")
            wait, paused, active, prioritized, delayed, failed, completed, is_paused = await pipe.execute()
        return {"waiting": int(wait) + int(paused) + int(prioritized), "active": int(active), "delayed": int(delayed),
                "failed": int(failed), "completed": int(completed), "paused": int(bool(is_paused))}
    finally:
        await client.aclose()


async def panel(config: Config, cluster: Cluster | None) -> dict[str, Any]:
    """The data the commands act on, read now: sections of rows, each row with commands to copy."""
    sections: list[dict[str, Any]] = []

    async def section(title: str, read: Callable[[], Any]) -> None:
        try:
            rows = await read()
        except Exception as exc: # shown in the panel: the demo data is not there
            sections.append({"title": title, "rows": [], "error": f"cannot read: {type(exc).__name__}: {str(exc)[:160]}"})
            return
        sections.append({"title": title, "rows": rows})

    hooks = config.webhooks
    if hooks:
        async def webhooks() -> list[dict[str, Any]]:
            rows = await _rows(config.databases[hooks.database].url, sql.SQL("SELECT * FROM {} WHERE {} = ANY(%s) LIMIT 50").format(
                _table(hooks.schema_, hooks.table), sql.Identifier(hooks.status_column)), (list(hooks.replayable),))
            rows.sort(key=lambda r: str(r.get("created_at", "")), reverse=True)
            return [_row(str(r[hooks.id_column]), " · ".join(str(x) for x in (r.get("event_type") or r.get("type"),
                                                                             r[hooks.status_column]) if x),
                         ("replay", f"/ops replay webhook {r[hooks.id_column]}")) for r in rows]
        await section("Webhook events to replay", webhooks)
    prov = config.providers
    if prov:
        async def providers() -> list[dict[str, Any]]:
            rows = await _rows(config.databases[prov.database].url, sql.SQL("SELECT {} AS name, {} AS active FROM {} ORDER BY 1").format(
                sql.Identifier(prov.key), sql.Identifier(prov.active_column), _table(prov.schema_, prov.table)))
            return [_row(str(r["name"]), "active" if r["active"] else "inactive",
                         ("disable", f"/ops disable provider {r['name']}") if r["active"] else
                         ("enable", f"/ops enable provider {r['name']}")) for r in rows]
        await section("Providers", providers)
    if config.queues:
        async def queues() -> list[dict[str, Any]]:
            rows = []
            for alias, q in config.queues.items():
                c = await _queue_counts(q.redis_url, q.prefix, q.name)
                detail = (f"{'paused · ' if c['paused'] else ''}{c['waiting']} waiting · {c['active']} active · "
                          f"{c['delayed']} delayed · {c['failed']} failed · {c['completed']} completed")
                rows.append(_row(alias, detail, ("stats", f"/ops queue stats {alias}"), ("failed", f"/ops queue failed {alias}")))
            return rows
        await section("Queues", queues)
    if config.deployments:
        async def deployments() -> list[dict[str, Any]]:
            rows = []
            for alias, d in config.deployments.items():
                cur = _current_replicas(cluster, d.namespace, d.name)
                have = "not in the sandbox cluster" if cur is None else plural(cur, "replica")
                n = min(d.replicas.max, max(d.replicas.min, (cur or 0) + 1))
                rows.append(_row(alias, f"{d.namespace}/{d.name} · {have} · range {d.replicas.min}–{d.replicas.max}",
                                 ("status", f"/ops status {alias}"), ("scale", f"/ops scale {alias} {n}")))
            return rows
        await section("Deployments", deployments)
    if config.cronjobs:
        async def cronjobs() -> list[dict[str, Any]]:
            return [_row(alias, f"{cj.namespace}/{cj.name}", ("backup", f"/ops backup {alias}")) for alias, cj in config.cronjobs.items()]
        await section("CronJobs", cronjobs)
    others: list[dict[str, Any]] = []
    others += [_row(name, f"database · {db.environment}", ("sessions", f"/ops db sessions {name}"))
               for name, db in config.databases.items()]
    others += [_row(name, f"Redis · {r.environment}", ("info", f"/ops redis info {name}")) for name, r in config.redis.items()]
    others += [_row(name, f"health · {plural(len(s.probes), 'probe')}", ("health", f"/ops health {name}"))
               for name, s in config.health.items()]
    if others:
        async def rest() -> list[dict[str, Any]]:
            return others
        await section("Databases, Redis, health", rest)
    return {"sections": sections}
