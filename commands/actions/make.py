"""Build the commands of a config's `actions:` (cached per loaded config: it is frozen)."""

from __future__ import annotations

from collections import OrderedDict

from bot.action_config import FlagAction, HttpAction, QueueAction, SqlAction, action_words
from bot.config import Config
from commands.actions.base import ActionCommand, AnyAction
from commands.actions.flag import FlagCommand
from commands.actions.http import HttpCommand
from commands.actions.queue import QueueCommand
from commands.actions.sql import SqlCommand

_KINDS: dict[type, type[ActionCommand]] = {SqlAction: SqlCommand, HttpAction: HttpCommand, FlagAction: FlagCommand,
                                           QueueAction: QueueCommand}
# Keyed by the `actions` mapping itself (a loaded config is frozen; tests swap the mapping in place).
_CACHE: OrderedDict[int, tuple[object, tuple[ActionCommand, ...]]] = OrderedDict()
_CACHE_SIZE = 32


def make_command(name: str, spec: AnyAction) -> ActionCommand:
    kind = _KINDS[type(spec)]
    cls = type(f"Action_{name.replace('-', '_')}", (kind,), {
        "name": name, "action_name": name, "spec": spec, "words": action_words(name, spec),
        "usage": kind.usage_line(name, spec), "summary": spec.summary,
    })
    command: ActionCommand = cls()
    return command


def actions_of(config: Config) -> tuple[ActionCommand, ...]:
    if not config.actions:
        return ()
    key = id(config.actions)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is config.actions:
        _CACHE.move_to_end(key)
        return hit[1]
    made = tuple(make_command(name, spec) for name, spec in config.actions.items())
    _CACHE[key] = (config.actions, made)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return made
