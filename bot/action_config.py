"""`actions:` — a platform team's own runbook actions, written as configuration, no Python.

Each action is a command of one *kind* (``sql``, ``http``, ``flag``, ``queue``) with typed positional
parameters. opsbot parses, plans, asks the policy, collects approvals, re-checks and executes it exactly
like a built-in (commands/actions/). This module only describes and validates the YAML; see
policies/README.md "Your own actions" for one complete example of each kind.

Templates. Strings that reach a backend are templates: ``{name}`` is a parameter (or ``request_id``,
``requester``, ``reason``), ``{{``/``}}`` a literal brace. How a value is put in depends on where:

- SQL (``statement``, ``plan.query``): always a bound parameter, never text in the statement;
- URL: percent-encoded as one path segment (``/`` and ``%`` included), after the parameter's own check
  refused ``..``, ``/`` and control characters;
- JSON (``body``, queue ``data``): a string that is exactly one placeholder takes the typed value (an
  ``int`` parameter stays a number); any other string is text with the values put in;
- a Redis key or flag key, a job id or name: text with the values put in.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from bot.config import Config

ACTION_NAME = re.compile(r"^[a-z][a-z0-9-]{1,39}$")
PARAM_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
WORD = re.compile(r"^[a-z][a-z0-9_-]{0,29}$")
# Template variables every action has, known only when it runs (not in a plan query or a flag's key):
# the request's id, the requester's Slack user id, and the --reason.
BUILTIN_VARS = ("request_id", "requester", "reason")
RUN_ONLY_VARS = BUILTIN_VARS
ROW_PREFIX = "row."  # `enqueue:` of a sql action: a column of the row the statement RETURNed
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
MAX_TIMEOUT = 60  # seconds, for a statement or an HTTP call
HTTP_METHODS = ("POST", "PUT", "PATCH", "DELETE")
# The first words of the built-in commands and meta commands: an action may not start with one, so
# that what people type for a built-in can never reach an action (checked against the registry in a test).
RESERVED_WORDS = ("help", "status", "history", "pods", "events", "logs", "scale", "rollback", "restart", "hpa", "backup",
                  "replay", "disable", "enable", "queue", "db", "redis", "health", "pending", "cancel", "audit", "undo",
                  "timeline")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _duration(value: Any) -> Any:
    from bot.config import parse_duration

    return parse_duration(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else value


Seconds = Annotated[int, BeforeValidator(_duration)]


# ---------------------------------------------------------------------------------------------- templates


def _yaml_words(value: Any) -> Any:
    """YAML 1.1 reads unquoted ``on``/``off`` (and yes/no/true/false) as booleans; as words (a flag's
    values, an enum's values) they are meant as ``on``/``off``."""
    def word(w: Any) -> Any:
        return ("on" if w else "off") if isinstance(w, bool) else w

    if isinstance(value, dict):
        return {word(k): v for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [word(v) for v in value]
    return value


class TemplateError(ValueError):
    pass


def template_parts(template: str) -> Iterator[tuple[str, str | None]]:
    """``"a/{id}/b"`` → ("a/", None), ("", "id"), ("/b", None): literal text and placeholder names."""
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        if m.start() > pos:
            yield template[pos:m.start()], None
        token = m.group(0)
        if token in ("{{", "}}"):
            yield token[0], None
        elif token in ("{", "}"):
            raise TemplateError(f"{template!r} has a lone {token!r}; write {token * 2!r} for a literal brace")
        else:
            yield "", m.group(1).strip()
        pos = m.end()
    if pos < len(template):
        yield template[pos:], None


def placeholders(template: str) -> list[str]:
    return [name for _, name in template_parts(template) if name is not None]


def whole_placeholder(template: str) -> str | None:
    """The name when ``template`` is exactly one placeholder (``"{amount}"``), else None."""
    parts = list(template_parts(template))
    return parts[0][1] if len(parts) == 1 and parts[0][1] is not None else None


def render_text(template: str, values: Mapping[str, Any], encode: Any = str) -> str:
    return "".join(text if name is None else encode(values[name]) for text, name in template_parts(template))


def render_json(template: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(template, dict):
        return {k: render_json(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [render_json(v, values) for v in template]
    if isinstance(template, str):
        whole = whole_placeholder(template)
        if whole is not None:
            value = values[whole]
            return value if isinstance(value, (int, float, bool, str)) or value is None else str(value)
        return render_text(template, values)
    return template


def json_strings(template: Any) -> Iterator[str]:
    if isinstance(template, dict):
        for v in template.values():
            yield from json_strings(v)
    elif isinstance(template, list):
        for v in template:
            yield from json_strings(v)
    elif isinstance(template, str):
        yield template


# ---------------------------------------------------------------------------------------------- parameters


class Param(_Model):
    """One positional parameter. Every value is checked before anything is read or planned."""

    type: Literal["int", "uuid", "enum", "string"]
    values: Annotated[tuple[str, ...], BeforeValidator(_yaml_words)] = ()  # enum: the accepted words
    pattern: str | None = None  # string: the whole value must match (required for strings)
    max_length: int = Field(100, ge=1, le=500)  # string
    min: int | None = None  # int
    max: int | None = None  # int
    default: str | None = None  # makes the parameter (and every one after it) optional
    description: str = ""

    @field_validator("values")
    @classmethod
    def _values(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for word in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}", word):
                raise ValueError(f"enum value {word!r} must be ASCII letters, digits and _ . : - (at most 63)")
        if len(set(v)) != len(v):
            raise ValueError("enum values appear more than once")
        return v

    @model_validator(mode="after")
    def _fits_type(self) -> Param:
        if self.type == "enum" and not self.values:
            raise ValueError("an enum parameter needs `values: [...]`")
        if self.type != "enum" and self.values:
            raise ValueError("`values` is for enum parameters")
        if self.type == "string":
            if not self.pattern:
                raise ValueError("a string parameter needs a `pattern` (a regular expression the whole value must match), "
                                 "e.g. '[A-Za-z0-9_-]{1,64}'")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {exc}") from None
        elif self.pattern:
            raise ValueError("`pattern` is for string parameters")
        if self.type != "int" and (self.min is not None or self.max is not None):
            raise ValueError("`min`/`max` are for int parameters")
        if self.min is not None and self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self

    def describe(self) -> str:
        if self.type == "enum":
            return "|".join(self.values)
        if self.type == "int":
            lo, hi = self.min, self.max
            return "a whole number" + (f" {lo}–{hi}" if lo is not None and hi is not None else
                                       f" ≥ {lo}" if lo is not None else f" ≤ {hi}" if hi is not None else "")
        if self.type == "uuid":
            return "a UUID"
        return f"text matching `{self.pattern}`"


def canonical_uuid(value: str) -> str | None:
    """``8F2C…`` or ``8f2c…`` with or without hyphens, ASCII only → the lowercase hyphenated form."""
    if not value.isascii() or not re.fullmatch(r"[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}",
                                                value):
        return None
    return str(uuid.UUID(value))


# ---------------------------------------------------------------------------------------------- the kinds


class PlanQuery(_Model):
    """A read-only query whose rows the card shows and the stale check compares (run in a READ ONLY
    transaction: it cannot write)."""

    database: str | None = None  # default: the action's database
    query: str
    max_rows: int = Field(20, ge=1, le=100)
    require_rows: bool = True  # no row: the request is refused ("nothing matches"), nothing is asked


class RowCount(_Model):
    min: int = Field(0, ge=0)
    max: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> RowCount:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class Backoff(_Model):
    type: Literal["fixed", "exponential"] = "exponential"
    delay: Seconds = 5


class QueueJob(_Model):
    """A BullMQ job, added the way Node BullMQ's ``Queue.add`` adds it (Node workers read it)."""

    queue: str  # a key of `queues:`
    name: str  # template
    data: dict[str, Any] = {}  # JSON template
    job_id: str = "opsbot-{request_id}"  # template; one job per id: BullMQ ignores a second add
    attempts: int = Field(1, ge=1, le=50)
    backoff: Backoff | None = None


class _Action(_Model):
    summary: str = Field(min_length=1, max_length=200)
    words: str | None = None  # what is typed, e.g. "retry payout"; default: the action's name
    params: dict[str, Param] = {}
    environment: str | None = None

    @field_validator("params")
    @classmethod
    def _param_names(cls, v: dict[str, Param]) -> dict[str, Param]:
        seen_default = False
        for name, p in v.items():
            if not PARAM_NAME.match(name):
                raise ValueError(f"parameter name {name!r}: lowercase letters, digits and _ (at most 40)")
            if name in BUILTIN_VARS or name == "value":
                raise ValueError(f"parameter name {name!r} is reserved")
            if p.default is None and seen_default:
                raise ValueError(f"parameter {name!r} follows one with a default, so it needs a default too")
            seen_default = seen_default or p.default is not None
        return v

    @field_validator("words")
    @classmethod
    def _words(cls, v: str | None) -> str | None:
        if v is None:
            return v
        words = v.split()
        if not 1 <= len(words) <= 3 or not all(WORD.match(w) for w in words):
            raise ValueError(f"{v!r}: one to three lowercase words (letters, digits, - and _)")
        return " ".join(words)


class SqlAction(_Action):
    kind: Literal["sql"]
    database: str  # a key of `databases:`
    statement: str  # one statement; parameters are bound
    plan: PlanQuery | None = None
    expect_rows: int | RowCount = 1  # anything else rolls the transaction back
    timeout: Seconds = Field(5, ge=1, le=MAX_TIMEOUT)  # statement_timeout
    # A job added inside the transaction, before the commit (if Redis refuses, nothing is written):
    # its templates may also name `{row.<column>}` of the row the statement RETURNs.
    enqueue: QueueJob | None = None


class HttpAction(_Action):
    kind: Literal["http"]
    environment: str
    method: Literal["POST", "PUT", "PATCH", "DELETE"]
    url: str  # template; parameters go in as one percent-encoded path segment each
    headers: dict[str, str] = {}  # values usually ${SECRET}s: never shown, never audited
    body: dict[str, Any] | list[Any] | None = None  # JSON template
    expect: tuple[int, ...] = (200, 201, 202, 204)
    timeout: Seconds = Field(10, ge=1, le=MAX_TIMEOUT)
    idempotency_header: str = "Idempotency-Key"  # its value is derived from the request id
    plan: PlanQuery | None = None  # needs `database:` (an http action has none of its own)

    @field_validator("expect")
    @classmethod
    def _statuses(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(not 100 <= s <= 599 for s in v):
            raise ValueError("expect: HTTP status codes between 100 and 599")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", name):
                raise ValueError(f"header name {name!r}: letters, digits and -")
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"header {name}: the value holds a line break or NUL")
        return v


class FlagAction(_Action):
    """A flag in a database row (``table`` / ``key_column`` / ``value_column``) or a Redis key
    (``redis:``). The last argument is the new value, one of ``values``' words."""

    kind: Literal["flag"]
    database: str | None = None
    schema_: str | None = Field(None, alias="schema")
    table: str | None = None
    key_column: str = "key"
    value_column: str = "value"
    redis: str | None = None  # a key of `redis:`
    key: str  # template: the row's key or the Redis key
    # word → stored value, e.g. {on: true, off: false}
    values: Annotated[dict[str, Any], BeforeValidator(_yaml_words)] = Field(min_length=2)
    revert_after: Seconds | None = Field(None, ge=60, le=7 * 86400)  # put the old value back after this long

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("values")
    @classmethod
    def _flag_values(cls, v: dict[str, Any]) -> dict[str, Any]:
        for word, stored in v.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,30}", str(word)):
                raise ValueError(f"value word {word!r}: lowercase letters, digits and _ . - (at most 31)")
            if not isinstance(stored, (bool, int, str)) or isinstance(stored, float):
                raise ValueError(f"values.{word}: a boolean, a whole number or a string")
        stored = [repr(s) for s in v.values()]
        if len(set(stored)) != len(stored):
            raise ValueError("two words store the same value")
        return v

    @model_validator(mode="after")
    def _one_store(self) -> FlagAction:
        from bot.config import _ident

        if (self.database is None) == (self.redis is None):
            raise ValueError("give either `database:` (with `table:`) or `redis:`, not both or neither")
        if self.database is not None:
            if not self.table:
                raise ValueError("a database flag needs `table:` (and `key_column`, `value_column`)")
            for ident in (self.schema_, self.table, self.key_column, self.value_column):
                if ident is not None:
                    _ident(ident)
        elif self.schema_ or self.table:
            raise ValueError("`schema`/`table` are for database flags")
        if self.redis is not None and any(not isinstance(s, str) for s in self.values.values()):
            raise ValueError("a Redis flag stores strings: quote the values (on: \"1\")")
        return self


class QueueAction(_Action):
    kind: Literal["queue"]
    job: QueueJob


Action = Annotated[SqlAction | HttpAction | FlagAction | QueueAction, Field(discriminator="kind")]


# ---------------------------------------------------------------------------------------------- checks


def action_words(name: str, action: SqlAction | HttpAction | FlagAction | QueueAction) -> tuple[str, ...]:
    return tuple((action.words or name.replace("-", " ")).split())


def action_environment(config: Config, action: SqlAction | HttpAction | FlagAction | QueueAction) -> str:
    """Where the action acts: its `environment:`, else its database's, Redis target's or queue's."""
    if action.environment:
        return action.environment
    if isinstance(action, SqlAction):
        return config.databases[action.database].environment
    if isinstance(action, FlagAction):
        return (config.databases[action.database].environment if action.database
                else config.redis[str(action.redis)].environment)
    if isinstance(action, QueueAction):
        return config.queues[action.job.queue].environment
    return str(action.environment)


_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def statements_problem(text: str) -> str | None:
    """Why ``text`` is not exactly one SQL statement, or None. A ``;`` outside quotes, dollar quotes and
    comments starts another statement, which PostgreSQL's simple protocol (used by psycopg when no value
    is bound) would run too — after a plan query's READ ONLY, or past ``expect_rows``."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in ("'", '"'):
            end = text.find(c, i + 1)
            while end != -1 and end + 1 < n and text[end + 1] == c:  # '' and "" are escaped quotes
                end = text.find(c, end + 2)
            if end == -1:
                return f"a {c} quote is not closed"
            i = end + 1
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end == -1 else end + 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                return "a /* comment is not closed"
            i = end + 2
        elif c == "$" and (m := _DOLLAR_TAG.match(text, i)) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            end = text.find(m.group(0), m.end())
            if end == -1:
                return f"the dollar quote {m.group(0)} is not closed"
            i = end + len(m.group(0))
        elif c == ";":
            if text[i + 1:].strip():
                return "it holds more than one statement (a `;` before the end); write one statement per action"
            return None
        else:
            i += 1
    return None


def url_problem(url: str) -> str | None:
    """Why an http action's URL template cannot be used, or None (checked with the parameters' slots)."""
    # (No `${VAR}` is left here: in a URL one must have a default, and defaults are always filled in.)
    try:
        literal = "".join(text if name is None else "x" for text, name in template_parts(url))
    except TemplateError as exc:
        return str(exc)
    parts = urlsplit(literal)
    if parts.username is not None or parts.password is not None:
        return "the URL may not carry credentials (it is shown on the card); put them in `headers:`"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http:// or https:// URL with a host"
    head = url.split("://", 1)[1].split("/", 1)[0]
    if "{" in head.replace("{{", "").replace("}}", ""):
        return "parameters may not be in the host or port, only in the path and query"
    if parts.fragment:
        return "the URL has a #fragment, which is never sent"
    if not literal.isprintable() or any(c.isspace() for c in literal):
        return "the URL contains whitespace or control characters"
    return None


def check_actions(config: Config, known_commands: tuple[str, ...]) -> None:
    """Cross-references of `actions:` (raises ValueError with the key path). Called by Config."""
    taken: dict[tuple[str, ...], str] = {}
    for name, action in config.actions.items():
        where = f"actions.{name}"
        if not ACTION_NAME.match(name):
            raise ValueError(f"{where}: an action name is 2–40 lowercase letters, digits and -, starting with a letter")
        if name in known_commands:
            raise ValueError(f"{where}: {name!r} is the name of a built-in command; choose another")
        words = action_words(name, action)
        if words[0] in RESERVED_WORDS:
            raise ValueError(f"{where}: what is typed starts with {words[0]!r}, a built-in command's word; "
                             f"set `words:` to something else (e.g. {' '.join(('platform', *words[1:]))!r})")
        for other_words, other in taken.items():
            short = min(len(words), len(other_words))
            if words[:short] == other_words[:short]:
                raise ValueError(f"{where}: `{' '.join(words)}` and actions.{other} (`{' '.join(other_words)}`) "
                                 "start with the same words; opsbot could not tell them apart")
        taken[words] = name
        if action.environment is not None and action.environment not in config.environments:
            raise ValueError(f"{where}.environment: {action.environment!r} is not defined under environments")
        variables = {*action.params, *BUILTIN_VARS}
        if isinstance(action, FlagAction):
            variables.add("value")

        def refs(field: str, templates: list[str], allowed: set[str], *, where: str = where) -> None:
            _refs(f"{where}.{field}", templates, allowed)

        plan_vars = variables - set(RUN_ONLY_VARS)
        plan = getattr(action, "plan", None)
        for field, text in (("statement", getattr(action, "statement", None)), ("plan.query", plan.query if plan else None)):
            problem = statements_problem(text) if text else None
            if problem:
                raise ValueError(f"{where}.{field}: {problem}")
        if isinstance(action, SqlAction):
            _database(config, f"{where}.database", action.database)
            refs("statement", [action.statement], variables)
            if isinstance(action.expect_rows, int) and action.expect_rows < 0:
                raise ValueError(f"{where}.expect_rows: a row count is 0 or more")
            if action.enqueue is not None:
                returned = {n for n in _all_names(action.enqueue) if n.startswith(ROW_PREFIX)}
                _queue(config, f"{where}.enqueue", action.enqueue, variables | returned)
                if returned and "returning" not in action.statement.lower():
                    raise ValueError(f"{where}.enqueue names {', '.join(sorted('{' + r + '}' for r in returned))} but the "
                                     "statement has no RETURNING clause")
        elif isinstance(action, HttpAction):
            problem = url_problem(action.url)
            if problem:
                raise ValueError(f"{where}.url: {problem}")
            refs("url", [action.url], variables)
            for n in placeholders(action.url):
                odd = [w for w in getattr(action.params.get(n), "values", ()) if ".." in w]
                if odd:  # such a word could never be typed: a URL value refuses `..` (commands/actions/http.py)
                    raise ValueError(f"{where}.params.{n}: {odd[0]!r} contains '..', which a value in the URL may not")
            refs("headers", list(action.headers.values()), variables)
            refs("body", list(json_strings(action.body)), variables)
            if action.idempotency_header.lower() in {h.lower() for h in action.headers}:
                raise ValueError(f"{where}.headers: {action.idempotency_header} is set by opsbot from the request id")
            if plan is not None and plan.database is None:
                raise ValueError(f"{where}.plan.database: an http action's plan query needs a database")
        elif isinstance(action, FlagAction):
            if action.database is not None:
                _database(config, f"{where}.database", action.database)
            elif action.redis not in config.redis:
                raise ValueError(f"{where}.redis: {action.redis!r} is not defined under redis")
            refs("key", [action.key], plan_vars - {"value", "reason", "requester"})
            if plan is not None:
                raise ValueError(f"{where}.plan: a flag's plan is its current value; it takes no plan query")
        elif isinstance(action, QueueAction):
            _queue(config, f"{where}.job", action.job, variables)
        if plan is not None:
            _database(config, f"{where}.plan.database", plan.database or getattr(action, "database", None) or "")
            refs("plan.query", [plan.query], plan_vars)


def _all_names(job: QueueJob) -> list[str]:
    out: list[str] = []
    for template in (job.name, job.job_id, *json_strings(job.data)):
        try:
            out += placeholders(template)
        except TemplateError:
            pass
    return out


_UNSET_ENV = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}")


def _refs(where: str, templates: list[str], allowed: set[str]) -> None:
    """Every placeholder of ``templates`` names one of ``allowed`` (ValueError at ``where`` if not).
    A ``${VAR}`` still there (`opsbot policy check` without the secrets) is not a placeholder."""
    for template in templates:
        template = _UNSET_ENV.sub("", template)
        try:
            names = placeholders(template)
        except TemplateError as exc:
            raise ValueError(f"{where}: {exc}") from None
        for n in names:
            if n not in allowed:
                raise ValueError(f"{where}: {{{n}}} is not a parameter (parameters: {', '.join(sorted(allowed)) or 'none'})")


def _database(config: Config, where: str, name: str) -> None:
    if name not in config.databases:
        raise ValueError(f"{where}: {name!r} is not defined under databases (defined: {', '.join(config.databases) or 'none'})")


def _queue(config: Config, where: str, job: QueueJob, variables: set[str]) -> None:
    if job.queue not in config.queues:
        raise ValueError(f"{where}.queue: {job.queue!r} is not defined under queues (defined: {', '.join(config.queues) or 'none'})")
    for field, templates in (("name", [job.name]), ("job_id", [job.job_id]), ("data", list(json_strings(job.data)))):
        _refs(f"{where}.{field}", templates, variables)
    if not job.job_id.strip() or ":" in job.job_id:
        raise ValueError(f"{where}.job_id: a BullMQ job id may not be empty or contain ':'")
