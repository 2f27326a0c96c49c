"""The admission bound as a controller (bot/pipeline.py ``Admission``, issue 13): driven by a
simulated process on a fake clock, does it settle where the latency target puts it, without
overshooting, and does it come back after a slowness that was not its doing?

The simulated process serves admitted commands one at a time, first in first out, ``rate`` per
second, and each then waits ``delay`` s more (the database, Slack): a command admitted with ``n``
ahead of it takes ``delay + (n + 1) / rate`` s. So the bound the latency target allows is
``(max_wait - delay) × rate`` commands in flight. Commands arrive open-loop, ``arrivals`` per
second, far more than it can serve (bench/incident_load.py at 150/s: ~70 % answered busy)."""

from __future__ import annotations

import heapq
from collections.abc import Callable

from bot.pipeline import Admission


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _simulate(admission: Admission, clock: _Clock, *, seconds: float, arrivals: float, rate: float,
              delay: Callable[[float], float]) -> tuple[list[tuple[float, int]], list[tuple[float, float]]]:
    """Runs ``seconds`` of load from ``clock.now``. Returns the bound at each arrival (time, bound)
    and each admitted command's (admitted at, time in flight). ``delay(t)``: the extra wait of a
    command admitted at ``t``."""
    bounds: list[tuple[float, int]] = []
    took: list[tuple[float, float]] = []
    leaving: list[tuple[float, int, float]] = []  # (leaves at, order, admitted at)
    served_until = clock.now
    start, order = clock.now, 0
    for i in range(int(seconds * arrivals)):
        t = start + i / arrivals
        while leaving and leaving[0][0] <= t:
            at, _, admitted = heapq.heappop(leaving)
            clock.now = at
            admission.leave()
            took.append((admitted, at - admitted))
        clock.now = t
        bounds.append((t, admission.bound()))
        if admission.enter() is None:
            served_until = max(t, served_until) + 1 / rate
            order += 1
            heapq.heappush(leaving, (served_until + delay(t), order, t))
    for at, _, admitted in sorted(leaving):  # the rest leave, no more arrive
        clock.now = max(clock.now, at)
        admission.leave()
        took.append((admitted, at - admitted))
    return bounds, took


def _between(bounds: list[tuple[float, int]], a: float, b: float) -> list[int]:
    return [n for t, n in bounds if a <= t < b]


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def test_under_a_steady_overload_the_bound_settles_near_the_level_the_latency_allows() -> None:
    clock = _Clock()
    admission = Admission(limit=100, max_wait=0.75, floor=10, window=2.0, decrease=0.8, clock=clock)
    rate, extra = 50.0, 0.1
    allowed = (0.75 - extra) * rate  # 32.5 in flight: each then takes 0.75 s
    bounds, took = _simulate(admission, clock, seconds=30, arrivals=150, rate=rate, delay=lambda _: extra)
    assert max(n for _, n in bounds) <= 1.5 * allowed  # from the start (it starts at 20 and doubles)
    settled = _between(bounds, 3, 30)
    # after the first seconds it stays between 0.6× and 1.5× of that level; the first AIMD (+1 per
    # fast command, starting at the limit) took 8 s to come down from 100, then went up to 75 (2.3×)
    # and back down to 15-20 every ~8 s
    assert max(settled) <= 1.5 * allowed, max(settled)
    assert min(settled) >= 0.6 * allowed, min(settled)
    assert _p99([s for _, s in took]) <= 1.0, _p99([s for _, s in took])  # the card p99 the issue asks for, in the model
    assert len(took) >= 0.85 * rate * 30  # and it still serves nearly as fast as the process can


def test_an_outside_slowness_drives_the_bound_down_and_it_recovers_after() -> None:
    """Commands take 1 s more for 10 s (the database slow, not opsbot): the bound falls, since
    nothing it admits is in time; after, it comes back up, and without overshooting."""
    clock = _Clock()
    admission = Admission(limit=100, max_wait=0.75, floor=10, window=2.0, decrease=0.8, clock=clock)
    rate, extra = 50.0, 0.1
    allowed = (0.75 - extra) * rate
    _simulate(admission, clock, seconds=10, arrivals=150, rate=rate, delay=lambda _: extra)
    before = admission.bound()
    assert 0.6 * allowed <= before <= 1.5 * allowed
    slow_from = clock.now
    bounds, _ = _simulate(admission, clock, seconds=40, arrivals=150, rate=rate,
                          delay=lambda t: extra + (1.0 if t < slow_from + 10 else 0.0))
    during = _between(bounds, slow_from + 8, slow_from + 10)
    assert max(during) <= 0.5 * before, (before, during)  # driven down
    assert min(_between(bounds, slow_from, slow_from + 12)) >= 10  # never below the floor
    recovered = _between(bounds, slow_from + 20, slow_from + 40)
    assert min(recovered) >= 0.6 * allowed, min(recovered)  # back within ~10 s of the slowness ending
    assert max(recovered) <= 1.5 * allowed, max(recovered)


def test_a_bound_nobody_uses_does_not_grow() -> None:
    """20 commands/s that the process serves at once: a bound lowered by a slow spell stays where
    it is while nobody comes near it (the first AIMD grew it back to the limit on them)."""
    clock = _Clock()
    admission = Admission(limit=100, max_wait=0.75, floor=10, window=2.0, decrease=0.8, clock=clock)
    for _ in range(12):  # a slow spell: 10 at a time taking 1 s
        for _ in range(10):
            assert admission.enter() is None
        clock.now += 1.0
        for _ in range(10):
            admission.leave()
    low = admission.bound()
    assert low < 50
    clock.now += 3  # the slow ones left the window
    _simulate(admission, clock, seconds=20, arrivals=20, rate=1000, delay=lambda _: 0.05)  # ~1 in flight
    assert admission.bound() == low


def test_the_bound_grows_no_faster_than_commands_fill_it() -> None:
    """bench/incident_load.py at 150/s: in slow start the bound reached 85 while 35-58 were in
    flight, grown by commands that had entered when it was full, after it had doubled past them.
    Here 20 enter at once (a full bound), then 60/s arrive, each in flight 0.3 s (~18 at a time,
    under 90 % of the bound): the burst's first commands may grow it, not all 20."""
    clock = _Clock()
    admission = Admission(limit=100, max_wait=0.75, floor=10, window=2.0, decrease=0.8, initial=20, clock=clock)
    leaving: list[tuple[float, int]] = []
    for i in range(20):
        assert admission.enter() is None
        heapq.heappush(leaving, (0.3, i))
    most = 20
    for i in range(1, 600):  # 10 s
        t = i / 60
        while leaving and leaving[0][0] <= t:
            clock.now = heapq.heappop(leaving)[0]
            admission.leave()
        clock.now = t
        if admission.enter() is None:
            heapq.heappush(leaving, (t + 0.3, 20 + i))
        most = max(most, admission.in_flight)
    assert most <= 20 and admission.bound() <= most + 3, (most, admission.bound())  # 41 when all 20 counted
