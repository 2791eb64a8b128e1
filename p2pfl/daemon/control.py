"""Local control channel: one JSON request and one JSON reply per connection, newline-ended,
over a Unix socket ``DIR/control.sock`` that only the owner can open (mode 0600)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from p2pfl.errors import OperationError

SOCKET_NAME = "control.sock"
_MAX_REQUEST = 64 * 1024
_TIMEOUT_S = 5.0

Responder = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
"""Answers one request dict (``{"cmd": ...}``) with a reply dict."""


class ControlError(OperationError):
    """The control socket cannot be used; the message says why."""


def socket_path(home: Path) -> Path:
    return home / SOCKET_NAME


def request(home: Path, cmd: str, timeout: float = _TIMEOUT_S) -> dict[str, Any]:
    """Send ``{"cmd": cmd}`` to the node in ``home`` and return its reply (blocking)."""
    path = socket_path(home)
    if not path.exists():
        raise ControlError(f"no node is running in {home} (no {SOCKET_NAME})")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionRefusedError:
            raise ControlError(f"no node is running in {home} (stale {SOCKET_NAME})") from None
        except OSError as exc:
            raise ControlError(f"control socket {path}: {exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"the node in {home} sent an unreadable reply") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the node in {home} sent an unreadable reply")
    return reply


async def bind_socket(home: Path) -> trio.socket.SocketType:
    """Bind ``home/control.sock`` with mode 0600; refuse if a live node already owns it."""
    path = socket_path(home)
    if len(os.fsencode(path)) > 100:
        raise ControlError(f"{path} is too long for a Unix socket; use a shorter --home")
    if path.exists() or path.is_symlink():
        try:
            await trio.to_thread.run_sync(request, home, "ping", 1.0)
        except ControlError:
            path.unlink()
        else:
            raise ControlError(f"a node is already running in {home}; stop it first")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


async def serve(sock: trio.socket.SocketType, respond: Responder) -> None:
    """Answer requests on ``sock`` until cancelled; a bad client never stops the server."""
    listener = trio.SocketListener(sock)
    await trio.serve_listeners(lambda stream: _handle(stream, respond), [listener])


async def _handle(stream: trio.SocketStream, respond: Responder) -> None:
    async with stream:
        try:
            with trio.fail_after(_TIMEOUT_S):
                data = b""
                while not data.endswith(b"\n") and len(data) <= _MAX_REQUEST:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    data += chunk
                try:
                    req = json.loads(data)
                    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                        raise ValueError
                except ValueError:
                    reply: dict[str, Any] = {"error": 'expected {"cmd": "<command>"}'}
                else:
                    reply = await respond(req)
                await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
