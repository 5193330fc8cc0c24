"""Offline, on finished runs: what the lender's own final part (model.lender_part = "gbdt") would have kept of the
lift, had the run scored with it instead of its DP top.

For each run folder (recorded with audit.record_transcripts=true and its references in parties/evaluation/): the last
partial logit the lender received for every aligned user, its clipped raw columns and its clean labels (the lender's
own), fitted by shared/model/lender_gbdt.py exactly as the lender party does after the last round (chosen on
validation), scored on the test users as the lift kept between the run's own tuned references. A logistic
regression on the same inputs is printed beside it. Local simulation only: it reads the lender's state.

    .venv/bin/python scripts/own_part_restack.py runs/exp-i18-gs4/runs/c00-*-s?-p?
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from fedscore.audit.views import load_run
from fedscore.shared.metrics import auc
from fedscore.shared.model.lender_gbdt import fit_lender_gbdt, gbdt_features
from fedscore.shared.protocol.splits import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL


def last_partial_logits(views) -> np.ndarray:
    view = views.lender_view
    rows = view["round"] == view["round"].max()
    index = {i: k for k, i in enumerate(views.aligned_ids)}
    received = np.zeros((len(views.aligned_ids), view["embedding"].shape[1]), dtype=np.float32)
    received[[index[str(i)] for i in view["id"][rows]]] = view["embedding"][rows]
    return received


def lift(value: float, low: float, high: float) -> float:
    return round((value - low) / (high - low), 3)


def main() -> None:
    for run in map(Path, sys.argv[1:]):
        views = load_run(run)
        record = json.loads((run / "parties/evaluation/references.json").read_text())
        low, high = record["lender_only_auc"], record["ceiling_auc"]
        lender = views.lender_state
        received = last_partial_logits(views)
        y, split = views.clean.astype(np.int64), views.split
        train, val, test = split == SPLIT_TRAIN, split == SPLIT_VAL, split == SPLIT_TEST
        features = gbdt_features(lender.raw[lender.rows].numpy(), received)
        fit = fit_lender_gbdt(features, y, train & ~views.canary, val)
        own = auc(y[test], fit.model.decision_function(features[test]))
        scaled = np.hstack([lender.x[lender.rows].numpy(), received])
        logistic = LogisticRegression(max_iter=2000).fit(scaled[train], y[train]).decision_function(scaled[test])
        print(f"{run.name}: run's own lift kept {record['lift_kept']:.3f}; own GBDT part {lift(own, low, high)}; "
              f"logistic on the same inputs {lift(auc(y[test], logistic), low, high)}", flush=True)


if __name__ == "__main__":
    main()
