"""Re-run the lender's reconstruction attack (fedscore/audit/reconstruction.py) on finished runs and print the
excess over the final score, with and without inverting the lender's part, beside each view's pooled R^2.

The same code `fedscore audit RUN` runs, without the label attacks and one-run audits, and without writing into the
run folder: for runs recorded with audit.record_transcripts=true (every `fedscore experiment` run with attacks on).

    .venv/bin/python scripts/reaudit_reconstruction.py runs/exp-i18-own/runs/c00-*-s?-p?
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fedscore.audit.reconstruction import reconstruction_attack
from fedscore.audit.views import load_run


def main() -> None:
    for run in map(Path, sys.argv[1:]):
        start = time.perf_counter()
        excess = reconstruction_attack(load_run(run))["excess_over_score"]
        views = {name: round(row["pooled_r2"], 3) for name, row in excess["inputs"].items()}
        print(f"{run.parent.parent.name}/{run.name} excess {excess['excess']:.3f} plain {excess['plain_excess']:.3f} "
              f"{views} {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
