"""What one gradient exchange's label channel lets a payment-side learner keep of the lift, without training.

Offline, on the operator's simulation data (both parties' columns and clean labels: local simulation only): the
payment holder's partial logit is fitted by ridge and by a regularised GBDT to the residual targets one exchange
carries (randomized response at eps 2, minus a logistic lender-only model's probability, plus Gaussian noise of
SIGMA), then stacked with the lender-only logit on validation users; the test AUC is scored as the lift kept
between the tuned references (fedscore/references.py). Two noise draws per keyed split. The draws here are seeded:
this is a measurement of a channel, not a release.

    .venv/bin/python scripts/label_channel_ceiling.py runs/uci-data 2.0
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, Ridge

from fedscore.baselines import _preprocessed, aligned_tables
from fedscore.references import References, tuned_references
from fedscore.shared.config import load_config
from fedscore.shared.metrics import auc

RR_EPSILON = 2.0


def lift(value: float, refs: References) -> float:
    return round((value - refs.lender_only_auc) / (refs.ceiling_auc - refs.lender_only_auc), 3)


def one_split(data: Path, sigma: float, k: int) -> dict[str, list[float]]:
    config = load_config(None)
    secret = hashlib.sha256(f"fedscore-split-{k}".encode()).digest()
    aligned, refs = aligned_tables(data, config, secret), tuned_references(data, config, secret)
    lender_x = _preprocessed(aligned.lender)[0][aligned.lender_rows]
    payment_scaled, payment_raw = (v[aligned.payment_rows] for v in _preprocessed(aligned.payment))
    y, split = aligned.labels, aligned.split
    train, val, test = split == 0, split == 1, split == 2
    lender_logit = LogisticRegression(max_iter=2000).fit(lender_x[train], y[train]).decision_function(lender_x)
    lender_p = 1 / (1 + np.exp(-lender_logit))
    results: dict[str, list[float]] = {}
    for draw in range(2):
        rng = np.random.default_rng(10 * k + draw)
        flip = rng.random(len(y)) < 1 / (1 + np.exp(RR_EPSILON))
        target = np.where(flip, 1 - y, y) - lender_p + rng.normal(0, sigma, len(y))
        learners = (("ridge", Ridge(alpha=30), payment_scaled),
                    ("gbdt", HistGradientBoostingRegressor(max_leaf_nodes=8, learning_rate=0.05, max_iter=100,
                                                           min_samples_leaf=400, l2_regularization=1.0,
                                                           early_stopping=False, random_state=0), payment_raw))
        for name, model, x in learners:
            partial = model.fit(x[train], target[train]).predict(x)
            both = np.c_[lender_logit, partial]
            stacked = LogisticRegression().fit(both[val], y[val]).decision_function(both[test])
            results.setdefault(name, []).append(lift(auc(y[test], stacked), refs))
    return results


def main() -> None:
    data, sigma = Path(sys.argv[1]), float(sys.argv[2])
    for k in (0, 1):
        print(data.name, f"split {k}", f"sigma {sigma}", one_split(data, sigma, k), flush=True)


if __name__ == "__main__":
    main()
