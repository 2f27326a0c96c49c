"""Every error opsbot raises, in two families.

*What the user did wrong* (``UserError``): shown to the user as-is, with what to type instead; the
request never starts. *What the world did wrong* (``ExecutionError`` and ``BackendUnavailable``):
a backend failed or refused. Adapters wrap vendor exceptions (``ApiException``,
``psycopg.OperationalError``, ``redis.ConnectionError``) into these so nothing vendor-specific ever
reaches the Slack edge.
"""

from __future__ import annotations


class OpsbotError(Exception):
    """Base class; ``str(err)`` is a message fit for a human in chat."""


class UserError(OpsbotError):
    """The request cannot go on because of what was typed or who typed it."""


class UsageError(UserError):
    def __init__(self, message: str, *, usage: str | None = None) -> None:
        super().__init__(message)
        self.usage = usage

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\nUsage: `{self.usage}`" if self.usage else base


class NotFound(UserError):
    """The target named does not exist (unknown alias, deployment, provider, webhook)."""


class Refused(UserError):
    """The target exists but the action does not make sense now (already disabled, not replayable, out of range)."""


class PolicyDenied(UserError):
    def __init__(self, message: str, *, rule: str | None = None) -> None:
        super().__init__(message)
        self.rule = rule


class ConfigError(OpsbotError):
    """The configuration file is invalid; the message names the file, the key and the problem."""


class MigrationsPending(OpsbotError):
    """opsbot's database lacks migrations and the role opsbot runs as may not apply them (the
    least-privilege app role never may): the owner has to run `opsbot migrate`."""


class BackendUnavailable(OpsbotError):
    """A backend (database, Redis, cluster) cannot be reached. opsbot fails closed on this."""

    def __init__(self, backend: str, detail: str) -> None:
        super().__init__(f"{backend} is unavailable: {detail}")
        self.backend = backend
        self.detail = detail


class Busy(BackendUnavailable):
    """The backend is up, but every connection opsbot may open to it stayed in use for the whole
    bounded wait (a burst beyond what the pool was sized for). Not an outage, and not said to be one;
    it still fails closed."""

    def __init__(self, backend: str, detail: str) -> None:
        OpsbotError.__init__(self, f"opsbot is busy: {detail}")
        self.backend = backend
        self.detail = detail


class ExecutionError(OpsbotError):
    """The action was attempted and failed. ``temporary`` says whether trying again later may work."""

    def __init__(self, message: str, *, temporary: bool = False) -> None:
        super().__init__(message)
        self.temporary = temporary


class DeliveryUncertain(ExecutionError):
    """A message may or may not have reached Slack (a timeout after sending): look before re-posting."""

    def __init__(self, message: str) -> None:
        super().__init__(message, temporary=True)


class Conflict(ExecutionError):
    """The target changed between the read and the write (a Kubernetes 409, a row no longer matching)."""





class MalformedPayload(UserError):
    """A signed Slack payload whose fields are not what Slack sends (forged, or a client bug)."""


class RateLimited(ExecutionError):
    """Slack said "not now" (HTTP 429): nothing was done; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, temporary=True)
        self.retry_after = retry_after


class DuplicateDelivery(OpsbotError):
    """A slash command delivered again (a Slack retry, a redelivered envelope): its request is open already."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"already received as request {request_id}")
        self.request_id = request_id


class DuplicateUndo(UserError):
    """An undo of a request that has one open or done already (two fast clicks on Undo, two replicas)."""

    def __init__(self, original_id: str, undo_id: str) -> None:
        super().__init__(f"`{original_id}` is being undone already, by `{undo_id}`; nothing more was requested.")
        self.original_id, self.undo_id = original_id, undo_id


class CardNotPosted(ExecutionError):
    """The approval card could not be posted, so the request was ended (nobody could approve it)."""


class OutcomeUnknown(ExecutionError):
    """A write was sent but no clear answer came back (a 5xx, a reset connection, a timeout): it may
    or may not have been applied. Never retried automatically; a human looks at the target first."""

    def __init__(self, message: str) -> None:
        super().__init__(message, temporary=True)
