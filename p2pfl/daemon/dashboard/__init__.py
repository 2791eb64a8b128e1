"""The node's local web page: progress, traffic, peers, communities, log and checkpoints.

``open_dashboard`` prepares it beside a node daemon on 127.0.0.1; ``server.Dashboard`` is the
page's server, ``history.History`` the numbers over time, ``logtail.LogTail`` the last log
lines. Every asset (HTML, script, uPlot) ships in this package: the page loads nothing from
elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from p2pfl.daemon.config import ConfigError

if TYPE_CHECKING:
    from p2pfl.daemon.dashboard.server import Dashboard
    from p2pfl.daemon.node import NodeDaemon


def open_dashboard(daemon: NodeDaemon) -> Dashboard | None:
    """The dashboard of ``daemon``, its port bound on 127.0.0.1 (None if ``dashboard_port``
    is 0); run it with ``nursery.start(dashboard.run)``, which returns its URL. A port in use
    raises ConfigError."""
    from p2pfl.daemon.dashboard.server import Dashboard

    config = daemon.config
    if config.dashboard_port == 0:
        return None
    port = 0 if config.dashboard_port == "auto" else int(config.dashboard_port)
    dashboard = Dashboard(config.home, port, daemon.status, daemon.details)
    try:
        dashboard.bind()
    except OSError as exc:
        raise ConfigError(
            f"bad value for 'dashboard_port': cannot listen on 127.0.0.1:{port} ({exc}); "
            "pick a free port, 'auto' for any free port, or 0 to turn the dashboard off"
        ) from None
    return dashboard
