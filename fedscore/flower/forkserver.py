"""A fork server for the per-message `flwr-clientapp` process Flower starts: the process is forked from a warm
parent instead of started from scratch.

Why: Flower runs every message in a fresh `flwr-clientapp` process (its SuperExec starts one per task). A fresh
interpreter spends ~0.6-1.1 s importing flwr before it even asks for its message, and fedscore's protocol is a
chain of dependent messages, so that start is paid on the critical path of every exchange. Here the SuperExec's
executor (`ForkServerExecutor`) hands each ClientApp task to one long-lived, single-threaded fork server that has
already imported flwr's `flwr-clientapp` entry point and fedscore's thin ClientApp; it forks, and the child runs
exactly Flower's own `flwr-clientapp` main with exactly the arguments Flower's SubprocessExecutor would have passed
(token, Runtime API address, TLS options, parent PID). Nothing about what the process does, or whom it talks to,
changes: only how it starts. Each message is still its own process with its own token.

Other task types (the ServerApp on the SuperLink's side) and any failure of the fork server fall back to plain
processes (`TiedSubprocessExecutor`: Flower's command lines, each process killed if its SuperExec dies). The
patch applies only to the flwr version it was written against (fedscore/flower/patches.py).

Wire between executor and fork server (its stdin/stdout pipes): one JSON line `{"argv": [...]}` per task, answered
by one line `{"pid": N}`. The fork server exits when its stdin closes (its SuperExec is gone).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from fedscore.flower.patches import light_entry, task_argv
from fedscore.flower.processes import tie_to_parent, tied_preexec

# what each forked command imports before its first task: Flower's entry point and the app Flower will load
WARM_MODULES = {
    "flwr-clientapp": ("fedscore.clients.flower_client", "fedscore.clients.worker",
                       "fedscore.shared.protocol.flower_codec"),
    "flwr-serverapp": ("fedscore.server.flower_server", "fedscore.server.coordinator", "fedscore.server.outcome",
                       "fedscore.shared.config", "fedscore.shared.protocol.flower_codec"),
}


def _warm_up(command: str) -> None:
    import importlib

    light_entry(command)
    for module in WARM_MODULES[command]:
        importlib.import_module(module)


def _run_child(command: str, argv: list[str], parent_pid: int) -> None:
    """In the forked child: become `COMMAND ARGV` and never return."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        tie_to_parent(signal.SIGKILL, parent_pid)
        # stdout is the pipe to the executor: the child's output goes to the node's log instead. The child stays
        # in the node's process group, so the federation's teardown reaches it.
        os.dup2(2, 1)
        sys.argv = [command, *argv]
        light_entry(command)()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # report, then fail like the real process
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(command: str) -> None:
    """The fork server's loop: one fork of `command` per task line on stdin."""
    _warm_up(command)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    out = sys.stdout
    print(f"fedscore fork server ready (pid {os.getpid()}): {command} processes are forked warm", file=sys.stderr,
          flush=True)
    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        argv = [str(a) for a in json.loads(line)["argv"]]
        pid = os.fork()
        if pid == 0:
            _run_child(command, argv, os.getppid())
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()


class TiedSubprocessExecutor:
    """Flower's SubprocessExecutor, but each task process is killed when its SuperExec dies
    (fedscore/flower/processes.py): the SuperLink starts its SuperExec detached, so a ServerApp would otherwise outlive
    a killed federation."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.flower = SubprocessExecutor()

    def get_eligible_capacity(self, supported_task_types: set[Any], **kwargs: Any) -> tuple[set[Any], set[str]]:
        return self.flower.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, task_type: Any = None, **kwargs: Any) -> None:
        self.flower.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.superexec.executor.types import LaunchResult

        quiet = subprocess.DEVNULL if spec.suppress_output else None
        subprocess.Popen(task_argv(spec), stdout=quiet, stderr=quiet, preexec_fn=tied_preexec(signal.SIGKILL))
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        self.flower.reconcile()

    def close(self) -> None:
        self.flower.close()


class ForkServerExecutor(TiedSubprocessExecutor):
    """Flower's Executor protocol (flwr/supercore/superexec/executor/types.py): ClientApp tasks are forked by the
    fork server, everything else is launched as a (tied) subprocess."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command
        self.lock = threading.Lock()
        self.server: subprocess.Popen[str] | None = subprocess.Popen(
            [sys.executable, "-m", "fedscore.flower.forkserver", command], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, preexec_fn=tied_preexec(signal.SIGTERM))
        assert self.server.stdout is not None
        if not self.server.stdout.readline():  # warm before the first task, or not at all
            self._give_up("it exited while warming up")

    def _give_up(self, why: str) -> None:
        print(f"fedscore fork server: {why}; {self.command} starts as plain processes", file=sys.stderr)
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
        self.server = None

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.superexec.executor.types import LaunchResult

        command, *argv = task_argv(spec)
        with self.lock:
            if command != self.command or self.server is None:
                return super().launch(spec)
            try:
                assert self.server.stdin is not None and self.server.stdout is not None
                self.server.stdin.write(json.dumps({"argv": argv}) + "\n")
                self.server.stdin.flush()
                if not self.server.stdout.readline():
                    raise BrokenPipeError("no answer")
            except (OSError, ValueError) as exc:
                self._give_up(f"it stopped answering ({exc})")
                return super().launch(spec)
            return LaunchResult.accepted()

    def reconcile(self) -> None:
        super().reconcile()
        if self.server is not None and self.server.poll() is not None:
            self._give_up(f"it exited with code {self.server.returncode}")

    def close(self) -> None:
        if self.server is not None:
            if self.server.stdin is not None:
                self.server.stdin.close()
            try:
                self.server.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.server.kill()
            self.server = None
        super().close()


if __name__ == "__main__":
    serve(sys.argv[1])
