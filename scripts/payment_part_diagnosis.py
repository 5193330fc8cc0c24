"""Offline, on finished runs (issue 18): how much of what the payment holder received its part extracted.

For each run recorded with audit.record_transcripts=true: the test AUC of the partial logit the lender last received,
alone; that of a logistic regression on the payment columns with clean labels (what the columns hold); and a ridge
regression fitted by the payment holder on the very gradients it received (its transcript, after all noise), then
restacked with the lender's own part exactly as the lender fits it, scored as the lift kept. The ridge has no DP of
its own: a diagnosis of the DP-SGD part, not a mechanism. Local simulation only: it reads both parties' states.

    .venv/bin/python scripts/payment_part_diagnosis.py runs/exp-i18-fate-own/runs/c00-*-s?-p?
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge

from fedscore.shared.metrics import auc
from fedscore.shared.model.lender_gbdt import fit_lender_gbdt, gbdt_features

sys.path.insert(0, str(Path(__file__).parent))
from own_part_restack import last_partial_logits, lift, offline_run, received_targets

RIDGE_ALPHAS = (1.0, 100.0, 1000.0)


def main() -> None:
    for run in map(Path, sys.argv[1:]):
        done = offline_run(run)
        views, y, train, val, test, low, high = done.views, done.y, done.train, done.val, done.test, done.low, done.high
        lender, payment = views.lender_state, views.payment_state
        xp = payment.x[payment.rows].numpy().astype(np.float64)
        received = last_partial_logits(views)[:, 0]
        columns = LogisticRegression(max_iter=2000).fit(xp[train], y[train]).decision_function(xp)
        rows, target = received_targets(views)
        ridge = []
        for alpha in RIDGE_ALPHAS:
            s = Ridge(alpha=alpha).fit(xp[rows], target).predict(xp)[:, None]
            features = gbdt_features(lender.raw[lender.rows].numpy(), s)
            model = fit_lender_gbdt(features, y, train, val).model
            ridge.append(f"ridge alpha {alpha:g}: AUC alone {auc(y[test], s[test, 0]):.3f}, lift kept "
                         f"{lift(auc(y[test], model.decision_function(features[test])), low, high)}")
        print(f"{run.name}: run's lift kept {done.record_lift:.3f}; partial logit received, AUC alone "
              f"{auc(y[test], received[test]):.3f}; payment columns' logistic regression "
              f"{auc(y[test], columns[test]):.3f} | " + " | ".join(ridge), flush=True)


if __name__ == "__main__":
    main()
