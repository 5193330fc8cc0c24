"""The lender's own part's grid (shared/model/lender_gbdt.py) fitted with the default OpenMP threads and with one,
alternating, three times: wall and CPU seconds of each. Synthetic, 3,000 users x 12 columns (test size).

    .venv/bin/python scripts/bench_lender_gbdt_threads.py
"""

from __future__ import annotations

import time

import numpy as np
from threadpoolctl import threadpool_limits

from fedscore.shared.model.lender_gbdt import fit_lender_gbdt


def main() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    x = rng.normal(size=(n, 12)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=n) > 1).astype(int)
    train = np.arange(n) % 5 != 0
    for rep in range(3):
        for label, limit in (("default threads", None), ("1 thread", 1)):
            wall, cpu = time.perf_counter(), time.process_time()
            with threadpool_limits(limit):  # None: no limit; the undecorated fit, so this limit decides
                fit_lender_gbdt.__wrapped__(x, y, train, ~train)
            print(rep, label, f"wall {time.perf_counter() - wall:.2f}s cpu {time.process_time() - cpu:.2f}s",
                  flush=True)


if __name__ == "__main__":
    main()
