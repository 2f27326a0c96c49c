"""`kind: http` — one request to the platform's own admin API (seed 004's payout retry).

Parse: a value that goes into the URL is refused when it holds ``/``, ``\\``, ``..``, ``%``, ``?``,
``#``, or anything but printable ASCII, so that no value can reach another path than the one the
config names (``%2F`` is refused too: some servers decode it before routing). Each value is then
percent-encoded as one path segment (or query value) when it is put in.

Plan: what will be sent, shown on the card: method, URL with the values, header *names* (their values
are secrets from ``${ENV}``: never in the plan, so never in the card, the thread or the audit trail),
the JSON body, the expected statuses and the timeout. With a ``plan:`` query its rows are shown and are
the plan's ``before``: a change before running makes the request stale, nothing is sent.

Execute: the request is sent exactly once; opsbot never retries it. The ``Idempotency-Key`` header is
derived from the plan (``opsbot-`` + its fingerprint: the action's definition, the values, and the plan
query's rows), not from the request id: a person who requests the same thing again after a crash or an
unknown outcome, on a target that has not changed, sends the same key, so an API that honours it does not
act twice (pay twice). Once the target changed (the payout's attempt count moved), the key is new. A
status in ``expect`` is success; a 5xx is an unknown outcome (a gateway's 502/504 says nothing about
whether the API behind it acted); any other status fails and says so; no answer within the timeout is
an unknown outcome too (a human looks).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from bot.action_config import BUILTIN_VARS, HttpAction, placeholders, render_json, render_text, template_parts
from bot.config import Config
from bot.domain import Outcome, Plan
from bot.errors import ExecutionError, OutcomeUnknown, Refused, UsageError
from bot.ports import Context, ProbeResponse
from bot.redaction import scrub_text
from commands.actions.base import ActionCommand, shown_value
from commands.actions.sql import looked_at
from commands.base import Params
from commands.shown import one_line

MAX_URL = 2048  # characters of the rendered URL
MAX_BODY = 64 * 1024  # bytes of the rendered JSON body
MAX_RESPONSE = 16 * 1024  # bytes of the answer read (the thread shows an excerpt)
EXCERPT = 300  # characters of the answer shown in the thread and kept in the audit trail
BODY_SHOWN = 1500  # characters of the JSON body on the card
NOT_IN_URL = ("/", "\\", "..", "%", "?", "#")
HIDDEN = "(not shown)"


def idempotency_key(fingerprint: str) -> str:
    """The same for the same plan: same action definition, values and plan rows (see the module docstring)."""
    return f"opsbot-{fingerprint[:32]}"


def url_value_problem(value: str) -> str | None:
    """Why ``value`` may not go into a URL, or None."""
    if not value.isascii() or not value.isprintable():
        odd = next(c for c in value if not (c.isascii() and c.isprintable()))
        return f"holds {ascii(odd)[1:-1]} (not printable ASCII)"
    if not value:
        return "is empty, which would leave an empty path segment (`//`)"
    if value in (".", ".."):
        return f"is `{value}`, which names another path"
    for bad in NOT_IN_URL:
        if bad in value:
            return f"holds `{bad}`"
    return None


def segment(value: Any) -> str:
    """One value as one percent-encoded path segment or query value. A run-time value (``reason``) is
    not checked like a parameter, so a value of only dots is encoded too: ``..`` would climb a level."""
    text = quote(str(value), safe="")
    return text.replace(".", "%2E") if text and set(text) == {"."} else text


def header_secrets(action: HttpAction) -> list[str]:
    """Every literal part of the action's header values, and the credential after a scheme word
    (``Bearer <token>``), which an API may echo alone; longest first, as scrubbing wants."""
    out: set[str] = set()
    for template in action.headers.values():
        literals, run = [], ""
        for text, name in template_parts(template):  # ("{{" comes as its own part: join the runs of text)
            if name is None:
                run += text
            else:
                literals.append(run)
                run = ""
        for text in [*literals, run]:
            if text.strip():
                out.add(text.strip())
                words = text.split()
                if len(words) > 1:
                    out.add(words[-1])
    return sorted((s for s in out if len(s) >= 4), key=len, reverse=True)


def secret_header_values(config: Config) -> list[str]:
    """What bot/runtime.py scrubs from the audit trail and chat, with the bot's own secrets."""
    return [s for action in config.actions.values() if isinstance(action, HttpAction) for s in header_secrets(action)]


