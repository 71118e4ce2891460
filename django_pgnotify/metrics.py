"""Prometheus metrics of a running listener (needs the ``prometheus`` extra).

Imported only when ``pgnotify_listen --metrics-port`` asks for it (an
``ImportError`` then says the extra is missing), so the core never needs
``prometheus-client``. Values are read from the listener at each
scrape; nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .listener import Listener

_COUNTER_HELP = {
    "received": "Notifications read from PostgreSQL on declared channels.",
    "dispatched": "Row changes sent as row_changed.",
    "receiver_errors": "row_changed receivers that raised.",
    "undecodable": (
        "Payloads the listener cannot read: notifications, or durable event rows (whose "
        "changes are dead letters)."
    ),
    "unconverted": (
        "Values passed on as sent because their field could not convert them (logged once "
        "per model and column)."
    ),
    "ignored": "Notifications of models this listener does not serve.",
    "own_changes": "Row changes skipped because this process made them.",
    "reconnects": "Times the listening connection was reopened.",
    "probes": "Self-probes that came back.",
    "probe_failures": "Self-probes that did not come back in time.",
    "queue_full": "Times the local queue filled up (backpressure).",
    "durable_claimed": "Durable changes claimed for dispatch, again on each new attempt.",
    "retries": "Durable changes whose receiver raised, scheduled for another attempt.",
    "dead_letters": "Durable changes that failed their last attempt (see the admin).",
    "durable_lost_leases": (
        "Durable changes left unsettled: no longer leased to the listener when it settled "
        "them (lease expired, or retried or discarded); they may be handled twice."
    ),
    "forwarded": "Row changes forwarded to the channel layer.",
    "forward_batches": "Channel layer messages sent (one per batch and group).",
    "forward_errors": "Channel layer sends that failed (retried with backoff).",
    "forward_dropped": "Messages dropped: queue full while the layer failed, or unsent at stop.",
}


_CONNECTED_HELP = "1 while the listener is listening."


class ListenerCollector(Collector):
    """A prometheus-client collector reading one listener's counters and gauges.

    Until ``listener`` is set (``pgnotify_listen`` waits for its database to
    answer before it makes one), only ``pgnotify_connected`` is reported, 0:
    an alert on it fires while the database is unreachable at start-up too.
    """

    def __init__(self, listener: Listener | None = None, using: str | None = None) -> None:
        self.listener = listener
        self.using = using  # the database label before the listener is set

    def collect(self) -> Iterator[Metric]:
        labels = ["database"]
        listener = self.listener
        if listener is None:
            gauge = GaugeMetricFamily("pgnotify_connected", _CONNECTED_HELP, labels=labels)
            gauge.add_metric([str(self.using)], 0.0)
            yield gauge
            return
        using = [listener.using]
        for key in listener.counters:
            family = CounterMetricFamily(f"pgnotify_{key}", _COUNTER_HELP[key], labels=labels)
            family.add_metric(using, listener.stats[key])
            yield family
        health = listener.health
        gauges = {
            "connected": (_CONNECTED_HELP, float(health.connected)),
            "last_event_lag_seconds": (
                "Seconds from trigger to end of dispatch, of the last event.",
                health.last_event_lag,
            ),
            "notification_queue_usage": (
                "pg_notification_queue_usage() when last sampled (0 to 1).",
                health.queue_usage,
            ),
            "local_queue": ("Notifications read but not dispatched yet.", health.local_queue),
        }
        for name, (text, value) in gauges.items():
            if value is None:
                continue
            gauge = GaugeMetricFamily(f"pgnotify_{name}", text, labels=labels)
            gauge.add_metric(using, float(value))
            yield gauge


def start_metrics_server(
    collector: ListenerCollector, port: int, addr: str = "0.0.0.0"
) -> ListenerCollector:
    """Serve ``/metrics`` from ``collector`` on ``addr:port`` from a daemon thread."""
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(port, addr=addr, registry=registry)
    return collector
