"""The test harness leaves nothing behind: the spool directory it makes for a bot that was given
none is removed when the bot stops (hundreds of empty /tmp/opsbot-spool-* were left by a run); one
a test passes is the test's own, and stays."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.config import Config
from bot.sandbox.slack_api import FakeSlack
from tests.harness import Harness


def _is_dir(path: str) -> bool:
    return Path(path).is_dir()


async def test_the_spool_directory_the_harness_made_is_removed_on_stop(config: Config, slack: FakeSlack, state_db: str,
                                                                      redis_url: str, kubeconfig: str, queue_prefix: str,
                                                                      tmp_path: Path) -> None:
    made = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                               queue_prefix=queue_prefix, with_worker=False)
    spool = made.runtime.settings.spool_dir
    assert _is_dir(spool) and Path(spool).name.startswith("opsbot-spool-")
    await asyncio.wait_for(made.stop(), timeout=60)
    assert not _is_dir(spool)

    own = tmp_path / "spool"
    own.mkdir()
    given = await Harness.start(config=config, slack=slack, database_url=state_db, redis_url=redis_url, kubeconfig=kubeconfig,
                                queue_prefix=queue_prefix, with_worker=False, spool_dir=str(own))
    await asyncio.wait_for(given.stop(), timeout=60)
    assert _is_dir(str(own))
