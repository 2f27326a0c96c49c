"""`kind: flag` — one value in a database row or a Redis key, set to one of the words people type.

Parse: the last argument is the value word, one of ``values:`` (any case); anything else, look-alike
letters included, is a usage error listing the words. Nothing is read before the word is known.
Plan: the flag's current value is read (a missing row is NotFound naming the table and key; a missing
Redis key is "(not set)"); the wanted value already there is Refused ("nothing to do"). ``before`` is
the current value and ``after`` the wanted one, so the worker's stale check refuses a request whose
flag someone changed after the card was posted. The target is the flag itself (``flag/db/…`` or
``flag/redis/…``), so two actions on one flag take the same lock and never interleave.
Execute: a compare-and-set from ``before`` to ``after``; changed in between → Refused (stale), nothing
overwritten.

``revert_after``. A successful request asks the worker to put the old value back later (its Outcome
carries ``revert``: when and to what); the worker keeps that in opsbot's own database
(``scheduled_reverts``), announces it in the thread shortly before, and then calls ``revert`` below:
the same compare-and-set, from the value this request set back to the one it found. If someone changed
the flag since, nothing is written and the thread says what it is now. A change that puts back what a
pending revert of the same flag would put back (``off`` during the 30m of an ``on``) ends that revert
early and gets none of its own: otherwise switching maintenance off early would switch it on again.

The revert needs no approval of its own, on purpose: the approvers approved "on for 30m" (the card
says so), and the revert is part of what they approved. Asking again could leave a maintenance mode
on because nobody clicked, which is the failure the revert exists to prevent.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from bot.action_config import FlagAction, render_text
from bot.domain import Outcome, Plan
from bot.errors import NotFound, OutcomeUnknown, Refused
from bot.ports import Context
from bot.untrusted import non_ascii_hint
from commands.actions.base import MAX_SHOWN, ActionCommand, AnyAction, shown_value
from commands.actions.sql import plain
from commands.base import Inverse, Params, typed
from commands.shown import one_line, untrusted

REDIS_BUDGET = 2.0  # seconds for one read or compare-and-set of a Redis flag
NOT_SET = "(not set)"
ANNOUNCE_BEFORE = 5 * 60  # seconds: the thread is told this long before a revert…
ANNOUNCE_AT_ONCE_BELOW = 10 * 60  # …or at once when the whole revert_after is shorter than this


def same(a: Any, b: Any) -> bool:
    """Equal as stored values: ``True`` is not ``1`` and ``"1"`` is not ``1`` (Python says True == 1)."""
    return type(a) is type(b) and a == b


def duration_text(seconds: int) -> str:
    """1800 → ``30m``, 5400 → ``1h 30m``, 90000 → ``1d 1h``, as the config writes durations."""
    parts, rest = [], int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return " ".join(parts[:2]) or "0s"


def minutes_text(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


class FlagCommand(ActionCommand):
    backend = "the flag's database or Redis"
    extra_args: ClassVar[tuple[str, ...]] = ("value",)

    @classmethod
    def extra_usage(cls, spec: AnyAction) -> list[str]:
        return ["<" + "|".join(getattr(spec, "values", {})) + ">"]

    # ------------------------------------------------------------------ parse

    def check_extra(self, name: str, value: str) -> Any:
        spec: FlagAction = self.spec
        for word in spec.values:
            if value.lower() == word:
                return word
        words = ", ".join(f"`{w}`" for w in spec.values)
        raise self.usage_error(f"`{shown_value(value)}` is not a value of {' '.join(self.words)}; type one of {words}"
                               f"{non_ascii_hint(value[:MAX_SHOWN])}.")

    # ------------------------------------------------------------------ where the flag is

    def flag_key(self, params: Params) -> str:
        return render_text(self.spec.key, params)

    def target_key(self, params: Params) -> str:
        spec: FlagAction = self.spec
        if spec.redis is not None:
            return f"flag/redis/{spec.redis}/{self.flag_key(params)}"
        table = f"{spec.schema_}.{spec.table}" if spec.schema_ else str(spec.table)
        return f"flag/db/{spec.database}/{table}/{self.flag_key(params)}"

    def where(self, params: Params) -> str:
        spec: FlagAction = self.spec
        key = one_line(self.flag_key(params), 200)
        if spec.redis is not None:
            return f"Redis `{spec.redis}`, key `{key}`"
        table = f"{spec.schema_}.{spec.table}" if spec.schema_ else spec.table
        return f"database `{spec.database}`, table `{table}`, column `{spec.value_column}` where `{spec.key_column}` = `{key}`"

    def word_of(self, stored: Any) -> str:
        """The word for a stored value, or the raw value when it is none of the words."""
        if stored is None and self.spec.redis is not None:
            return NOT_SET
        for word, value in self.spec.values.items():
            if same(value, stored):
                return str(word)
        return f"`{one_line(repr(stored), 80)}`"

    def subject(self, params: Params) -> str:
        """What is typed before the value: ``maintenance``, ``flag checkout``."""
        return " ".join([*self.words, *(str(params[n]) for n in self.spec.params)])

    async def read(self, params: Params, ctx: Context) -> Any:
        spec: FlagAction = self.spec
        key = self.flag_key(params)
        if spec.redis is not None:
            return await ctx.redis.get_value(spec.redis, key, budget=REDIS_BUDGET)
        found, value = await ctx.databases.read_flag(str(spec.database), (spec.schema_, str(spec.table)), spec.key_column,
                                                     spec.value_column, key)
        if not found:
            raise NotFound(f"there is no row in table `{spec.table}` of database `{spec.database}` with "
                           f"`{spec.key_column}` = `{untrusted(key, 200)}`, so there is no flag to set. Check the name; "
                           "opsbot does not create flag rows.")
        return plain(value)

    async def write(self, params: Params, ctx: Context, *, value: Any, expect: Any) -> bool:
        spec: FlagAction = self.spec
        key = self.flag_key(params)
        if spec.redis is not None:
            return await ctx.redis.set_value_if(spec.redis, key, value=value, expect=expect, budget=REDIS_BUDGET)
        return await ctx.databases.write_flag(str(spec.database), (spec.schema_, str(spec.table)), spec.key_column,
                                              spec.value_column, key, value=value, expect=expect)

    # ------------------------------------------------------------------ plan and execute

    async def plan(self, params: Params, ctx: Context) -> Plan:
        spec: FlagAction = self.spec
        word = str(params["value"])
        wanted = spec.values[word]
        current = await self.read(params, ctx)
        subject = self.subject(params)
        if same(current, wanted):
            raise Refused(f"{subject} is already {word}; nothing to do.")
        old = self.word_of(current)
        details = [spec.summary, f"{self.where(params)}: now {old}, will be {word}"]
        if spec.revert_after is not None:
            at = datetime.now(UTC) + timedelta(seconds=spec.revert_after)
            details.append(f"will be put back to {old} after {duration_text(spec.revert_after)} (at {at:%H:%M} UTC if it runs "
                           "now), only if it is still "
                           f"{word} then; no second approval: putting it back is part of what is approved here")
        return self.skeleton(params, ctx.config, summary=f"{subject}: {old} → {word}", details=tuple(details),
                             before={"value": current}, after={"value": wanted})

    async def execute(self, plan: Plan, ctx: Context) -> Outcome:
        spec: FlagAction = self.spec
        current, wanted = plan.before["value"], plan.after["value"]
        subject, word, old = self.subject(plan.params), str(plan.params["value"]), self.word_of(current)
        if not await self.write(plan.params, ctx, value=wanted, expect=current):
            now = await self.read(plan.params, ctx)
            if same(now, wanted):  # a client's retry of our own write finds it done, or someone set the same value
                raise OutcomeUnknown(f"{subject} is {word} now, but opsbot cannot tell whether its own write did it (the "
                                     "connection dropped and the write was retried) or someone else did; no auto-revert is "
                                     "scheduled. Check it and set it back by hand if needed.")
            raise Refused(f"{subject} changed just before it was set (it was {old}, now {self.word_of(now)}); "
                          "nothing was overwritten.")
        message = f"{subject} set to {word} (was {old}) in {self.where(plan.params)}."
        details: dict[str, Any] = {"value": word, "was": old}
        if spec.revert_after is not None:
            due = datetime.now(UTC) + timedelta(seconds=spec.revert_after)
            announce = due - timedelta(seconds=ANNOUNCE_BEFORE if spec.revert_after >= ANNOUNCE_AT_ONCE_BELOW else spec.revert_after)
            # The worker schedules it and adds `text` to the message (or ends an earlier revert this one undoes).
            details["revert"] = {"due_at": due.isoformat(), "announce_at": announce.isoformat(), "to": old,
                                 "text": f"It will be put back to {old} at {due:%H:%M} UTC ({duration_text(spec.revert_after)} "
                                         f"from now) if it is still {word} then; no further approval is needed."}
        return Outcome(ok=True, message=message, details=details)

    # ------------------------------------------------------------------ undo (bot/undo.py)

    def inverse(self, original_plan: dict[str, Any], result: dict[str, Any]) -> Inverse:
        """Set back the value this request found, as its word (the same as the auto-revert puts back).
        A value that is none of the action's words cannot be typed, so it cannot be undone."""
        params, before = dict(original_plan["params"]), original_plan["before"]["value"]
        old = self.word_of(before)
        if old not in self.spec.values:
            return Inverse(why=f"{self.subject(params)} was {old} before, which is none of its values "
                               f"({', '.join(self.spec.values)}), so opsbot cannot type it back")
        return Inverse(text=typed(*self.words, *(params[n] for n in self.spec.params), old),
                       why=f"{self.subject(params)} back to {old}")

    def moved_on(self, original_plan: dict[str, Any], fresh: Plan, request_id: str) -> str | None:
        then, now = original_plan["after"]["value"], fresh.before["value"]
        if same(then, now):
            return None
        return (f"{self.subject(original_plan['params'])} is {self.word_of(now)} now, not the "
                f"{self.word_of(then)} that `{request_id}` set")

    # ------------------------------------------------------------------ revert_after (called by the worker)

    def revert_notice(self, plan: dict[str, Any], request_id: str, seconds_left: float) -> str:
        old = self.word_of(plan["before"]["value"])
        return (f":hourglass_flowing_sand: {self.subject(plan['params'])} will be put back to {old} in "
                f"{minutes_text(seconds_left)} (auto-revert of `{request_id}`).")

    def revert_delayed_notice(self, plan: dict[str, Any], request_id: str, error: str) -> str:
        old = self.word_of(plan["before"]["value"])
        return (f":warning: {self.subject(plan['params'])} could not be put back to {old} yet (auto-revert of `{request_id}`): "
                f"{error}. opsbot keeps trying; the revert is not dropped.")

    async def revert(self, plan: dict[str, Any], ctx: Context, request_id: str) -> Outcome:
        """Put ``before`` back if the flag still holds ``after``. ok=False: skipped, the message says why
        and what the flag is now. Raises BackendUnavailable (try later) or ExecutionError/OutcomeUnknown."""
        params = dict(plan["params"])
        before, after = plan["before"]["value"], plan["after"]["value"]
        subject, old, set_word = self.subject(params), self.word_of(before), self.word_of(after)
        what = f"auto-revert of `{request_id}`"
        if await self.write(params, ctx, value=before, expect=after):
            return Outcome(ok=True, message=f":leftwards_arrow_with_hook: {subject} put back to {old} ({what}).",
                           details={"value": old})
        try:
            now = await self.read(params, ctx)
        except NotFound as exc:
            return Outcome(ok=False, message=f":warning: {subject} was not put back to {old} ({what}): {exc}",
                           details={"now": "no row"})
        if same(now, before):
            return Outcome(ok=True, message=f":leftwards_arrow_with_hook: {subject} is already back to {old} ({what}); "
                                            "nothing to do.", details={"value": old, "already": True})
        return Outcome(ok=False, message=f":warning: {subject} was NOT put back to {old} ({what}): someone changed it since "
                                         f"this request set it to {set_word}; it is {self.word_of(now)} now, so opsbot left it "
                                         "as it is.", details={"now": self.word_of(now)})
