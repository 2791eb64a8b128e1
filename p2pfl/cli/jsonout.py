"""``--json``: what a command printed for people, as one JSON document on stdout.

With ``--json`` stdout holds only that document; hints for people still go to stderr.
Exit codes do not change: 0 success, 1 the node cannot be reached or the work failed while
running, 2 bad input (the error on stderr names the problem and the fix).
"""

from __future__ import annotations

import json
from typing import Any

import typer

JSON = typer.Option(False, "--json", help="Print one JSON document on stdout instead.")


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))
