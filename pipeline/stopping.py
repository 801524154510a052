"""How a run is stopped from outside: Ctrl-C (SIGINT) or a scheduler's cancel (SIGTERM, `timeout`).

Both end the run KILLED; SIGTERM is raised as ``Terminated``, a KeyboardInterrupt, so every place
that already ends a run cleanly on Ctrl-C does so on SIGTERM too, and the run records which it was.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM: the run ends as on Ctrl-C (KILLED), exit code 143."""


def raise_terminated(signum, frame) -> None:
    raise Terminated


def interrupted_why(e: BaseException) -> str:
    """What a KILLED run records: which signal ended it."""
    return "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"


EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # the shell's codes for SIGINT and SIGTERM


def exit_code(e: KeyboardInterrupt) -> int:
    """A stopped command's exit status: 143 after SIGTERM, 130 after Ctrl-C."""
    return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM are ignored while the block runs: closing a run or writing its results must
    not stop half way, and the first signal already decided how the process ends. Signals are the
    main thread's; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
