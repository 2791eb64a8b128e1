"""Errors are handled once, here: a ``P2pflError`` raised by any command is printed as
``error: <message>`` on stderr, without a traceback, and ``p2pfl`` exits with the error's
``exit_code`` (see ``p2pfl.errors`` and the README's "Exit codes"). An ``OSError`` (a file
that could not be read or written) exits with ``EXIT_FAILED``.

Every command group is made with ``command_group`` so each of them (the root and the ones
tests call directly) ends its commands the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from p2pfl.errors import EXIT_FAILED, P2pflError


def report_error(exc: P2pflError | OSError) -> typer.Exit:
    """Print ``exc`` for the user and return the ``Exit`` carrying its exit code."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[red]error:[/red] {escape(str(exc))}"
    )
    return typer.Exit(exc.exit_code if isinstance(exc, P2pflError) else EXIT_FAILED)


def run_script(main: Callable[[], None]) -> None:
    """Run a ``sim/`` script's ``main`` with the commands' error handling: a ``P2pflError``
    (a bad scenario, spec or schedule) or ``OSError`` is printed without a traceback and
    the script exits with its code."""
    try:
        main()
    except (P2pflError, OSError) as exc:
        raise SystemExit(report_error(exc).exit_code) from None


class _Commands(TyperGroup):
    """A command group that turns a ``P2pflError`` (or ``OSError``) into its message and
    exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (P2pflError, OSError) as exc:
            raise report_error(exc) from None


def command_group(**options: Any) -> typer.Typer:
    """A ``typer.Typer`` whose commands exit through ``report_error``."""
    return typer.Typer(cls=_Commands, pretty_exceptions_enable=False, **options)
