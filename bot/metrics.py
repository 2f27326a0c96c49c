"""Prometheus metrics, on a registry of opsbot's own (so tests can build several apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("opsbot_requests_total", "Commands received, by command and outcome.",
                                ["command", "outcome"], registry=self.registry)
        self.approval_latency = Histogram("opsbot_approval_latency_seconds", "From request to final approval.",
                                          buckets=(5, 15, 30, 60, 120, 300, 600, 900, 1800), registry=self.registry)
        self.given_up = Counter("opsbot_messages_given_up_total",
                                "Slack messages opsbot stopped trying to deliver (permanent error, or a post that kept arriving "
                                "late); each is in the log at error level.", ["channel_kind"], registry=self.registry)
        self.spool_quarantined = Counter("opsbot_audit_spool_quarantined_total",
                                         "Spooled audit lines that could not be appended (unreadable, or refused by "
                                         "PostgreSQL) and were moved to the spool's quarantine.jsonl; each is in the log at "
                                         "error level.", registry=self.registry)
        self.usergroup_config_errors = Counter(
            "opsbot_usergroup_config_errors_total",
            "Times Slack answered that a configured user group cannot be used (no_such_subteam: it does not exist; "
            "missing_scope: the app lacks usergroups:read; plan_upgrade_required): a configuration error, the group grants "
            "nothing. At most once per group per slack.usergroup_cache; logged once per process.",
            ["usergroup", "error"], registry=self.registry)
        self.busy = Counter("opsbot_busy_total",
                            "Commands answered \"opsbot is busy\" (each audited as a `busy` event, or past 10,000 waiting to be audited "
                            "counted in one), by why: admission (more "
                            "commands in flight than this process takes at once) or the backend whose connection pool stayed "
                            "exhausted for its whole wait (the backend is up).", ["why"], registry=self.registry)
        self.in_flight = Gauge("opsbot_commands_in_flight", "`/ops` commands this process is working on after their ack.",
                               registry=self.registry)
        self.admission_bound = Gauge("opsbot_admission_bound",
                                     "How many `/ops` commands this process takes in flight now (bot/pipeline.py ``Admission``: "
                                     "at most OPSBOT_MAX_IN_FLIGHT, lower while admitted commands take longer than ~0.75 s); "
                                     "past it a command is answered \"opsbot is busy\".", registry=self.registry)
        self.execution_duration = Histogram("opsbot_execution_duration_seconds", "Time an action ran, by command and outcome.",
                                            ["command", "outcome"], registry=self.registry)

    def watch_pool(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """Export the PostgreSQL pool's own counters (psycopg_pool ``get_stats``): how many checkouts
        had to wait for a free connection and for how long, so a worker whose jobs queue for
        connections rather than for the database or the cluster shows it."""
        self.registry.register(_PoolCollector(stats))


class _PoolCollector(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.stats()
        yield CounterMetricFamily("opsbot_db_pool_checkouts", "Connections taken from opsbot's PostgreSQL pool.",
                                  value=s.get("requests_num", 0))
        yield CounterMetricFamily("opsbot_db_pool_checkouts_waited", "Checkouts that waited for a free connection.",
                                  value=s.get("requests_queued", 0))
        yield CounterMetricFamily("opsbot_db_pool_wait_seconds", "Time checkouts waited for a free connection.",
                                  value=s.get("requests_wait_ms", 0) / 1000)
        yield GaugeMetricFamily("opsbot_db_pool_size", "Connections open in the pool.", value=s.get("pool_size", 0))
