"""The one base class of the errors a user can cause or fix, and the exit codes of ``p2pfl``.

Every error p2pfl raises on purpose derives from ``P2pflError``; its message names the
problem and the fix. The command line catches it in one place (``p2pfl.cli``), prints
``error: <message>`` on stderr, without a traceback, and exits with the error's
``exit_code``:

* ``EXIT_OK`` (0): done.
* ``EXIT_FAILED`` (1): the input was fine but the work could not be done: no node is running
  to answer, a peer or the network failed, a file could not be written.
* ``EXIT_BAD_INPUT`` (2): a flag, spec, scenario, config, data file, manifest, invite,
  membership or checkpoint cannot be used; fix it and run again.

This module imports nothing, so the commands that only read files stay fast.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class P2pflError(Exception):
    """An error the user can act on; ``exit_code`` is what ``p2pfl`` exits with."""

    exit_code: int = EXIT_BAD_INPUT


class OperationError(P2pflError):
    """Valid input, but the operation failed (nothing to talk to, a failed peer or file)."""

    exit_code = EXIT_FAILED
