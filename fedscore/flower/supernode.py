"""`python -m fedscore.flower.supernode ...`: Flower's SuperNode with its hard-coded idle waits shortened, and the
launchers of the processes Flower starts by name, which start faster.

Why: flwr 1.42's SuperNode sleeps 3 s whenever a pull from the SuperLink finds no message, and waits for each
reply in 0.5 s steps (flwr/supernode/start_client_internal.py; no setting changes either). fedscore's protocol is a
chain of dependent messages, so nearly every message arrives at an idle node and waits ~1.5 s on average for
nothing. This launcher caps every sleep in that one module at `FEDSCORE_SUPERNODE_POLL_S` (default 0.1 s), then
runs Flower's own `flower-supernode` entry point with the same arguments: nothing else changes. Every patch is in
fedscore/flower/patches.py, under its one version guard; any other flwr version runs unpatched, with a warning.

`app_main` is Flower's own `flwr-clientapp` / `flwr-serverapp` entry point, imported without its package's
`__init__`, which also imports the whole SuperNode (SuperLink) CLI (~0.5 s of the ~1.1 s each per-message process
spends starting). `superexec_main` is Flower's `flower-superexec` whose ClientApp (ServerApp) processes are forked
from a warm fork server (fedscore/flower/forkserver.py), so a message does not wait for an interpreter to start at
all. The local launcher puts these scripts first on the federation's PATH (`LAUNCHER_SCRIPTS`, written by
fedscore/federation.py), where Flower finds them by name.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fedscore.flower.patches import APP_ENTRIES, light_entry, patch_superexec, shorten_idle_waits
from fedscore.flower.processes import tie_to_parent
from fedscore.shared.waiting import wait_until

FORKSERVER_ENV = "FEDSCORE_FORKSERVER"

# the launchers the local federation puts first on Flower's PATH (fedscore/federation.py)
LAUNCHER_SCRIPTS = {
    "flwr-clientapp": "#!{python}\nfrom fedscore.flower.supernode import app_main\n\napp_main()\n",
    "flwr-serverapp": "#!{python}\nfrom fedscore.flower.supernode import app_main\n\napp_main()\n",
    "flower-superexec": "#!{python}\nfrom fedscore.flower.supernode import superexec_main\n\nsuperexec_main()\n",
}


def app_main() -> None:
    """`flwr-clientapp` / `flwr-serverapp` (by the script's name) as a fresh process, with the lighter imports."""
    command = os.path.basename(sys.argv[0])
    entry = light_entry(command)
    sys.argv[0] = command
    entry()


def superexec_main() -> None:
    """`flower-superexec`; with FEDSCORE_FORKSERVER=flwr-clientapp (a fedscore SuperNode) or flwr-serverapp (its
    SuperLink) the processes of that command are forked from a warm fork server (fedscore/flower/forkserver.py)
    instead of started cold; everywhere, the SuperExec and the processes it starts die with their parent
    (fedscore/flower/processes.py)."""
    from fedscore.flower.forkserver import ForkServerExecutor, TiedSubprocessExecutor

    tie_to_parent()  # Flower starts the SuperLink's SuperExec detached: it goes when its SuperLink goes
    forked = os.environ.get(FORKSERVER_ENV, "")
    patch_superexec(lambda: ForkServerExecutor(forked) if forked in APP_ENTRIES else TiedSubprocessExecutor())
    from flwr.supercore.cli import flower_superexec

    sys.argv[0] = "flower-superexec"
    flower_superexec()


# a file the SuperNode waits for after its imports (the local launcher writes it once the node's key is registered)
AFTER_ENV = "FEDSCORE_SUPERNODE_AFTER"


def main() -> None:
    shorten_idle_waits(float(os.environ.get("FEDSCORE_SUPERNODE_POLL_S", "0.1")))
    from flwr.supernode.cli import flower_supernode

    if os.environ.get(AFTER_ENV):
        # a local federation starts its SuperNodes together with the SuperLink, so their imports (~1.5 s, more on a
        # loaded machine) overlap the SuperLink's start and the key registration instead of following them; the
        # node connects only once its key is registered
        gate = Path(os.environ[AFTER_ENV])
        try:
            wait_until(gate.exists, 120.0, 0.05, f"fedscore: {gate} (the SuperNode key registered) did not appear")
        except TimeoutError as exc:
            sys.exit(str(exc))
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
