"""One deadline-poll loop for everything that waits on another process or thread (a SuperLink, replies from the
SuperNodes, a service coming up), so each caller states only what it waits for, how long, and what to raise."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float, interval_s: float, what: str | Callable[[], str],
               error: type[Exception] = TimeoutError) -> T:
    """Call `predicate` until it returns something truthy, and return that; sleep `interval_s` between calls.

    It is called at least once, so a condition that already holds costs no sleep. If it is still falsy after
    `timeout_s`, raise `error("<what> within <timeout> s")`; `what` may be a callable, for a message that reports
    the last state seen. Whatever `predicate` raises (e.g. a helper process died) propagates at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise error(f"{what() if callable(what) else what} within {timeout_s:.0f} s")
        time.sleep(interval_s)


def exit_with_parent(parent: int) -> None:
    """For a composing worker process (its pool's initializer): exit once `parent`, the service that started it,
    is gone. A service killed with SIGKILL cannot stop its pool, and the idle worker would stay behind for good,
    holding a few hundred MB (one per kill, measured in the online benchmark's kill test). Here, in a module that
    imports nothing heavy, so a spawned worker is watching within a fraction of a second rather than after the
    privacy stack's import (~3 s); what it composes imports that when it first runs."""
    import os
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
