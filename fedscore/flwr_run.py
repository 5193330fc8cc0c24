"""`python -m fedscore.flwr_run HEALTH_URL ARGS...`: Flower's own `flwr ARGS...` (e.g. `run APP local --stream`),
its imports done at once, run as soon as the SuperLink answers on HEALTH_URL.

Why: the `flwr` CLI spends ~1.5 s (5 s on a loaded machine) importing before it submits a run. Started after the
SuperLink is healthy, that is on the critical path of every federation; started together with the SuperLink, the
party workers and the SuperNodes, it overlaps their start. What it submits is exactly what `flwr ARGS` submits.
"""

from __future__ import annotations

import sys
import time
import urllib.request


def superlink_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def main(argv: list[str], wait_s: float = 120.0) -> int:
    url, args = argv[0], argv[1:]
    from flwr.cli.app import app

    deadline = time.monotonic() + wait_s
    while not superlink_healthy(url):
        if time.monotonic() > deadline:
            print(f"fedscore: no SuperLink answered at {url} within {wait_s:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    sys.argv = ["flwr", *args]
    result = app()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
