"""Tie a child process's life to its parent's (Linux), so nothing a federation starts outlives it.

Why: `fedscore federate` starts a dozen processes, and Flower starts more by name, some detached in their own
sessions (the SuperLink's SuperExec and its ServerApp). A teardown that signals process groups cannot reach those,
and if the command itself is SIGKILLed (a CI timeout, the OOM killer) there is no teardown at all. With
PR_SET_PDEATHSIG the kernel signals each child when its parent dies, so the whole tree folds from the top.
Elsewhere than Linux these are no-ops and the teardown's process-group signals remain.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def tie_to_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> None:
    """In the child: receive `sig` when the parent dies; if it already has (`parent_pid` given), now."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def tied_preexec(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A Popen preexec_fn tying the child to the calling process."""
    parent_pid = os.getpid()
    return lambda: tie_to_parent(sig, parent_pid)
