"""The ports: what commands and the request lifecycle need from the world, as Protocols.

``bot/adapters`` implements them with the real clients (kubernetes, psycopg, bullmq, redis, aiohttp);
``bot/slack`` implements ``Chat``. Commands and the policy import only this module, so they can be
read, and reasoned about, without knowing any vendor API.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bot.errors import OpsbotError

if TYPE_CHECKING:
    from bot.config import Config, Providers, Queue, Webhooks
    from bot.domain import OpsRequest

Obj = dict[str, Any]


class Kube(Protocol):
    async def read_deployment(self, environment: str, namespace: str, name: str) -> Obj: ...

    async def list_replicasets(self, environment: str, namespace: str, selector: str) -> list[Obj]: ...

    async def scale_deployment(self, environment: str, namespace: str, name: str, *, replicas: int,
                               resource_version: str) -> Obj: ...

    async def replace_pod_template(self, environment: str, namespace: str, name: str, *, template: Obj,
                                   resource_version: str) -> Obj: ...

    async def restart_deployment(self, environment: str, namespace: str, name: str, *, restarted_at: str,
                                 resource_version: str) -> Obj:
        """What `kubectl rollout restart` does (the template annotation kubectl.kubernetes.io/restartedAt),
        refused with Conflict if the deployment changed since ``resource_version``."""
        ...

    async def list_pods(self, environment: str, namespace: str, selector: str) -> list[Obj]: ...

    async def read_pod_log(self, environment: str, namespace: str, pod: str, *, container: str | None,
                           since_seconds: int | None, tail_lines: int | None, previous: bool, limit_bytes: int) -> str:
        """The log text; NotFound (with the cluster's words) when there is no such log, e.g. no
        previous container, or a pod of several containers and none named."""
        ...

    async def list_events(self, environment: str, namespace: str, *, field_selector: str) -> list[Obj]:
        """core/v1 Events, e.g. ``involvedObject.name=web-abc12,type=Warning``."""
        ...

    async def find_hpa(self, environment: str, namespace: str, deployment_name: str) -> Obj | None:
        """The HorizontalPodAutoscaler (autoscaling/v2) whose scaleTargetRef is this Deployment, if any."""
        ...

    async def patch_hpa_bounds(self, environment: str, namespace: str, name: str, *, min_replicas: int, max_replicas: int,
                               resource_version: str) -> Obj:
        """Set minReplicas/maxReplicas; Conflict if the HPA changed since ``resource_version``."""
        ...

    async def read_cronjob(self, environment: str, namespace: str, name: str) -> Obj: ...

    async def create_job(self, environment: str, namespace: str, body: Obj) -> Obj:
        """Sent once (OutcomeUnknown when the answer is lost); Conflict when a Job of that name exists."""
        ...

    async def read_job(self, environment: str, namespace: str, name: str) -> Obj: ...


class PlatformDatabases(Protocol):
    """The platforms' own databases (not opsbot's state)."""

    async def provider(self, spec: Providers, name: str) -> Obj | None: ...

    async def provider_names(self, spec: Providers) -> list[str]: ...

    async def set_provider_active(self, spec: Providers, name: str, *, active: bool, expect: bool) -> bool: ...

    async def webhook_event(self, spec: Webhooks, event_id: str) -> Obj | None: ...

    async def replay_webhook(self, spec: Webhooks, event_id: str, enqueue: Callable[[Obj], Awaitable[None]]) -> Obj | None:
        """In one transaction: reset the row if still replayable, then ``enqueue(row)``; commit
        only if both worked. Returns the updated row, or None when the row was not replayable."""
        ...

    # pg_stat_activity, for `/ops db …` (database: a key of ``config.databases``). Every statement
    # runs under a statement timeout; reads answer (or raise BackendUnavailable) within ``budget`` s.
    async def activity(self, database: str, *, budget: float) -> Obj:
        """The server's connections: ``{"max_connections", "reserved", "groups": [{"here", "backend_type",
        "state", "application", "n", "oldest_seconds"}]}`` (``here``: in this database; opsbot's own
        connection is left out of the groups)."""
        ...

    async def long_queries(self, database: str, *, over_seconds: int, limit: int, budget: float) -> list[Obj]:
        """Non-idle client sessions of this database, longest running first, opsbot's own left out."""
        ...

    async def session(self, database: str, pid: int, *, budget: float) -> Obj | None:
        """One backend by pid (any database, any type: the caller decides what may be signalled)."""
        ...

    # `actions:` of kind sql and flag (bot/action_config.py). ``query``/``statement`` are the config's
    # templates ({name} placeholders, {{ }} for braces); ``values`` are bound, never put in the text.
    async def action_rows(self, database: str, query: str, values: Obj, *, max_rows: int, timeout: float) -> list[Obj]:
        """A plan query, in a READ ONLY transaction under a statement timeout: at most ``max_rows`` rows."""
        ...

    async def run_statement(self, database: str, statement: str, values: Obj, *, rows: tuple[int, int], timeout: float,
                            then: Callable[[list[Obj]], Awaitable[None]] | None = None) -> tuple[int, list[Obj]]:
        """One statement in a transaction under a statement timeout. When the number of rows it touched is
        outside ``rows`` (min, max) it is rolled back (ExecutionError saying so); else ``then(returned rows)``
        runs before the commit (raises → rolled back). Returns (row count, RETURNING rows). OutcomeUnknown
        when the COMMIT was sent and no answer came back."""
        ...

    async def read_flag(self, database: str, table: tuple[str | None, str], key_column: str, value_column: str,
                        key: str) -> tuple[bool, Any]:
        """(row found, its value) of a flag row; ``table`` is (schema or None, table)."""
        ...

    async def write_flag(self, database: str, table: tuple[str | None, str], key_column: str, value_column: str, key: str,
                         *, value: Any, expect: Any) -> bool:
        """Set the flag to ``value`` only if it still is ``expect`` (compare-and-set); False: it changed."""
        ...

    async def signal_session(self, database: str, pid: int, *, terminate: bool, still: Callable[[Obj | None], None],
                             budget: float) -> Obj:
        """On one connection, in one transaction: read the backend afresh, ``still(row)`` (raises to
        refuse: the session changed), then ``pg_cancel_backend``/``pg_terminate_backend``. Returns
        ``{"sent": bool, "ended": bool}`` (``ended``: the query/session was gone shortly after);
        raises OutcomeUnknown when the signal went out and no answer came back."""
        ...


