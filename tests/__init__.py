"""The test suite. One OpenMP/BLAS thread per process, set here because this package is imported before
tests/conftest.py imports numpy, torch or sklearn (each reads it once, when its thread pool starts), and inherited by
every process a test starts (`fedscore` commands, Flower's SuperLink, SuperNodes and party workers).

Why: `make test` runs two xdist workers on a 2-core machine, and each in-process run's lender fits its own GBDT part
(sklearn's HistGradientBoosting, OpenMP) with as many threads as cores, which then spin against the other worker:
two processes fitting the lender's part side by side took 24 CPU-s each with the default threads and 2.1 CPU-s each
with one (`tests6` branch, BENCHMARKS.md "Test tiers"). An operator's own setting wins (setdefault)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
