"""The small helpers that word opsbot's answers."""

from __future__ import annotations

import pytest

from bot.adapters.directory import config_error, slack_error
from bot.messages import plural, usergroup_problems


@pytest.mark.parametrize(("n", "word", "many", "said"), [
    (0, "approval", None, "0 approvals"), (1, "approval", None, "1 approval"), (2, "failed job", None, "2 failed jobs"),
    (3, "query", None, "3 queries"), (2, "key", None, "2 keys"), (2, "hash", None, "2 hashes"), (1200, "row", None, "1,200 rows"),
    (2, "person", "people", "2 people"),
])
def test_plural(n: int, word: str, many: str | None, said: str) -> None:
    assert plural(n, word, many) == said


def test_usergroup_problems_name_the_group_the_key_and_who_fixes_it() -> None:
    lines = usergroup_problems({"S0NXSENG": "no_such_subteam", "S1": "missing_scope"}, {"S0NXSENG": ["engineer"], "S1": ["lead"]})
    assert lines[0] == ("The policy names Slack user group S0NXSENG, which does not exist in this workspace; roles from it are "
                        "not granted. Ask the platform team to fix `roles.engineer.usergroups` in the opsbot config.")
    assert "lacks the `usergroups:read` scope" in lines[1] and "Slack user group S1;" in lines[1]


class _Response:
    def __init__(self, status_code: int, data: object) -> None:
        self.status_code, self.data = status_code, data


class _SlackApiError(Exception):  # the shape of slack_sdk's SlackApiError
    def __init__(self, status_code: int, data: object) -> None:
        super().__init__("The request to the Slack API failed.\nThe server responded with: …")
        self.response = _Response(status_code, data)


def test_only_slacks_own_answers_are_configuration_errors() -> None:
    assert config_error(_SlackApiError(200, {"ok": False, "error": "no_such_subteam"})) == "no_such_subteam"
    assert config_error(_SlackApiError(200, {"ok": False, "error": "missing_scope"})) == "missing_scope"
    assert config_error(_SlackApiError(200, {"ok": False, "error": "ratelimited"})) is None
    assert slack_error(_SlackApiError(200, {"ok": False, "error": "ratelimited"})) == "ratelimited"
    assert config_error(_SlackApiError(503, "Service Unavailable")) is None  # a 5xx is an outage, whatever its body
    assert config_error(_SlackApiError(429, {"ok": False, "error": "ratelimited"})) is None
    assert config_error(ConnectionResetError()) is None
