"""How high can any model go on a data folder's splits, and how high does the lender alone get? Tuned GBDTs.

Why: AUC bars only mean something next to what the data allows. This prints, per keyed split, the two tuned
references that `fedscore experiment` and local runs measure the lift kept between (fedscore/references.py): the
ceiling (a tuned centralized GBDT on all columns, no privacy) and the lender-only reference (the same tuning on the
lender's columns alone), each at the test AUC of the setting chosen on validation; and, as an upper bound no honest
selection reaches, the best test AUC over the grid.

    .venv/bin/python scripts/centralized_ceiling.py --data runs/uci-data --splits 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--splits", type=int, default=2)
    args = parser.parse_args()

    from fedscore.experiment import split_secrets
    from fedscore.references import GRID, tuned_references
    from fedscore.shared.config import load_config

    config = load_config(None, [])
    chosen, best, lender = [], [], []
    for k, secret_hex in enumerate(split_secrets(args.splits)):
        t0 = time.perf_counter()
        refs = tuned_references(args.data, config, secret_hex)
        top = max(refs.ceiling.sweep, key=lambda s: s.test_auc)
        chosen.append(refs.ceiling_auc)
        best.append(top.test_auc)
        lender.append(refs.lender_only_auc)
        print(f"split {k}: {refs.users} users ({refs.train}/{refs.val}/{refs.test}); "
              f"ceiling chosen on validation {refs.ceiling.setting.model_dump()}: test AUC {refs.ceiling_auc:.4f} "
              f"(val {refs.ceiling.val_auc:.4f}); best test AUC over the {len(GRID)} settings {top.test_auc:.4f}; "
              f"lender only {refs.lender_only_auc:.4f} (val {refs.lender_only.val_auc:.4f}, "
              f"{refs.lender_only.setting.model_dump()}); {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"median over splits: ceiling chosen {statistics.median(chosen):.4f}, best {statistics.median(best):.4f}, "
          f"lender only {statistics.median(lender):.4f}")


if __name__ == "__main__":
    main()
