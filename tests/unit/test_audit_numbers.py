"""Numbers in an audit row's plan/result (issue 13): jsonb re-renders numbers (1e16 comes back as
10000000000000000, -0.0 as 0.0; NaN and Infinity are not JSON and are refused), so before this fix a
row holding such a float was hashed over text that could never be re-derived from the stored row, and
never verified. The write path now stores, and hashes, the form jsonb gives back."""

from __future__ import annotations

import asyncio
import math
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.adapters.audit_log import AuditLog, audit_hash, audit_record, export_jsonl, jsonb_form, verify_lines
from bot.adapters.spool import AuditSpool
from bot.adapters.store import Store
from bot.audit import Audit
from bot.domain import Actor, UserId, canonical_json
from tests.faults.proxy import TcpProxy

ANN = Actor(UserId("U1"), "ann")
NUMBERS: list[Any] = [1e-07, 1e16, 1e22, 1.5e16, 1.2345678901234567e300, 1.7976931348623157e308, -1e16, 5e-324, 2.5e-10,
                      -0.0, 0.0, 10**30, -(10**40), 2**64, 2**63 - 1, 123456789.125, 0.1, 1.0, 100.0, True, False]


@pytest_asyncio.fixture
async def log(state_db: str) -> AsyncIterator[AuditLog]:
    store = Store(state_db, max_size=4)
    await store.open()
    yield AuditLog(store)
    await store.close()


async def append(log: AuditLog, plan: Any, result: Any = None) -> dict[str, Any]:
    return await log.append(event="requested", actor_id="U1", actor_name="ann", channel_id="C1", request_id="r-1",
                            command_text="flag rollout 1e-07", plan=plan, result=result)


async def assert_verifies(log: AuditLog, tmp_path: Path, rows: int) -> None:
    report = await log.verify()
    assert report.ok and report.checked == rows, report.summary()
    for stored in await log.rows():  # the original, row-by-row way too
        assert audit_hash(stored["prev_hash"], audit_record(stored)) == stored["hash"], stored["seq"]
    path = tmp_path / "audit.jsonl"
    with path.open("w") as out:
        await export_jsonl(log, out)
    with path.open() as lines:
        file_report, _ = verify_lines(lines)
    assert file_report.ok and file_report.checked == rows, file_report.summary()


async def test_floats_with_exponents_huge_ints_and_negative_zero_verify(log: AuditLog, tmp_path: Path) -> None:
    for i, n in enumerate(NUMBERS):
        await append(log, {"command": "flag", "params": {"value": n, "list": [n, {"deep": n}]}, "k": i}, {"got": n})
    await append(log, {"all": NUMBERS}, {"all": list(reversed(NUMBERS))})
    await assert_verifies(log, tmp_path, len(NUMBERS) + 1)


async def test_the_number_that_is_stored_is_the_number_that_was_asked(log: AuditLog) -> None:
    """Normalising changes the form, never the value: 1e16 is stored as the integer 10**16, 1e-07 as
    0.0000001, 1.2345678901234567e300 as exactly that decimal (not the binary float's expansion)."""
    row = await append(log, {"a": 1e16, "b": 1e-07, "c": 1.2345678901234567e300, "z": -0.0, "f": 0.1})
    stored = (await log.rows())[-1]
    assert stored["plan"] == row["plan"]
    assert stored["plan"]["a"] == 10**16 and isinstance(stored["plan"]["a"], int)
    assert stored["plan"]["b"] == 1e-07
    assert stored["plan"]["c"] == 12345678901234567 * 10**284
    assert stored["plan"]["z"] == 0.0 and math.copysign(1, stored["plan"]["z"]) == 1
    assert stored["plan"]["f"] == 0.1


async def test_nan_and_infinity_are_recorded_as_text_not_refused(log: AuditLog, tmp_path: Path) -> None:
    """jsonb refuses NaN/Infinity (they are not JSON): before, such a plan made the append itself
    fail, so the attempt was never audited. Now they are kept as the strings Python writes."""
    await append(log, {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "in": [math.nan]}, {"ratio": math.inf})
    stored = (await log.rows())[-1]
    assert stored["plan"] == {"nan": "NaN", "inf": "Infinity", "ninf": "-Infinity", "in": ["NaN"]}
    assert stored["result"] == {"ratio": "Infinity"}
    await assert_verifies(log, tmp_path, 1)


