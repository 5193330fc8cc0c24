"""`python -m fedscore.supernode ...`: Flower's SuperNode with its hard-coded idle waits shortened, and a faster
start for the `flwr-clientapp` process Flower spawns for every message.

Why: flwr 1.42's SuperNode sleeps 3 s whenever a pull from the SuperLink finds no message, and waits for each
reply in 0.5 s steps (flwr/supernode/start_client_internal.py; no setting changes either). fedscore's protocol is a
chain of dependent messages, so nearly every message arrives at an idle node and waits ~1.5 s on average for
nothing. This launcher caps every sleep in that one module at `FEDSCORE_SUPERNODE_POLL_S` (default 0.1 s), then
runs Flower's own `flower-supernode` entry point with the same arguments: nothing else changes. The patch is
applied only to the flwr version it was written against; any other version runs unpatched, with a warning.

`clientapp_main` is Flower's own `flwr-clientapp` entry point, imported without its package's `__init__`, which
also imports the whole SuperNode CLI (~0.5 s of the ~1.1 s each per-message process spends starting). The local
launcher puts a `flwr-clientapp` script calling it first on the federation's PATH (fedscore/federation.py).
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

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


def clientapp_main() -> None:
    """`flwr-clientapp`, loaded without flwr/supernode/cli/__init__.py (same version guard as above)."""
    import importlib
    import types

    import flwr
    import flwr.supernode

    if flwr.__version__ == PATCHED_FLWR:
        package = types.ModuleType("flwr.supernode.cli")
        package.__path__ = [f"{flwr.supernode.__path__[0]}/cli"]
        sys.modules["flwr.supernode.cli"] = package
    entry = importlib.import_module("flwr.supernode.cli.flwr_clientapp").flwr_clientapp
    sys.argv[0] = "flwr-clientapp"
    sys.exit(entry())


CLIENTAPP_SCRIPT = """#!{python}
from fedscore.supernode import clientapp_main

clientapp_main()
"""


def main() -> None:
    shorten_idle_waits(float(os.environ.get("FEDSCORE_SUPERNODE_POLL_S", "0.1")))
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
