"""`python -m fedscore.supernode ...`: Flower's SuperNode with its hard-coded idle waits shortened, and a faster
start for the `flwr-clientapp` process Flower spawns for every message.

Why: flwr 1.42's SuperNode sleeps 3 s whenever a pull from the SuperLink finds no message, and waits for each
reply in 0.5 s steps (flwr/supernode/start_client_internal.py; no setting changes either). fedscore's protocol is a
chain of dependent messages, so nearly every message arrives at an idle node and waits ~1.5 s on average for
nothing. This launcher caps every sleep in that one module at `FEDSCORE_SUPERNODE_POLL_S` (default 0.1 s), then
runs Flower's own `flower-supernode` entry point with the same arguments: nothing else changes. The patch is
applied only to the flwr version it was written against; any other version runs unpatched, with a warning.

`app_main` is Flower's own `flwr-clientapp` / `flwr-serverapp` entry point, imported without its package's
`__init__`, which also imports the whole SuperNode (SuperLink) CLI (~0.5 s of the ~1.1 s each per-message process
spends starting). `superexec_main` is Flower's `flower-superexec` whose ClientApp (ServerApp) processes are forked
from a warm fork server (fedscore/forkserver.py), so a message does not wait for an interpreter to start at all.
The local launcher puts these scripts first on the federation's PATH (fedscore/federation.py), where Flower finds
them by name.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

PATCHED_FLWR = "1.42.0"


def shorten_idle_waits(cap_s: float) -> bool:
    """Cap the sleeps of flwr.supernode.start_client_internal at `cap_s`; True if the patch was applied."""
    import flwr
    from flwr.supernode import start_client_internal

    if flwr.__version__ != PATCHED_FLWR:
        print(f"fedscore: flwr {flwr.__version__} is not {PATCHED_FLWR}; SuperNode idle waits left as shipped",
              file=sys.stderr)
        return False
    start_client_internal.time = SimpleNamespace(  # type: ignore[attr-defined]
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_") and name != "sleep"},
        sleep=lambda seconds: time.sleep(min(seconds, cap_s)))
    return True


# per-task app commands Flower starts by name: (package, module, function) of their entry points
APP_ENTRIES = {
    "flwr-clientapp": ("flwr.supernode", "flwr_clientapp"),
    "flwr-serverapp": ("flwr.superlink", "flwr_serverapp"),
}


def light_entry(command: str) -> Callable[[], None]:
    """Flower's entry point for `command`, imported without its cli package's __init__.py, which imports every
    other command of that package too (same version guard as above)."""
    import importlib
    import types

    import flwr

    package_name, function = APP_ENTRIES[command]
    cli = f"{package_name}.cli"
    if flwr.__version__ == PATCHED_FLWR and cli not in sys.modules:
        package = importlib.import_module(package_name)
        stub = types.ModuleType(cli)
        stub.__path__ = [f"{package.__path__[0]}/cli"]
        sys.modules[cli] = stub
    entry: Callable[[], None] = getattr(importlib.import_module(f"{cli}.{function}"), function)
    return entry


def app_main() -> None:
    """`flwr-clientapp` / `flwr-serverapp` (by the script's name) as a fresh process, with the lighter imports."""
    command = os.path.basename(sys.argv[0])
    entry = light_entry(command)
    sys.argv[0] = command
    entry()


def superexec_main() -> None:
    """`flower-superexec`; with FEDSCORE_FORKSERVER=flwr-clientapp (a fedscore SuperNode) or flwr-serverapp (its
    SuperLink) the processes of that command are forked from a warm fork server (fedscore/forkserver.py) instead of
    started cold; everywhere, the SuperExec and the processes it starts die with their parent
    (fedscore/process_tie.py)."""
    import flwr

    from fedscore.process_tie import tie_to_parent

    tie_to_parent()  # Flower starts the SuperLink's SuperExec detached: it goes when its SuperLink goes
    if flwr.__version__ == PATCHED_FLWR:
        from flwr.supercore.constant import ExecutorType
        from flwr.supercore.superexec import run_superexec

        from fedscore.forkserver import ForkServerExecutor, TiedSubprocessExecutor

        flower_get_executor = run_superexec.get_executor
        forked = os.environ.get(FORKSERVER_ENV, "")

        def get_executor(executor_type: ExecutorType, *args: Any, **kwargs: Any) -> Any:
            if executor_type == ExecutorType.SUBPROCESS:
                return ForkServerExecutor(forked) if forked in APP_ENTRIES else TiedSubprocessExecutor()
            return flower_get_executor(executor_type, *args, **kwargs)

        run_superexec.get_executor = get_executor  # type: ignore[assignment]
    from flwr.supercore.cli import flower_superexec

    sys.argv[0] = "flower-superexec"
    flower_superexec()


FORKSERVER_ENV = "FEDSCORE_FORKSERVER"

# the launchers the local federation puts first on Flower's PATH (fedscore/federation.py)
LAUNCHER_SCRIPTS = {
    "flwr-clientapp": "#!{python}\nfrom fedscore.supernode import app_main\n\napp_main()\n",
    "flwr-serverapp": "#!{python}\nfrom fedscore.supernode import app_main\n\napp_main()\n",
    "flower-superexec": "#!{python}\nfrom fedscore.supernode import superexec_main\n\nsuperexec_main()\n",
}


def main() -> None:
    shorten_idle_waits(float(os.environ.get("FEDSCORE_SUPERNODE_POLL_S", "0.1")))
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