async def test_hostile_keys_and_values_are_stored_as_hashed(log: AuditLog, tmp_path: Path) -> None:
    """Non-string keys (json writes 1 → "1", False → "false"), tuples, values json only knows by
    ``default=str`` (a Path, a set): what is hashed is what jsonb gives back."""
    await append(log, {1: "int key", False: "bool key", None: "none key", 2.5: "float key", "t": (1, 2), "p": Path("/x"),
                       "s": "\u2028 ok"}, ["list", "result"])
    stored = (await log.rows())[-1]
    assert stored["plan"] == {"1": "int key", "false": "bool key", "null": "none key", "2.5": "float key", "t": [1, 2], "p": "/x",
                              "s": "\u2028 ok"}
    await assert_verifies(log, tmp_path, 1)


_safe = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=20)
                     | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: "e+" not in repr(f) and repr(f) != "-0.0"),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_any = st.recursive(st.none() | st.booleans() | st.integers(-(2**200), 2**200) | st.floats(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=10)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=_safe)
def test_values_jsonb_already_round_trips_are_left_alone(value: Any) -> None:
    """So every row written before this change hashes as it did: the chain and existing rows verify."""
    assert canonical_json(jsonb_form(value)) == canonical_json(value)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=_any)
def test_the_form_is_stable(value: Any) -> None:
    once = jsonb_form(value)
    assert canonical_json(jsonb_form(once)) == canonical_json(once)
    assert "NaN" not in canonical_json(once).replace('"NaN"', "") and "e+" not in canonical_json(once).replace('"', "")


def _random_float(rng: random.Random) -> float:
    """Any 64-bit pattern: subnormals, exponents of every size, -0.0, NaN, Infinity."""
    return float(struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0])


@pytest.mark.parametrize("seed", range(3))
async def test_random_bit_pattern_floats_verify_through_postgresql(log: AuditLog, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        floats = [_random_float(rng) for _ in range(8)]
        await append(log, {"v": floats, "one": floats[0], "big": rng.getrandbits(200) - 2**199}, {"w": floats[1:3]} if seed % 2 else None)
    await assert_verifies(log, tmp_path, 20)


async def test_odd_numbers_recorded_while_the_database_is_down_verify_once_drained(state_db: str, tmp_path: Path) -> None:
    """Through Audit.record: the row goes to the local spool (JSON on disk: NaN written as NaN),
    and when the database is back the drained row is stored and hashed in jsonb's form."""
    proxy, url = await TcpProxy.for_url(state_db)
    store = Store(url, max_size=1, timeout=2.0)
    await store.open()
    try:
        log = AuditLog(store)
        audit = Audit(log, audit_channel=None, spool=AuditSpool(tmp_path / "spool"))
        await audit.record("requested", actor=ANN, text="flag rollout 1e16", plan={"ratio": 1e16, "tiny": 1e-07, "z": -0.0})
        proxy.down()
        kept = await audit.record("requested", actor=ANN, text="flag rollout nan", plan={"ratio": math.nan, "big": 1e300})
        assert kept["spooled"] is True
        proxy.up()
        assert await audit.drain_spool() == 1
        rows = await log.rows()
        assert [r["plan"]["ratio"] for r in rows] == [10**16, "NaN"] and rows[1]["plan"]["big"] == 10**300
        report = await log.verify()
        assert report.ok and report.checked == 2, report.summary()
    finally:
        await store.close()
        await proxy.stop()


async def test_two_writers_with_odd_numbers_make_one_chain_that_verifies(log: AuditLog, tmp_path: Path) -> None:
    async def writer(n: int) -> None:
        for i in range(40):
            await append(log, {"w": n, "v": [1e16 * (i + 1), -0.0, 1e-07 * i, math.inf]}, {"i": float(i) * 1e20})

    await asyncio.gather(writer(1), writer(2))
    await assert_verifies(log, tmp_path, 80)