class RedisTargets(Protocol):
    """The platforms' Redis instances of ``config.redis`` (by name), read-only. Each call answers
    (or raises BackendUnavailable naming the target) within ``budget`` s."""

    async def info(self, target: str, *, budget: float) -> Obj:
        """``INFO`` as a dict (sections flattened, as redis-py parses it)."""
        ...

    async def key_length(self, target: str, key: str, *, budget: float) -> tuple[str, int | None]:
        """(TYPE, length by type: LLEN/ZCARD/XLEN/SCARD/HLEN/STRLEN); ("none", None) when the key does not exist,
        (type, None) for a type that has no length."""
        ...

    # Flags kept in a Redis key (`actions:` of kind flag with `redis:`): the only writes to these targets.
    async def get_value(self, target: str, key: str, *, budget: float) -> str | None:
        """The string value of ``key`` (None: not set)."""
        ...

    async def set_value_if(self, target: str, key: str, *, value: str | None, expect: str | None, budget: float) -> bool:
        """Atomically (one Lua script): set ``key`` to ``value`` (None: delete it) only if it still is
        ``expect`` (None: not set). False: it changed. OutcomeUnknown when no answer came back."""
        ...


@dataclass(frozen=True)
class ProbeResponse:
    """What one HTTP GET of a health probe gave: a status and (a bounded start of) the body, or
    an error (``status`` None) saying why there is no answer."""

    status: int | None
    seconds: float
    content_type: str = ""
    body: str = ""
    truncated: bool = False  # the body was longer than asked for
    error: str = ""


class HttpProbes(Protocol):
    async def get(self, url: str, *, timeout: float, max_bytes: int) -> ProbeResponse:
        """GET ``url`` (from the config, never from a person), no redirects followed, within
        ``timeout`` s in all; never raises for network trouble (``ProbeResponse.error``)."""
        ...

    async def send(self, method: str, url: str, *, headers: dict[str, str], body: bytes | None, timeout: float,
                   max_bytes: int) -> ProbeResponse:
        """An http action's one request (no redirects, no retries, no proxy, no cookies). Raises
        BackendUnavailable when it could not be sent (connection refused, DNS), OutcomeUnknown when it was
        sent and no answer came within ``timeout`` (the server may have acted)."""
        ...


