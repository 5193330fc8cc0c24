import numpy as np
import pytest

from fedscore.shared.metrics import all_metrics, auc, ks


def _pairwise_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    p = np.round(rng.random(500) + 0.3 * y, 1)  # coarse scores: many ties
    assert auc(y, p) == pytest.approx(_pairwise_auc(y, p), abs=1e-12)


def test_ks_is_max_cdf_gap() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    p = rng.random(400) + 0.2 * y
    thresholds = np.unique(p)
    gaps = [abs((p[y == 1] >= t).mean() - (p[y == 0] >= t).mean()) for t in thresholds]
    assert ks(y, p) == pytest.approx(max(gaps), abs=1e-12)


def test_perfect_and_constant_scores() -> None:
    y = np.array([0, 0, 1, 1])
    m = all_metrics(y, np.array([0.1, 0.2, 0.8, 0.9]))
    assert m["auc"] == 1.0 and m["ks"] == 1.0 and m["gini"] == 1.0
    assert all_metrics(y, np.full(4, 0.5))["auc"] == 0.5
    with pytest.raises(ValueError, match="0 or 1"):
        auc(np.array([0, 2]), np.array([0.1, 0.2]))
