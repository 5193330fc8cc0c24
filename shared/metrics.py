"""Credit-model metrics: AUC, KS, Gini, log loss, Brier. Plain numpy so every party computes them the same way."""

from __future__ import annotations

import numpy as np


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.shape}) and scores ({p.shape}) differ in length")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y, p


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney) statistic, ties averaged."""
    y, p = _check(y, p)
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    # average ranks for ties
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from the highest score down."""
    y, p = _check(y, p)
    order = np.argsort(-p, kind="mergesort")
    y_sorted, p_sorted = y[order], p[order]
    distinct = np.r_[np.where(np.diff(p_sorted))[0], len(p) - 1]
    tps = np.cumsum(y_sorted)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / max(y.sum(), 1)]
    fpr = np.r_[0.0, fps / max(len(y) - y.sum(), 1)]
    return fpr, tpr


def ks(y: np.ndarray, p: np.ndarray) -> float:
    """Kolmogorov-Smirnov: the largest gap between the score CDFs of defaulters and non-defaulters."""
    fpr, tpr = roc_curve(y, p)
    return float(np.max(np.abs(tpr - fpr)))


def logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    y, p = _check(y, p)
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    y, p = _check(y, p)
    return float(np.mean((p - y) ** 2))


def all_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    a = auc(y, p)
    return {"auc": a, "ks": ks(y, p), "gini": 2 * a - 1, "logloss": logloss(y, p), "brier": brier(y, p)}


def curves(y: np.ndarray, p: np.ndarray, points: int = 200) -> dict[str, list[float]]:
    """ROC and KS curves thinned to about `points` points: aggregates the lender may share for the report
    (no per-user score leaves). population = share of users at or above each threshold."""
    y, p = _check(y, p)
    fpr, tpr = roc_curve(y, p)
    order = np.argsort(-p, kind="mergesort")
    sorted_p = p[order]
    distinct = np.r_[np.where(np.diff(sorted_p))[0], len(p) - 1]
    population = np.r_[0.0, (distinct + 1) / len(p)]
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(points, len(fpr))).round().astype(int))
    return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(), "population": population[keep].tolist()}
