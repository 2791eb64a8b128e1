"""Network namespaces made (and always removed) by a test: nodes on their own little LAN.

Needs root and iproute2 (``ip``); ``netns_or_skip`` skips a test elsewhere (and fails it
under CI, which runs as root). Every name carries the test process id, so parallel runs
and leftovers of a killed run never collide.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
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
            host_side, own_side = f"p{tag}b{i}", lan_interface(i)
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


def lan_interface(index: int) -> str:
    """The interface of member ``index`` of ``lan()`` on that LAN (inside its namespace)."""
    return f"p{os.getpid() % 100_000}n{index}"


def run_in(namespace: str) -> list[str]:
    """Prefix of a command that runs inside ``namespace`` (``ip netns exec`` execs: the
    process keeps its PID)."""
    return ["ip", "netns", "exec", namespace]


def nat_or_skip() -> None:
    netns_or_skip()
    if shutil.which("iptables") is None:
        if os.environ.get("CI"):
            pytest.fail("iptables is missing: `make test` installs it")
        pytest.skip("iptables is missing (apt-get install iptables)")


@contextmanager
def behind_nat(
    router: str, public_if: str, unreachable: Sequence[str] = ()
) -> Iterator[tuple[str, str]]:
    """A namespace on a private network (10.233.1.0/24) whose only way out is ``router``,
    which masquerades it behind its address on ``public_if`` and drops every connection
    opened from outside (a home router), and any packet from inside to the ``unreachable``
    addresses. Yields (namespace, private address)."""
    tag = os.getpid() % 100_000
    name = f"p2pfl-{tag}-nat"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        inside, outside = f"p{tag}in", f"p{tag}out"
        ip("link", "add", outside, "netns", router, "type", "veth", "peer", "name", inside,
           "netns", name)  # fmt: skip
        ip("-n", router, "addr", "add", "10.233.1.1/24", "dev", outside)
        ip("-n", router, "link", "set", outside, "up")
        ip("-n", name, "addr", "add", "10.233.1.2/24", "dev", inside)
        ip("-n", name, "link", "set", inside, "up")
        ip("-n", name, "route", "add", "default", "via", "10.233.1.1")
        rules = [
            ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
            ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", public_if, "-j", "MASQUERADE"],
            ["iptables", "-A", "FORWARD", "-i", public_if, "-o", outside, "-m", "conntrack",
             "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["iptables", "-A", "FORWARD", "-i", public_if, "-o", outside, "-j", "DROP"],
            *(["iptables", "-A", "FORWARD", "-i", outside, "-d", a, "-j", "DROP"]
              for a in unreachable),
        ]  # fmt: skip
        for rule in rules:
            subprocess.run(run_in(router) + rule, check=True, capture_output=True, timeout=30)
        yield name, "10.233.1.2"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def can_connect(namespace: str, address: str, port: int) -> bool:
    """Whether a TCP connection from ``namespace`` to ``address:port`` opens within 3 s."""
    probe = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({address!r}, {port}), timeout=3).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    import sys

    done = subprocess.run(run_in(namespace) + [sys.executable, "-c", probe], timeout=30)
    return done.returncode == 0
