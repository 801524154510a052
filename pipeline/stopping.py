"""How a run is stopped from outside: Ctrl-C (SIGINT) or a scheduler's cancel (SIGTERM, `timeout`).

Both end the run KILLED; SIGTERM is raised as ``Terminated``, a KeyboardInterrupt, so every place
that already ends a run cleanly on Ctrl-C does so on SIGTERM too, and the run records which it was.
"""

from __future__ import annotations


class Terminated(KeyboardInterrupt):
    """SIGTERM: the run ends as on Ctrl-C (KILLED), exit code 143."""


def raise_terminated(signum, frame) -> None:
    raise Terminated


def interrupted_why(e: BaseException) -> str:
    """What a KILLED run records: which signal ended it."""
    return "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
