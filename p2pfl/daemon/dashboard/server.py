"""The dashboard's HTTP server: a Starlette app served by Hypercorn's trio worker on 127.0.0.1.

Every request needs the node's dashboard token (``DIR/dashboard.token``, mode 0600, so only
the user who runs the node can read it): as ``?token=`` in the URL (the page then keeps it in
a same-site cookie), as an ``Authorization: Bearer`` header, or as that cookie. Requests
whose ``Host`` is not the loopback address the server listens on are refused too, so a web
page the user visits cannot reach the dashboard by rebinding a DNS name to 127.0.0.1.

Routes: ``/`` the page, ``/static/...`` its assets (shipped in the package), ``/api/state``
everything the page shows, as JSON.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from p2pfl.daemon.dashboard.history import History
from p2pfl.daemon.dashboard.logtail import LogTail
from p2pfl.files import write_private_atomically

log = logging.getLogger("p2pfl.dashboard")
_HTTP_LOG = logging.getLogger("p2pfl.dashboard.http")
_HTTP_LOG.setLevel(logging.WARNING)  # not hypercorn's "Running on ... (CTRL + C to quit)"

TOKEN_FILE = "dashboard.token"
STATIC = Path(__file__).parent / "static"
HISTORY_EVERY_S = 2.0
COOKIE = "p2pfl_dashboard"

State = Callable[[], dict[str, Any]]


def load_or_create_token(home: Path) -> str:
    """The dashboard token of the node in ``home``, created (0600) on first use."""
    path = home / TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if len(token) >= 32:
            return token
        log.warning("%s is too short to be a token; writing a new one", path)
    token = secrets.token_urlsafe(32)
    write_private_atomically(path, token.encode() + b"\n")
    return token


def read_token(home: Path) -> str | None:
    """The token in ``home`` if there is one (for ``node status``), else None."""
    try:
        return (home / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def dashboard_url(port: int, token: str) -> str:
    return f"http://127.0.0.1:{port}/?token={token}"


class _Guard:
    """ASGI middleware: refuse requests without the token or for a foreign Host."""

    def __init__(self, app: ASGIApp, token: str, hosts: Callable[[], set[str]]) -> None:
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        problem = self._problem(conn)
        if problem is not None:
            status, text = problem
            await PlainTextResponse(text, status_code=status)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _problem(self, conn: HTTPConnection) -> tuple[int, str] | None:
        if conn.headers.get("host", "") not in self.hosts():
            return 403, "this dashboard only answers requests for its 127.0.0.1 address\n"
        header = conn.headers.get("authorization", "")
        offered = [
            conn.query_params.get("token", ""),
            header.removeprefix("Bearer ") if header.startswith("Bearer ") else "",
            conn.cookies.get(COOKIE, ""),
        ]
        if any(o and hmac.compare_digest(o.encode(), self.token.encode()) for o in offered):
            return None
        return 401, (
            "the dashboard needs its token: open the URL printed by "
            "`p2pfl node status --home DIR` (it ends in ?token=...)\n"
        )


class Dashboard:
    """The node's web page: history sampling, log tail and the HTTP server."""

    def __init__(self, home: Path, port: int, status: State, details: State) -> None:
        """``status()`` is the node's status dict (as ``node status --json``); ``details()``
        adds what only the page shows (peer table, checkpoints)."""
        self.home = home
        self.port = port
        self.token = load_or_create_token(home)
        self.history = History(HISTORY_EVERY_S)
        self.log_tail = LogTail()
        self._status = status
        self._details = details
        self.bound_port: int | None = None
        self._socket: socket.socket | None = None
        routes = [
            Route("/", self._index),
            Route("/api/state", self._state),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        self.app = _Guard(Starlette(routes=routes), self.token, self._hosts)

    @property
    def url(self) -> str | None:
        """The page's address with the token, once the server listens."""
        return None if self.bound_port is None else dashboard_url(self.bound_port, self.token)

    def _hosts(self) -> set[str]:
        port = self.bound_port
        return {f"127.0.0.1:{port}", f"localhost:{port}"}

    def state(self) -> dict[str, Any]:
        """Everything the page shows (``/api/state``)."""
        return {
            "status": self._status(),
            **self._details(),
            "history": self.history.as_dict(),
            "log": self.log_tail.lines(),
            "now": time.time(),
        }

    async def _index(self, request: Request) -> Response:
        response = FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})
        if request.query_params.get("token") == self.token:
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        return response

    async def _state(self, request: Request) -> Response:
        return JSONResponse(self.state(), headers={"Cache-Control": "no-store"})

    def bind(self) -> None:
        """Bind the port on 127.0.0.1 (raises OSError if it is taken); ``run`` serves it."""
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            raise
        self.bound_port = sock.getsockname()[1]
        self._socket = sock

    async def run(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the bound port (``bind`` first), report the URL through ``task_status``,
        sample the history, until cancelled."""
        if self._socket is None:
            raise RuntimeError("Dashboard.run() before bind()")
        config = Config()
        config.bind = [f"fd://{self._socket.detach()}"]  # hypercorn owns the socket from here
        self._socket = None
        config.accesslog = None
        config.errorlog = _HTTP_LOG
        config.graceful_timeout = 1.0
        node_log = logging.getLogger("p2pfl")
        node_log.addHandler(self.log_tail)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, self.app, config)
                nursery.start_soon(self._sample)
                log.info("dashboard at %s", self.url)
                task_status.started(self.url)
        finally:
            node_log.removeHandler(self.log_tail)

    async def _sample(self) -> None:
        while True:
            self.history.add(time.time(), self._status())
            await trio.sleep(self.history.interval)