class HttpCommand(ActionCommand):
    backend = "the platform's admin API"

    # ------------------------------------------------------------------ parse

    def check_params(self, params: Params) -> None:
        spec: HttpAction = self.spec
        for name in dict.fromkeys(placeholders(spec.url)):
            if name not in params:
                continue  # request_id, requester, reason: known only when it runs
            value = str(params[name])
            problem = url_value_problem(value)
            if problem:
                raise UsageError(f"`{name}`: `{shown_value(value)}` {problem}; it goes into the URL, so it may not hold "
                                 "`/`, `\\`, `..`, `%`, `?` or `#`, and only printable ASCII is accepted. "
                                 f"Type the {name} itself ({self.spec.params[name].describe()}).", usage=self.usage)

    # ------------------------------------------------------------------ render

    def render_url(self, values: dict[str, Any], *, running: bool) -> str:
        """The URL with each value percent-encoded; in a plan, ``<request id>`` and the like stay as they are
        (they are placeholders to read, not values)."""
        parts: list[str] = []
        for text, name in template_parts(self.spec.url):
            if name is None:
                parts.append(text)
            elif name in BUILTIN_VARS and not running:
                parts.append(str(values[name]))
            else:
                parts.append(segment(values[name]))
        return "".join(parts)

    def render_body(self, values: dict[str, Any]) -> bytes | None:
        if self.spec.body is None:
            return None
        return json.dumps(render_json(self.spec.body, values), ensure_ascii=False, separators=(",", ":")).encode()

    def too_big(self, url: str, body: bytes | None) -> str | None:
        if len(url) > MAX_URL:
            return f"the URL would be {len(url):,} characters long; opsbot sends at most {MAX_URL:,}"
        if body is not None and len(body) > MAX_BODY:
            return f"the JSON body would be {len(body):,} bytes; opsbot sends at most {MAX_BODY:,}"
        return None

    # ------------------------------------------------------------------ plan

    async def plan(self, params: Params, ctx: Context) -> Plan:
        spec: HttpAction = self.spec
        values = self.variables(params, None, running=False)
        url = self.render_url(values, running=False)
        body = self.render_body(values)
        problem = self.too_big(url, body)
        if problem:
            raise Refused(f"{problem}. Nothing was asked or sent; check the values.")
        details = [f"sends `{spec.method} {url}`", "headers: " + ", ".join(self.header_lines())]
        if body is not None:
            details.append(f"JSON body: `{_shown(body.decode())}`")
        details.append(f"expects status {_statuses(spec.expect)} within {spec.timeout} s; sent once, never retried by "
                       f"opsbot; the {spec.idempotency_header} is the same for the same request on an unchanged target, so "
                       "an API that honours it does not act twice")
        before: dict[str, Any] = {}
        if spec.plan is not None:
            rows, lines = await looked_at(ctx, spec.plan.database or "", spec.plan, params, self.label(params))
            details += lines
            before["rows"] = rows
        # Header names only: the values are secrets and a plan is stored in the audit trail.
        after: dict[str, Any] = {"method": spec.method, "url": url, "headers": [*spec.headers, spec.idempotency_header],
                                 "body": None if body is None else json.loads(body), "expect": list(spec.expect),
                                 "timeout": spec.timeout}
        return self.skeleton(params, ctx.config, summary=f"{self.label(params)}: {spec.summary}", details=tuple(details),
                             before=before, after=after)

    def header_lines(self) -> Iterator[str]:
        spec: HttpAction = self.spec
        for name in spec.headers:
            yield f"{name} {HIDDEN}"
        yield f"{spec.idempotency_header}: opsbot-<derived from this plan>"
        if spec.body is not None and not _has_header(spec, "Content-Type"):
            yield "Content-Type: application/json"

    # ------------------------------------------------------------------ execute

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        spec: HttpAction = self.spec
        values = self.variables(plan.params, ctx, running=True)
        url = self.render_url(values, running=True)
        body = self.render_body(values)
        problem = self.too_big(url, body)
        if problem:
            raise ExecutionError(f"{problem}; nothing was sent.")
        headers = {name: render_text(template, values) for name, template in spec.headers.items()}
        headers[spec.idempotency_header] = idempotency_key(plan.fingerprint)
        if body is not None and not _has_header(spec, "Content-Type"):
            headers["Content-Type"] = "application/json"
        answer = await ctx.http.send(spec.method, url, headers=headers, body=body, timeout=spec.timeout, max_bytes=MAX_RESPONSE)
        return self.outcome(answer)

    def outcome(self, answer: ProbeResponse) -> Outcome:
        spec: HttpAction = self.spec
        if answer.status is None:  # the adapter raises instead; kept so that no answer is never a success
            raise ExecutionError(f"the admin API gave no status ({answer.error or 'no answer'}).")
        # The answer is scrubbed of this action's own header values before it is cut: an API may echo them.
        excerpt = one_line(scrub_text(answer.body, tuple(header_secrets(spec))), EXCERPT) if answer.body.strip() else "(empty body)"
        said = f"the admin API answered {_status(answer.status)} to {spec.method}: `{excerpt}`"
        if answer.error:  # the status came, the rest of the body did not
            said += f" ({answer.error})"
        if answer.status not in spec.expect and answer.status >= 500:
            raise OutcomeUnknown(f"{said}, not {_statuses(spec.expect)}. A 5xx does not say whether the API (or the one "
                                 "behind its gateway) acted before failing: check the target before requesting again (the "
                                 f"same request on an unchanged target sends the same {spec.idempotency_header}).")
        if answer.status not in spec.expect:
            why = " It refused the request as a conflict with the target's current state (409)." if answer.status == 409 else ""
            raise ExecutionError(f"{said}, not {_statuses(spec.expect)}.{why} opsbot changed nothing beyond that one call "
                                 "and does not retry it; check the target before requesting again.")
        return Outcome(ok=True, message=f"{said}.",
                       details={"status": answer.status, "response": excerpt, "seconds": round(answer.seconds, 3)})


def _shown(text: str) -> str:
    """The body on the card: bounded, and with no backtick to end the code span (``code`` does the same)."""
    text = text.replace("`", "ˋ")
    return text if len(text) <= BODY_SHOWN else text[:BODY_SHOWN - 1] + "…"


def _status(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _has_header(spec: HttpAction, name: str) -> bool:
    return name.lower() in {h.lower() for h in spec.headers}


def _statuses(expect: tuple[int, ...]) -> str:
    shown = [str(s) for s in expect]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]
