"""The incident timeline (issue 14): everything opsbot did or refused in a window of time and a
channel, read from the audit trail, as a Slack message and as a Markdown (or JSON) file that can be
pasted into a postmortem and still be checked against the trail.

Verifiable, entry by entry
--------------------------
Each entry is one audit row and carries the row itself: its hashed record, its ``prev_hash`` and
its ``hash`` (the shape of an `opsbot audit export` line). A row's hash is
``sha256(prev_hash || canonical_json(record))`` (bot/adapters/audit_log.py), so each entry is checked
on its own, without its neighbours: a timeline is a selection of rows (one channel), not a stretch
of the chain. Where two entries are consecutive rows, the second must also link to the first.

The Markdown file lists the entries for people and ends with the same entries, machine-readable, in
a fenced block (```` ```json opsbot-timeline ````). ``verify_text`` re-renders every listed line from
its row and compares: an edited line, or an edited row, names its seq. An entry removed entirely
(line and row) is not detected on its own: a timeline is a selection. Checked against the database
(`opsbot audit verify --file` with DATABASE_URL set), every (seq, hash) must be the trail's own.

Bounds: at most ``MAX_ENTRIES`` entries; past that the timeline stops at the last one it holds and
says how to get the rest (``--since`` from there). The message in the channel shows at most
``MESSAGE_LINES`` of them (Slack's message limits); the file always has every entry.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bot.adapters.audit_log import AuditLog, audit_hash, audit_record
from bot.domain import SYSTEM
from bot.messages import mrkdwn

MAX_ENTRIES = 500
MESSAGE_LINES = 40
DEFAULT_SINCE = "2h"
FORMAT = 1  # the machine-readable block's version
MAX_FILE_BYTES = 16 * 1024 * 1024  # a timeline of MAX_ENTRIES rows is far smaller; `verify --file` streams anything larger as an export
FENCE = "```json opsbot-timeline"
_CHANNEL_ID = re.compile(r"[CG][A-Z0-9]{2,20}")
_CHANNEL_MENTION = re.compile(r"<#([CG][A-Z0-9]{2,20})(?:\|[^>]{0,200})?>")
_LINE_SEQ = re.compile(r"^- `#(\d{1,18})` ")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#~])")


def channel_of(value: str) -> str | None:
    """A `--channel` value: a Slack channel mention (``<#C123|incident>``) or id; ``all`` is None
    (every channel: the CLI's default; refused in Slack, see bot/pipeline.py). ValueError says
    what to type instead."""
    text = value.strip()
    if text.lower() == "all":
        return None
    m = _CHANNEL_MENTION.fullmatch(text)
    if m:
        return m.group(1)
    if _CHANNEL_ID.fullmatch(text):
        return text
    shown = _flat(text, 40).replace("`", "'")
    raise ValueError(f"`--channel {shown}` is not a channel: type `#` and pick the channel from the list "
                     "(Slack sends it as a mention), or give its id (C0123ABCD)")


@dataclass(frozen=True, kw_only=True)
class Timeline:
    channel: str | None  # None: all channels
    since: datetime
    until: datetime
    generated_at: datetime
    entries: list[dict[str, Any]] = field(default_factory=list)  # export-shaped rows, oldest first
    truncated: bool = False

    @property
    def seqs(self) -> str:
        return f"{self.entries[0]['seq']}..{self.entries[-1]['seq']}" if self.entries else "none"

    def meta(self) -> dict[str, Any]:
        return {"opsbot_timeline": FORMAT, "channel": self.channel or "all", "since": _iso(self.since), "until": _iso(self.until),
                "generated_at": _iso(self.generated_at), "entries": len(self.entries), "truncated": self.truncated,
                "max_entries": MAX_ENTRIES}


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds")


def entry_of(row: dict[str, Any]) -> dict[str, Any]:
    """One timeline entry: the row's hashed record and both hashes (as `opsbot audit export` writes it)."""
    return {**audit_record(row), "prev_hash": row["prev_hash"], "hash": row["hash"]}


async def collect(log: AuditLog, *, channel: str | None, since: datetime, until: datetime, now: datetime,
                  limit: int | None = None) -> Timeline:
    limit = MAX_ENTRIES if limit is None else limit
    rows = await log.window(since=since, until=until, channel_id=channel, limit=limit + 1)
    return Timeline(channel=channel, since=since, until=until, generated_at=now, entries=[entry_of(r) for r in rows[:limit]],
                    truncated=len(rows) > limit)


# ------------------------------------------------------------------ what an entry says

def _flat(text: Any, limit: int) -> str:
    """One line of at most ``limit`` characters: control characters (newlines included) become spaces."""
    flat = _CONTROL.sub(" ", str(text if text is not None else "")).strip()
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def _md(text: Any, limit: int = 200) -> str:
    return _MD_SPECIAL.sub(r"\\\1", _flat(text, limit))


def _code(text: Any, limit: int = 80) -> str:
    return "`" + (_flat(text, limit).replace("`", "'") or " ") + "`"


def _who(e: dict[str, Any]) -> str:
    return "opsbot" if e.get("actor_id") == SYSTEM.user_id else str(e.get("actor_name") or e.get("actor_id") or "unknown")


def _what(e: dict[str, Any]) -> str:
    plan: dict[str, Any] = e["plan"] if isinstance(e.get("plan"), dict) else {}
    if plan.get("summary"):
        where = f" [{plan['environment']}]" if plan.get("environment") else ""
        return f"{plan['summary']}{where}"
    text = str(e.get("command_text") or "")
    return f"/ops {text}" if text else "(a click)"


def _detail(e: dict[str, Any]) -> str:
    result: dict[str, Any] = e["result"] if isinstance(e.get("result"), dict) else {}
    for key in ("error", "message", "why", "reason"):
        value = result.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return ""


def _at(e: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(e["at"])).astimezone(UTC)


def entry_line(e: dict[str, Any]) -> str:
    """The Markdown line of one entry (``verify_text`` re-renders it from the row to compare)."""
    detail = _detail(e)
    request = f" · request {_code(e['request_id'])}" if e.get("request_id") else ""
    return (f"- `#{int(e['seq'])}` {_at(e):%Y-%m-%d %H:%M:%S} **{_md(e.get('event'), 40)}** — {_md(_who(e), 80)} "
            f"({_code(e.get('actor_id'))}) in {_code(e.get('channel_id'))}: {_md(_what(e))}"
            + (f" → {_md(detail, 240)}" if detail else "") + f"{request} · hash `{str(e.get('hash'))[:16]}`")


def slack_line(e: dict[str, Any], *, dated: bool) -> str:
    """One entry in the Slack message: names, not mentions (posting a timeline pings nobody)."""
    detail = _detail(e)
    when = f"{_at(e):%m-%d %H:%M:%S}" if dated else f"{_at(e):%H:%M:%S}"
    request = f" `{mrkdwn(_flat(e['request_id'], 64)).replace('`', '')}`" if e.get("request_id") else ""
    return (f"`{when}` *{mrkdwn(_flat(e.get('event'), 40))}* {mrkdwn(_flat(_who(e), 60))}: {mrkdwn(_flat(_what(e), 160))}"
            + (f" — _{mrkdwn(_flat(detail, 120))}_" if detail else "") + f"{request} · #{int(e['seq'])}")


def _window_words(tl: Timeline) -> str:
    where = "all channels" if tl.channel is None else f"<#{tl.channel}>"
    return f"{where}, {tl.since:%Y-%m-%d %H:%M:%S} to {tl.until:%Y-%m-%d %H:%M:%S} UTC"


def continue_hint(tl: Timeline) -> str:
    """Past ``MAX_ENTRIES``: where the next timeline starts."""
    last = _at(tl.entries[-1]) if tl.entries else tl.since
    return last.isoformat(timespec="microseconds").replace("+00:00", "")


def message_text(tl: Timeline, *, command: str) -> str:
    """The message posted in the channel: a header and up to ``MESSAGE_LINES`` entries."""
    n = len(tl.entries)
    head = (f":spiral_note_pad: *Incident timeline* — {_window_words(tl).replace(' UTC', ' UTC')}: "
            + (f"{n} entr{'y' if n == 1 else 'ies'} (audit seq {tl.seqs})" if n else "nothing opsbot did or refused"))
    lines = [head]
    dated = tl.since.date() != tl.until.date()
    lines += [slack_line(e, dated=dated) for e in tl.entries[:MESSAGE_LINES]]
    if n > MESSAGE_LINES:
        lines.append(f"_…and {n - MESSAGE_LINES} more: every entry is in the Markdown file in this thread._")
    if tl.truncated:
        lines.append(f":warning: More than {MAX_ENTRIES} entries in this window: the timeline stops at #{tl.entries[-1]['seq']}. "
                     f"For the rest: `/ops {command} --since {continue_hint(tl)}`, or narrow the window.")
    if n:
        lines.append("_Times in UTC. Each entry names its audit row; the file verifies with `opsbot audit verify --file`._")
    return "\n".join(lines)


def markdown(tl: Timeline) -> str:
    n = len(tl.entries)
    out = [f"# Incident timeline — {_window_words(tl).replace('<#', '#').replace('>', '')}", "",
           f"Generated by opsbot at {tl.generated_at:%Y-%m-%d %H:%M:%S} UTC from its audit trail: {n} "
           f"entr{'y' if n == 1 else 'ies'} (audit seq {tl.seqs}). Times are UTC.", ""]
    if tl.truncated:
        out += [f"**Cut at {MAX_ENTRIES} entries**: the window holds more; the next timeline starts at {continue_hint(tl)}.", ""]
    out += ["Each line names its audit row (`#seq`) and hash. The block at the end holds the rows themselves: "
            "`opsbot audit verify --file <this file>` checks every line against its row, every row against its hash, "
            "and, with DATABASE_URL set, every hash against the audit trail.", "", "## Timeline", ""]
    out += [entry_line(e) for e in tl.entries] or ["_Nothing opsbot did or refused in this window._"]
    out += ["", "## Audit rows", "", FENCE, json.dumps(tl.meta(), sort_keys=True)]
    out += [json.dumps(e, sort_keys=True, ensure_ascii=False) for e in tl.entries]
    out += ["```", ""]
    return "\n".join(out)


def as_json(tl: Timeline) -> str:
    return json.dumps({**tl.meta(), "lines": [entry_line(e) for e in tl.entries], "rows": tl.entries},
                      sort_keys=True, ensure_ascii=False, indent=1) + "\n"


def filename(tl: Timeline, ext: str = "md") -> str:
    return f"opsbot-timeline-{tl.channel or 'all'}-{tl.until:%Y%m%d-%H%M}.{ext}"


# ------------------------------------------------------------------ verification

@dataclass(frozen=True)
class FileCheck:
    """What ``verify_text`` found: the entries' (seq, hash), and the problems (none: it verifies)."""

    kind: str  # "markdown" or "json"
    hashes: list[tuple[int, str]]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_rows(rows: list[Any], problems: list[str]) -> list[tuple[int, str]]:
    hashes: list[tuple[int, str]] = []
    previous: dict[str, Any] | None = None
    for i, e in enumerate(rows):
        if not isinstance(e, dict) or not isinstance(e.get("seq"), int) or not isinstance(e.get("hash"), str) \
                or not isinstance(e.get("prev_hash"), str) or not isinstance(e.get("at"), str):
            problems.append(f"row {i + 1} of the block is not an audit row (seq, at, prev_hash, hash)")
            continue
        seq = e["seq"]
        try:
            digest = audit_hash(e["prev_hash"], audit_record(e))
        except (ValueError, TypeError):
            problems.append(f"seq {seq}: its time `{_flat(e.get('at'), 40)}` is not one opsbot writes (edited)")
            continue
        if digest != e["hash"]:
            problems.append(f"seq {seq}: its content does not match its hash (edited)")
        if previous is not None:
            if seq <= previous["seq"]:
                problems.append(f"seq {seq}: out of order (after seq {previous['seq']})")
            elif seq == previous["seq"] + 1 and e["prev_hash"] != previous["hash"]:
                problems.append(f"seq {seq}: does not link to seq {previous['seq']} (one of them was rewritten)")
        previous = e
        hashes.append((seq, e["hash"]))
    return hashes


def verify_text(text: str) -> FileCheck | None:
    """A timeline file (Markdown or JSON) checked on its own; None when ``text`` is not a timeline
    (it may be an `opsbot audit export`, JSON lines)."""
    problems: list[str] = []
    stripped = text.lstrip()
    if stripped.startswith("{") and FENCE not in text:
        try:
            doc = json.loads(text)
        except ValueError:
            return None  # JSON lines: an export
        if not isinstance(doc, dict) or "opsbot_timeline" not in doc:
            return None
        rows: list[Any] = doc["rows"] if isinstance(doc.get("rows"), list) else []
        hashes = _check_rows(rows, problems)
        by_seq = {e["seq"]: e for e in rows if isinstance(e, dict) and isinstance(e.get("seq"), int)}
        lines: list[Any] = doc["lines"] if isinstance(doc.get("lines"), list) else []
        _check_lines([str(x) for x in lines], by_seq, problems)
        return FileCheck("json", hashes, problems)
    if FENCE not in text:
        return None
    listed: list[str] = []
    block: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.strip() == FENCE:
            inside = True
            continue
        if inside and line.strip() == "```":
            inside = False
            continue
        (block if inside else listed).append(line)
    if not block:
        return FileCheck("markdown", [], ["the block of audit rows is empty (the file was cut?)"])
    rows = []
    for i, line in enumerate(block[1:], start=2):
        try:
            rows.append(json.loads(line))
        except ValueError:
            problems.append(f"line {i} of the block of audit rows is not JSON (edited)")
    hashes = _check_rows(rows, problems)
    by_seq = {e["seq"]: e for e in rows if isinstance(e, dict) and isinstance(e.get("seq"), int)}
    _check_lines([line for line in listed if _LINE_SEQ.match(line)], by_seq, problems)
    return FileCheck("markdown", hashes, problems)


def _check_lines(lines: list[str], by_seq: dict[int, dict[str, Any]], problems: list[str]) -> None:
    for line in lines:
        m = _LINE_SEQ.match(line)
        if not m:
            problems.append(f"a timeline line does not name its audit row: {_flat(line, 80)!r}")
            continue
        seq = int(m.group(1))
        entry = by_seq.get(seq)
        if entry is None:
            problems.append(f"seq {seq}: listed, but its audit row is not in the block (removed?)")
            continue
        try:
            expected = entry_line(entry)
        except (KeyError, ValueError, TypeError):
            continue  # the row itself is reported
        if line.rstrip() != expected:
            problems.append(f"seq {seq}: the listed line was edited (it no longer says what audit row {seq} says)")
