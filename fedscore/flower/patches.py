"""Every place fedscore reaches into Flower's private parts, under ONE exact-version guard.

Why one module: the patches speed Flower up without changing what it does (fedscore/flower/supernode.py,
forkserver.py), but each leans on a private name of the flwr version it was written against. On any other version
`patchable()` is False, every patch stands down (Flower runs as shipped, slower) and a warning says so once;
`tests/test_flower_patches.py` checks in a few seconds that every name listed in `PATCHED` still exists in the
installed flwr, so an upgrade fails a test instead of silently losing the speed-up.

The couplings:
- `flwr.supernode.start_client_internal.time`: its hard-coded 3 s idle sleeps, capped (`shorten_idle_waits`);
- `flwr.{supernode,superlink}.cli.*`: the per-message app entry points, imported without their package's
  `__init__` (`light_entry`);
- `flwr.supercore.superexec.run_superexec.get_executor` and the executor protocol: ClientApp processes forked from
  a warm server (`patch_superexec`, fedscore/flower/forkserver.py), and `task_argv`, the command line Flower's
  SubprocessExecutor builds;
- the command names Flower starts by name (`SHADOWED_COMMANDS`), which the local launcher shadows on PATH;
- `ErrorCode.NODE_UNAVAILABLE` (flwr's own constant) and the SuperNode's log lines when the SuperLink refuses it
  (`REFUSED_MARKERS`, fedscore/deploy.py).
"""

from __future__ import annotations

import importlib
import sys
import time
import types
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

PATCHED_FLWR = "1.42.0"

# (module, attribute) of every private flwr name a patch or glue reads or replaces
PATCHED: tuple[tuple[str, str], ...] = (
    ("flwr.supernode.start_client_internal", "time"),
    ("flwr.supernode.cli", "flower_supernode"),
    ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp"),
    ("flwr.superlink.cli.flwr_serverapp", "flwr_serverapp"),
    ("flwr.supercore.superexec.run_superexec", "get_executor"),
    ("flwr.supercore.constant", "ExecutorType"),
    ("flwr.supercore.constant", "TASK_TYPE_TO_COMMAND"),
    ("flwr.supercore.constant", "TASK_TYPE_TO_APPIO_API_ADDRESS_ARG"),
    ("flwr.supercore.superexec.executor.subprocess_executor", "SubprocessExecutor"),
    ("flwr.supercore.superexec.executor.types", "LaunchResult"),
    ("flwr.supercore.cli", "flower_superexec"),
    ("flwr.cli.app", "app"),
    ("flwr.common.constant", "ErrorCode"),
)

# per-task app commands Flower starts by name: (package, module) of their entry points
APP_ENTRIES = {
    "flwr-clientapp": ("flwr.supernode", "flwr_clientapp"),
    "flwr-serverapp": ("flwr.superlink", "flwr_serverapp"),
}
# what Flower starts by name and the local launcher puts first on PATH (fedscore/flower/supernode.py)
SHADOWED_COMMANDS = (*APP_ENTRIES, "flower-superexec")
# where flwr starts each shadowed command by name (checked by the test: a rename would bypass the launcher)
COMMAND_STARTED_IN = {
    "flwr-clientapp": "flwr.supercore.constant",
    "flwr-serverapp": "flwr.supercore.constant",
    "flower-superexec": "flwr.supernode.start_client_internal",
}
# flwr's SuperNode log when the SuperLink refuses it (node authentication), read by fedscore/deploy.py
REFUSED_MARKERS = ("Failed to activate SuperNode", "must be registered")

_warned: set[str] = set()


def patchable(what: str = "") -> bool:
    """True when the installed flwr is the version the patches were written against; else False, with a warning
    naming `what` stays as shipped (once per process and `what`)."""
    import flwr

    if flwr.__version__ == PATCHED_FLWR:
        return True
    if what and what not in _warned:
        _warned.add(what)
        print(f"fedscore: flwr {flwr.__version__} is not {PATCHED_FLWR}; {what} left as shipped", file=sys.stderr)
    return False


def node_unavailable() -> int:
    """Flower's error code for a node that missed its heartbeats."""
    from flwr.common.constant import ErrorCode

    return int(ErrorCode.NODE_UNAVAILABLE)


def shorten_idle_waits(cap_s: float) -> bool:
    """Cap the sleeps of flwr.supernode.start_client_internal at `cap_s`; True if the patch was applied."""
    if not patchable("SuperNode idle waits"):
        return False
    from flwr.supernode import start_client_internal

    start_client_internal.time = SimpleNamespace(  # type: ignore[attr-defined]
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_") and name != "sleep"},
        sleep=lambda seconds: time.sleep(min(seconds, cap_s)))
    return True


def light_entry(command: str) -> Callable[[], None]:
    """Flower's entry point for `command`, imported without its cli package's __init__.py, which imports every
    other command of that package too."""
    package_name, function = APP_ENTRIES[command]
    cli = f"{package_name}.cli"
    if patchable() and cli not in sys.modules:
        package = importlib.import_module(package_name)
        stub = types.ModuleType(cli)
        stub.__path__ = [f"{package.__path__[0]}/cli"]
        sys.modules[cli] = stub
    entry: Callable[[], None] = getattr(importlib.import_module(f"{cli}.{function}"), function)
    return entry


def patch_superexec(make_executor: Callable[[], Any]) -> bool:
    """Flower's SuperExec asks `run_superexec.get_executor` for its subprocess executor: answer with
    `make_executor()` (fedscore/flower/forkserver.py), every other executor type as Flower does."""
    if not patchable("the SuperExec's executor"):
        return False
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec

    flower_get_executor = run_superexec.get_executor

    def get_executor(executor_type: ExecutorType, *args: Any, **kwargs: Any) -> Any:
        if executor_type == ExecutorType.SUBPROCESS:
            return make_executor()
        return flower_get_executor(executor_type, *args, **kwargs)

    run_superexec.get_executor = get_executor  # type: ignore[assignment]
    return True


def task_argv(spec: Any) -> list[str]:
    """The command line Flower's SubprocessExecutor.launch builds for a task (flwr 1.42)."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND

    argv = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        argv.append("--insecure")
    elif spec.root_certificates_path is not None:
        argv += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        argv.append("--allow-runtime-dependency-installation")
    return argv
