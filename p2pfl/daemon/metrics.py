"""Optional Prometheus endpoint on 127.0.0.1: the node's counters, read at scrape time.

The HTTP server runs in prometheus_client's own thread; it only reads plain numbers the
daemon keeps (never touches the model), so no locking is needed. Each community the node is
in has its own series, labelled with the community id: ``p2pfl_community_syncs_total
{community="<id>"}`` and so on.
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
COMMUNITY_COUNTERS = {
    "step": "Local SGD steps the community's core counted",
    "syncs": "Averages of the community's shared part adopted",
    "bytes_sent": "Sync frame bytes sent to the community's members and acknowledged",
    "bytes_received": "Sync frame bytes received from the community's members",
    "rejected": "Hellos and sync frames refused in the community",
    "send_failures": "Sync frames and hellos of the community that could not be delivered",
}
COMMUNITY_LABEL = "community"


class _NodeCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        values = self._read()
        for name, text in COUNTERS.items():
            yield CounterMetricFamily(f"p2pfl_{name}", text, value=values[name])
        for name, text in GAUGES.items():
            yield GaugeMetricFamily(f"p2pfl_{name}", text, value=values[name])
        communities = values["communities"]
        for name, text in COMMUNITY_COUNTERS.items():
            counter = CounterMetricFamily(f"p2pfl_community_{name}", text, labels=[COMMUNITY_LABEL])
            for community in communities:
                counter.add_metric([community["id"]], community[name])
            yield counter
        members = GaugeMetricFamily(
            "p2pfl_community_members",
            "Members admitted on their current connection",
            labels=[COMMUNITY_LABEL],
        )
        for community in communities:
            members.add_metric([community["id"]], len(community["members"]))
        yield members


def metrics_registry(read: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """The registry the endpoint serves: ``read()``'s numbers (keys of COUNTERS and GAUGES,
    and ``communities``: one dict per community with ``id``, ``members`` and the keys of
    COMMUNITY_COUNTERS)."""
    registry = CollectorRegistry()
    registry.register(_NodeCollector(read))
    return registry


def serve_metrics(port: int, read: Callable[[], dict[str, Any]]) -> None:
    """Expose ``metrics_registry(read)`` on http://127.0.0.1:port/."""
    start_http_server(port, addr="127.0.0.1", registry=metrics_registry(read))