class Queues(Protocol):
    async def job_state(self, queue: Queue, job_id: str) -> str | None: ...

    async def add_job(self, queue: Queue, *, name: str, data: Obj, job_id: str, replace_finished: bool,
                      opts: Obj | None = None) -> str:
        """Add a job with this id; a finished job with the same id is removed first when
        ``replace_finished``. ``opts``: BullMQ job options replacing the default attempts/backoff
        (``{"attempts": 1}``). Returns the job's state after the call."""
        ...

    # What bull-board shows and does, for `/ops queue …` (commands/queues/). A job is described as
    # a plain dict: {"id", "name", "attemptsMade", "failedReason", "timestamp", "processedOn",
    # "finishedOn"} (times in ms since the epoch, None when not set).

    async def job_counts(self, queue: Queue) -> dict[str, int]:
        """How many jobs are in each state: waiting, paused, prioritized, active, delayed, failed,
        completed, waiting-children (``paused``: jobs an older BullMQ moved aside when pausing)."""
        ...

    async def is_paused(self, queue: Queue) -> bool: ...

    async def set_paused(self, queue: Queue, paused: bool) -> None:
        """Pause (workers take no new job; the running ones finish) or resume the queue."""
        ...

    async def oldest_waiting(self, queue: Queue) -> Obj | None:
        """The job that has waited longest (the next one a worker takes), or None."""
        ...

    async def jobs(self, queue: Queue, state: str, *, count: int, oldest_first: bool) -> list[Obj]:
        """Up to ``count`` jobs in ``state`` (``failed``/``completed``: by finishing time)."""
        ...

    async def job(self, queue: Queue, job_id: str) -> Obj | None: ...

    async def retry_job(self, queue: Queue, job_id: str) -> str:
        """Move a failed job back to waiting, as bull-board's Retry does. Returns ``retried``, or
        the job's state when it was not failed (``missing`` when there is no such job)."""
        ...

    async def count_finished(self, queue: Queue, state: str, *, finished_before_ms: int) -> int:
        """How many ``completed``/``failed`` jobs finished at or before that time."""
        ...

    async def clean(self, queue: Queue, state: str, *, finished_before_ms: int, limit: int) -> list[str]:
        """Remove up to ``limit`` ``completed``/``failed`` jobs that finished at or before that
        time, oldest first. Returns the removed jobs' ids."""
        ...


@dataclass(frozen=True)
class Context:
    """What a command's plan() and execute() get."""

    config: Config
    kube: Kube
    databases: PlatformDatabases
    queues: Queues
    redis: RedisTargets
    http: HttpProbes
    # Set by the worker for execute(): the request being run (an http action's Idempotency-Key, `{request_id}`).
    request_id: str = ""
    requester: str = ""
    reason: str = ""


class Chat(Protocol):
    """What the request lifecycle says to people. The Slack edge renders it as Block Kit."""

    async def respond(self, *, response_url: str, channel_id: str, user_id: str, text: str, public: bool = False) -> None: ...

    async def post_card(self, request: OpsRequest) -> tuple[str, str]: ...

    async def update_card(self, request: OpsRequest) -> None: ...

    async def post_in_thread(self, request: OpsRequest, text: str) -> None: ...

    async def post_ephemeral(self, *, channel_id: str, user_id: str, text: str) -> None: ...

    # The audit channel (bot/audit.py's outbox poster).
    async def post_message(self, *, channel_id: str, text: str, thread_ts: str | None = None, undo: str | None = None) -> str:
        """``undo``: a request id whose Undo button goes with the message (a succeeded request's "Done")."""
        ...

    async def update_message(self, *, channel_id: str, ts: str, text: str) -> None: ...

    async def permalink(self, *, channel_id: str, ts: str) -> str | None: ...

    async def open_view(self, *, trigger_id: str, view: dict[str, Any]) -> None:
        """A modal (views.open) for the click whose ``trigger_id`` this is (valid for 3 s)."""
        ...

    async def find_message(self, *, channel_id: str, needle: str, thread_ts: str | None = None) -> str | None:
        """The ts of a recent message containing ``needle`` (to avoid posting twice after a timeout)."""
        ...

    # The incident timeline and the Home tab (issue 14).
    async def upload_file(self, *, channel_id: str, thread_ts: str, filename: str, title: str, content: str) -> None: ...

    async def open_dm(self, *, user_id: str) -> str:
        """The conversation id of ``user_id``'s direct message with opsbot (to post and share files there)."""
        ...

    async def publish_home(self, *, user_id: str, view: dict[str, Any]) -> str:
        """Publish ``view`` as ``user_id``'s Home tab; returns Slack's view id."""
        ...

    async def channel_members(self, channel_id: str, *, limit: int) -> set[str]:
        """Up to ``limit`` member ids of ``channel_id``."""
        ...


class Directory(Protocol):
    """Slack user-group membership (for roles granted through user groups)."""

    async def groups_of(self, user_id: str) -> frozenset[str]: ...

    async def members_of(self, groups: frozenset[str]) -> frozenset[str]:
        """Everyone in any of these (configured) groups; BackendUnavailable when it cannot be known."""
        ...

    def problems(self) -> dict[str, str]:
        """Configured groups that grant nothing because the configuration is wrong (group → Slack's
        error, e.g. ``no_such_subteam``), as of the last ``groups_of``."""
        ...


class NoDirectory:
    """For a policy that names no user groups: nobody is in any, and nothing is asked."""

    async def groups_of(self, user_id: str) -> frozenset[str]:
        return frozenset()

    async def members_of(self, groups: frozenset[str]) -> frozenset[str]:
        return frozenset()

    def problems(self) -> dict[str, str]:
        return {}


async def tell(message: Awaitable[object]) -> None:
    """Say something whose failure must not undo what already happened (a card update, a thread
    reply after a state change): the state is in PostgreSQL and the audit outbox; Slack catches up."""
    try:
        await message
    except OpsbotError as exc:
        logging.getLogger("bot.chat").warning("could not tell Slack: %s", exc)
