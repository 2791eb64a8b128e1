"""Network namespaces made (and always removed) by a test: nodes on their own little LAN.

Needs root and iproute2 (``ip``); ``netns_or_skip`` skips a test elsewhere (and fails it
under CI, which runs as root). Every name carries the test process id, so parallel runs
and leftovers of a killed run never collide.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def netns_or_skip() -> None:
    problem = None
    if shutil.which("ip") is None:
        problem = "iproute2 (ip) is missing"
    elif os.geteuid() != 0:
        problem = "network namespaces need root"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def lan(count: int, subnet: str = "10.231.{}.{}") -> Iterator[list[tuple[str, str]]]:
    """``count`` namespaces on one bridge-less LAN: a veth pair for two, for more a bridge in
    the first namespace. Yields (namespace name, its IPv4 address) per member."""
    tag = os.getpid() % 100_000
    names = [f"p2pfl-{tag}-{i}" for i in range(count)]
    made: list[str] = []
    try:
        for name in names:
            ip("netns", "add", name)
            made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", names[0], "link", "add", "br0", "type", "bridge")
        ip("-n", names[0], "link", "set", "br0", "up")
        members = []
        for i, name in enumerate(names):
            host_side, own_side = f"p{tag}b{i}", f"p{tag}n{i}"
            ip("link", "add", host_side, "netns", names[0], "type", "veth", "peer", "name",
               own_side, "netns", name)  # fmt: skip
            ip("-n", names[0], "link", "set", host_side, "master", "br0", "up")
            address = subnet.format(0, i + 1)
            ip("-n", name, "addr", "add", f"{address}/24", "dev", own_side)
            ip("-n", name, "link", "set", own_side, "up", "multicast", "on")
            members.append((name, address))
        yield members
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def run_in(namespace: str) -> list[str]:
    """Prefix of a command that runs inside ``namespace`` (``ip netns exec`` execs: the
    process keeps its PID)."""
    return ["ip", "netns", "exec", namespace]
