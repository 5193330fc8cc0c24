"""The test suite. One OpenMP/BLAS thread per process, set here because this package is imported before
tests/conftest.py imports numpy, torch or sklearn (each reads it once, when its thread pool starts), and inherited by
every process a test starts (`fedscore` commands, Flower's SuperLink, SuperNodes and party workers).

Why: `make test` runs two xdist workers on a 2-core machine, and an OpenMP or BLAS pool with as many threads as cores
spins against the other worker: two processes fitting the lender's own GBDT part side by side took 24 CPU-s each
with the default threads and 2.1 CPU-s each with one (`tests6` branch, BENCHMARKS.md "Test tiers"). The product's
own fits (that part, the baselines, the references, the audit) now limit themselves; this covers whatever else a
test process runs. An operator's own setting wins (setdefault)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
