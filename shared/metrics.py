"""Credit-model metrics: AUC, KS, Gini, log loss, Brier, by scikit-learn, so every party computes them the same way
and nobody has to trust a home-made rank statistic.

scikit-learn is imported inside the functions: the command line needs `METRIC_KEYS`, not a second of imports.
`METRIC_KEYS` is the one list of what a run reports, in the order tables show it (runs, the CLI, report.html).
"""

from __future__ import annotations

import warnings

import numpy as np

METRIC_KEYS = ("auc", "ks", "gini", "logloss", "brier")
METRIC_LABELS = {"auc": "AUC", "ks": "KS", "gini": "Gini", "logloss": "log loss", "brier": "Brier"}  # table heads
LOGLOSS_CLIP = 1e-7  # probabilities are clipped to [eps, 1 - eps] so one confident miss is large, not infinite


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.shape}) and scores ({p.shape}) differ in length")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y, p


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve, ties averaged; NaN (not an error) when only one class is present."""
    y, p = _check(y, p)
    if len(y) == 0 or y.min() == y.max():
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from the highest score down, starting at (0, 0)."""
    y, p = _check(y, p)
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import roc_curve as sk_roc_curve

    with warnings.catch_warnings():  # a missing class is handled below
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, _ = sk_roc_curve(y, p, drop_intermediate=False)
    if not y.any():
        tpr = np.zeros_like(tpr)  # sklearn gives NaN rates for a missing class; 0 keeps KS defined
    if y.all():
        fpr = np.zeros_like(fpr)
    return fpr, tpr


def ks(y: np.ndarray, p: np.ndarray) -> float:
    """Kolmogorov-Smirnov: the largest gap between the score CDFs of defaulters and non-defaulters."""
    fpr, tpr = roc_curve(y, p)
    return float(np.max(np.abs(tpr - fpr)))


def logloss(y: np.ndarray, p: np.ndarray, eps: float = LOGLOSS_CLIP) -> float:
    y, p = _check(y, p)
    from sklearn.metrics import log_loss

    return float(log_loss(y, np.clip(p, eps, 1 - eps), labels=[0.0, 1.0]))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    y, p = _check(y, p)
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(y, p, labels=[0.0, 1.0]))


def all_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    a = auc(y, p)
    values = {"auc": a, "ks": ks(y, p), "gini": 2 * a - 1, "logloss": logloss(y, p), "brier": brier(y, p)}
    return {k: values[k] for k in METRIC_KEYS}


def curves(y: np.ndarray, p: np.ndarray, points: int = 200) -> dict[str, list[float]]:
    """ROC and KS curves thinned to about `points` points: aggregates the lender may share for the report
    (no per-user score leaves). population = share of users at or above each threshold."""
    y, p = _check(y, p)
    fpr, tpr = roc_curve(y, p)
    sorted_p = np.sort(p)[::-1]
    distinct = np.r_[np.where(np.diff(sorted_p))[0], len(p) - 1]
    population = np.r_[0.0, (distinct + 1) / len(p)]
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(points, len(fpr))).round().astype(int))
    return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(), "population": population[keep].tolist()}
