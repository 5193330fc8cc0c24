"""`python -m fedscore.flower.flwr_run [--health URL [--ca FILE]] [--after FILE] -- ARGS...`: Flower's own
`flwr ARGS...` (e.g. `run APP local --stream`, `supernode register KEY local`), its imports done at once, run as soon
as the SuperLink answers on URL (verified against the CA FILE when it serves TLS; not checked without --health) and
FILE exists.

Why: the `flwr` CLI spends ~1.5 s (5 s on a loaded machine) importing before it does anything. Started after the
SuperLink is healthy, that is on the critical path of every federation, twice (registering the SuperNode keys,
then the run); started together with the SuperLink, the party workers and the SuperNodes, it overlaps their start.
What it then does is exactly what `flwr ARGS` does.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import time
import urllib.request
from pathlib import Path


def superlink_healthy(url: str, ca: Path | None = None, check_hostname: bool = True) -> bool:
    """The SuperLink answers 200 on its health URL (over TLS verified against `ca` for https; `check_hostname`
    False for a wildcard bind reached at 127.0.0.1, which the certificate need not name: the CA is still checked)."""
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    if context is not None:
        context.check_hostname = check_hostname
    try:
        with urllib.request.urlopen(url, timeout=1, context=context) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def main(argv: list[str], wait_s: float = 120.0) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedscore.flower.flwr_run")
    parser.add_argument("--health", help="wait until the SuperLink answers here (default: do not check)")
    parser.add_argument("--ca", type=Path)
    parser.add_argument("--after", type=Path)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    from flwr.cli.app import app

    deadline = time.monotonic() + wait_s
    while not ((options.health is None or superlink_healthy(options.health, options.ca))
               and (options.after is None or options.after.exists())):
        if time.monotonic() > deadline:
            waited = [*([f"a SuperLink at {options.health}"] if options.health else []),
                      *([str(options.after)] if options.after else [])]
            print(f"fedscore: no {' and '.join(waited)} within {wait_s:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    sys.argv = ["flwr", *args]
    result = app()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
