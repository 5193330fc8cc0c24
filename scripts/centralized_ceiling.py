"""How high can any model go on a data folder's splits? A tuned centralized GBDT, no privacy, all columns in one place.

Why: issue #13's AUC bars only mean something next to what the data allows. The run's own centralized baseline
fits one GBDT setting; this sweeps a grid of them on the same aligned users, features (each party's schema-clipped
raw values, as the baseline and the federation see them) and keyed splits as `fedscore experiment`, and reports
per split the test AUC of the setting chosen on validation and, as an upper bound no honest selection reaches, the
best test AUC over the grid.

    .venv/bin/python scripts/centralized_ceiling.py --data runs/uci-data --splits 2
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--splits", type=int, default=2)
    args = parser.parse_args()

    from sklearn.ensemble import HistGradientBoostingClassifier

    from fedscore.baselines import _preprocessed
    from fedscore.clients.lender.data import load_lender_table
    from fedscore.clients.payment.data import load_payment_table
    from fedscore.experiment import split_secrets
    from fedscore.shared.config import load_config
    from fedscore.shared.metrics import auc
    from fedscore.shared.protocol.splits import assign_splits, keyed_tokens

    config = load_config(None, [])
    payment = load_payment_table(args.data / "payment")
    lender, labels = load_lender_table(args.data / "lender")
    grid = list(itertools.product([0.03, 0.1], [7, 15, 31], [20, 200], [0.0, 1.0]))
    chosen, best = [], []
    for k, secret_hex in enumerate(split_secrets(args.splits)):
        secret = bytes.fromhex(secret_hex)
        common, l_rows, p_rows = np.intersect1d(keyed_tokens(lender.ids, secret), keyed_tokens(payment.ids, secret),
                                                return_indices=True)
        split = assign_splits(common, config.split.test_fraction, config.split.val_fraction, secret)
        raw = np.hstack([_preprocessed(lender)[1][l_rows], _preprocessed(payment)[1][p_rows]])
        y = labels[l_rows]
        train, val, test = split == 0, split == 1, split == 2
        results = []
        for lr, leaves, min_leaf, l2 in grid:
            model = HistGradientBoostingClassifier(learning_rate=lr, max_leaf_nodes=leaves, min_samples_leaf=min_leaf,
                                                   l2_regularization=l2, max_iter=1000, early_stopping=True,
                                                   validation_fraction=0.1, n_iter_no_change=30, random_state=0)
            p = model.fit(raw[train], y[train]).predict_proba(raw)[:, 1]
            results.append((auc(y[val], p[val]), auc(y[test], p[test]), (lr, leaves, min_leaf, l2)))
        by_val = max(results, key=lambda r: r[0])
        top = max(results, key=lambda r: r[1])
        chosen.append(by_val[1])
        best.append(top[1])
        print(f"split {k}: {len(common)} users; chosen on validation {by_val[2]}: test AUC {by_val[1]:.4f}; "
              f"best test AUC over the {len(grid)} settings {top[1]:.4f} {top[2]}", flush=True)
    print(f"median over splits: chosen {statistics.median(chosen):.4f}, best {statistics.median(best):.4f}")


if __name__ == "__main__":
    main()
