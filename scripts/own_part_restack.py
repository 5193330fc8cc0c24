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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class OfflineRun:
    """A finished run as the offline scripts read it: both parties' views, the clean labels and the keyed split
    (canaries out of training), and the run's own references."""

    views: Any
    y: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    low: float  # the lender-only reference's test AUC
    high: float  # the ceiling's
    record_lift: float  # the lift the run itself kept


def offline_run(run: Path) -> OfflineRun:
    views = load_run(run)
    record = json.loads((run / "parties/evaluation/references.json").read_text())
    split = views.split
    return OfflineRun(views=views, y=views.clean.astype(np.int64), train=(split == SPLIT_TRAIN) & ~views.canary,
                      val=split == SPLIT_VAL, test=split == SPLIT_TEST, low=record["lender_only_auc"],
                      high=record["ceiling_auc"], record_lift=record["lift_kept"])


def received_targets(views) -> tuple[np.ndarray, np.ndarray]:
    """The payment holder's transcript of the gradients it received: the aligned rows of its users, and the targets
    a partial logit moves toward (the gradients negated)."""
    index = {i: k for k, i in enumerate(views.aligned_ids)}
    seen = views.payment_view  # one row per training user
    rows = np.array([index[str(i)] for i in seen["id"]])
    return rows, -seen["gradient"][:, 0].astype(np.float64)


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
