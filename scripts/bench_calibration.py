#!/usr/bin/env python
"""Accountant calls per noise calibration: fedscore's search (shared/privacy/calibrate.py::_smallest_meeting)
against plain doubling + bisection to the same tolerance, on k unsampled Gaussian releases (PLD, as the search
runs it). Each accountant call costs seconds of PLD or PRV, so calls are the figure that carries to any machine.

    python scripts/bench_calibration.py
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

os.environ.setdefault("FEDSCORE_ACCOUNTING_CACHE", "off")

from fedscore.shared.privacy.accounting import pld_epsilon
from fedscore.shared.privacy.calibrate import COARSE_DISCRETIZATION, _smallest_meeting
from fedscore.shared.privacy.mechanisms import embedding_release

DELTA, RTOL, COUNT = 1e-6, 1e-3, 5


def bisection(eps_of: Callable[[float], float], target: float, rtol: float) -> float:
    """The search before: a bracket by doubling from 1, then bisection in log space."""
    hi = 1.0
    while eps_of(hi) > target:
        hi *= 2.0
    lo = hi / 2.0
    while eps_of(lo) <= target:
        hi, lo = lo, lo / 2.0
    while hi / lo > 1.0 + rtol:
        mid = math.sqrt(lo * hi)
        if eps_of(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def main() -> None:
    print(f"{'target eps':>10} {'search':>10} {'calls':>6} {'seconds':>8} {'sigma':>9}")
    for target in (0.5, 2.0, 4.98, 8.0):
        for name, search in (("fedscore", _smallest_meeting), ("bisection", bisection)):
            calls = 0

            def eps_of(sigma: float) -> float:
                nonlocal calls
                calls += 1
                return pld_epsilon([embedding_release(sigma, 1.0, COUNT)], DELTA, discretization=COARSE_DISCRETIZATION)

            started = time.perf_counter()
            sigma = search(eps_of, target, RTOL)
            print(f"{target:>10} {name:>10} {calls:>6} {time.perf_counter() - started:>8.2f} {sigma:>9.4f}")


if __name__ == "__main__":
    main()
