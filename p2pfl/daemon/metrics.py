"""Optional Prometheus endpoint on 127.0.0.1: the node's counters, read at scrape time.

The HTTP server runs in prometheus_client's own thread; it only reads plain numbers the
daemon keeps (never touches the model), so no locking is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

COUNTERS = {
    "step": "Local SGD steps taken",
    "syncs": "Model averages adopted",
    "bytes_sent": "Frame bytes sent and acknowledged",
    "bytes_received": "Frame bytes received",
    "rejected": "Inbound messages refused as invalid",
    "send_failures": "Outbound messages that could not be delivered",
}
GAUGES = {"peers": "Connected peers", "loss": "Training loss of the last step"}


class _NodeCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        values = self._read()
        for name, text in COUNTERS.items():
            yield CounterMetricFamily(f"p2pfl_{name}", text, value=values[name])
        for name, text in GAUGES.items():
            yield GaugeMetricFamily(f"p2pfl_{name}", text, value=values[name])


def serve_metrics(port: int, read: Callable[[], dict[str, Any]]) -> None:
    """Expose ``read()``'s numbers (keys of COUNTERS and GAUGES) on http://127.0.0.1:port/."""
    registry = CollectorRegistry()
    registry.register(_NodeCollector(read))
    start_http_server(port, addr="127.0.0.1", registry=registry)
