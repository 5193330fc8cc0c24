"""CPU microseconds per ID of each openmined-psi primitive, one thread, by data structure and fpr: the figures the
1M x 500k PSI time is extrapolated from when the shared machine's wall clock means little.

    nice -n 10 .venv/bin/python scripts/bench_psi_ops.py [--n 40000]

CPU time (time.process_time) is less sensitive to other load than wall time, though not immune: on a loaded
machine (shared cores, caches) it comes out higher than on an idle one.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import private_set_intersection.python as psi


def _cpu(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.process_time()
    result = fn()
    return result, time.process_time() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40_000)
    n = parser.parse_args(argv).n
    ids = [f"U{i:012d}" for i in range(n)]
    client, server = psi.client.CreateWithNewKey(True), psi.server.CreateWithNewKey(True)
    request, seconds = _cpu(lambda: client.CreateRequest(ids))
    out: dict[str, float] = {"request (hash to curve + blind) us": seconds / n * 1e6}
    response, seconds = _cpu(lambda: server.ProcessRequest(request))
    out["re-blind (payment, per lender ID) us"] = seconds / n * 1e6
    for name, kind in (("gcs", psi.DataStructure.GCS), ("raw", psi.DataStructure.RAW),
                       ("bloom", psi.DataStructure.BLOOM_FILTER)):
        for fpr in (1e-9, 1e-6):
            setup, seconds = _cpu(lambda kind=kind, fpr=fpr: server.CreateSetupMessage(fpr, n, ids, kind))
            out[f"setup {name} fpr {fpr:g} us"] = seconds / n * 1e6
            out[f"setup {name} fpr {fpr:g} bytes per ID"] = len(setup.SerializeToString()) / n
            if fpr == 1e-9:
                _, seconds = _cpu(lambda setup=setup: client.GetIntersection(setup, response))
                out[f"intersection {name} (unblind + look-up) us"] = seconds / n * 1e6
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
