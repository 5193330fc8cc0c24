"""Every process a federation starts, in one group: started tied to their parent, watched, and stopped together.

Why: `fedscore federate` starts a dozen processes, and Flower starts more by name, some detached in sessions of
their own (the SuperLink's SuperExec and its ServerApp). Three things keep any of them from outliving the command:
each child is tied to its parent (PR_SET_PDEATHSIG: the kernel signals it when the parent dies, so the tree folds
from the top even after a SIGKILL), `ProcessGroup.stop` signals every process group it started and then every
process that inherited the federation's marker variable (found with psutil), and `stop_on_sigterm` turns a SIGTERM
(a service manager, a CI timeout, `kill`) into the same orderly stop as Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil

from fedscore.shared.atomic import write_text_atomic
from fedscore.shared.run_folder import RunFolder

PR_SET_PDEATHSIG = 1


def tie_to_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> None:
    """In the child: receive `sig` when the parent dies; if it already has (`parent_pid` given), now. A no-op
    elsewhere than Linux (the group's signals remain)."""
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


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Inside: SIGTERM raises KeyboardInterrupt like Ctrl-C, so the `with` blocks around it stop what they started
    instead of this process ending at once and leaving its children behind. The previous handler comes back after.
    Only the main thread can set a handler: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C must stop the federation even when this process was started with SIGINT ignored (a parent that ignores
    # it, such as a test runner's worker or a background job, passes that on through exec): the `with` blocks then
    # stop the children, which an ignored SIGINT would leave running to the end
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes (but this one) whose environment has name=value. Flower starts some helpers detached in their
    own sessions (the SuperLink's SuperExec and its ServerApp): they escape a process-group signal, but they all
    inherit the federation's FLWR_HOME."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        with suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get(name) == value:
                found.append(proc.pid)
    return found


def survivors(pids: dict[str, int], markers: tuple[str, ...] = ("fedscore", "flwr", "flower")) -> list[str]:
    """`name (pid N)` for each of `pids` that still runs (not a zombie) a command line naming one of `markers`."""
    alive = []
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if any(marker in cmdline for marker in markers):
            alive.append(f"{name} (pid {pid})")
    return alive


class ProcessError(RuntimeError):
    """A process of the group exited early; the message ends with its log."""


class ProcessGroup:
    """The processes of one federation (each in a session of its own, tied to this process, its output in
    `logs/<name>.log`); `pids.json` in `folder` names them, so a later resume can refuse while they still run."""

    def __init__(self, folder: Path, env: dict[str, str], marker: tuple[str, str],
                 error: type[Exception] = ProcessError) -> None:
        self.folder = folder
        self.logs = folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.marker = marker  # (name, value) of the environment variable every descendant inherits
        self.error = error
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.stop_rank: Callable[[str], int] = lambda name: 0  # lower ranks are stopped first

    def start(self, name: str, args: list[str], stdin: bytes | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                cwd=self.folder, preexec_fn=tied_preexec(), start_new_session=True,
                                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE)
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        self.processes.append((name, proc))
        write_text_atomic(self.folder / RunFolder.PIDS, json.dumps({n: p.pid for n, p in self.processes}))
        return proc

    def check_alive(self, allowed_to_exit: tuple[str, ...] = ()) -> None:
        for name, proc in self.processes:
            if proc.poll() is not None and name not in allowed_to_exit:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise self.error(f"{name} exited with code {proc.returncode}; its log ends:\n{tail}")

    def _stop_order(self) -> list[tuple[str, subprocess.Popen]]:
        return sorted(self.processes, key=lambda item: self.stop_rank(item[0]))

    def begin_stop(self) -> None:
        """SIGTERM to every process group, in stop order, without waiting (`stop` then waits)."""
        for _, proc in self._stop_order():
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop everything: SIGTERM (if `begin_stop` has not sent it), SIGKILL after the grace period, then any
        straggler in one of our groups or carrying the marker in its environment."""
        self.begin_stop()
        deadline = time.monotonic() + grace_s
        for _, proc in self._stop_order():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for _, proc in self.processes:  # stragglers Flower started in one of our groups (a ClientApp)
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in processes_with_env(*self.marker):  # and in its own sessions (the ServerApp)
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
