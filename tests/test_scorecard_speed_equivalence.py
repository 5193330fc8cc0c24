"""The faster scorecard (tier by index, key-wise lookups, arrays instead of a DataFrame) gives exactly what the
previous implementation gave: the previous code is kept here verbatim as the reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedscore.shared.scoring.scorecard import (
    ScorecardParams,
    credit_limit,
    decision_arrays,
    decisions,
    points,
    tier,
)

# -- the implementation before the speed-up (shared/scoring/scorecard.py at 11549d7) ----------------------------------


def _old_lookup(values: np.ndarray, table: dict[str, float], what: str) -> np.ndarray:
    values = np.asarray(values, dtype=object)
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.float64)
    uniques, inverse = np.unique(values.astype(str), return_inverse=True)
    unknown = [u for u in uniques if u not in table]
    if unknown:
        raise ValueError(f"unknown {what} {unknown[:5]} (expected one of {list(table)})")
    return np.array([table[u] for u in uniques], dtype=np.float64)[inverse].reshape(values.shape)


def _old_credit_limit(tier_name, spend_level, stability, recent_spend_anomaly, blacklisted, params):
    if blacklisted is None:
        blacklisted = np.zeros(np.shape(tier_name), dtype=bool)
    t, s, st, anomaly, black = np.broadcast_arrays(
        np.asarray(tier_name, dtype=object), np.asarray(spend_level, dtype=object),
        np.asarray(stability, dtype=object), np.asarray(recent_spend_anomaly, dtype=bool),
        np.asarray(blacklisted, dtype=bool))
    limit = (_old_lookup(t, params.base_limits, "tier") * _old_lookup(s, params.spend_multipliers, "spend level")
             * _old_lookup(st, params.stability_multipliers, "stability"))
    limit = np.where(anomaly, limit * params.anomaly_multiplier, limit)
    limit = np.where(black, 0.0, np.floor(limit / params.limit_step + 1e-9) * params.limit_step)
    review = black | np.isin(t.astype(str), params.review_tiers)
    if params.review_on_anomaly:
        review = review | anomaly
    return limit, review


def _old_decisions(probability, spend_level, stability, recent_spend_anomaly, blacklisted, params):
    score = points(probability, params)
    tiers = tier(score, params)
    limit, review = _old_credit_limit(tiers, spend_level, stability, recent_spend_anomaly, blacklisted, params)
    return pd.DataFrame({"probability": np.asarray(probability, dtype=np.float64), "points": score, "tier": tiers,
                         "limit": limit, "review": review})


PARAMS = [ScorecardParams(),
          ScorecardParams(review_tiers=["D", "E"], review_on_anomaly=False, limit_step=250.0,
                          spend_multipliers={"low": 0.5, "mid": 1.1, "high": 1.7}, anomaly_multiplier=0.3)]


def _inputs(n: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)  # test inputs only
    probability = np.concatenate([rng.uniform(0, 1, n - 6), [0.0, 1.0, 1e-9, 0.5, 0.01, 0.99]])
    spend = rng.choice(np.array(["low", "mid", "high"], dtype=object), n)
    stability = rng.choice(np.array(["stable", "unstable"], dtype=object), n)
    anomaly = rng.uniform(size=n) < 0.1
    black = rng.uniform(size=n) < 0.05
    return probability, spend, stability, anomaly, black


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("with_blacklist", [True, False])
def test_decisions_equal_the_previous_implementation(params: ScorecardParams, with_blacklist: bool) -> None:
    probability, spend, stability, anomaly, black = _inputs(5000, seed=1)
    blacklisted = black if with_blacklist else None
    old = _old_decisions(probability, spend, stability, anomaly, blacklisted, params)
    new = decisions(probability, spend, stability, anomaly, blacklisted, params)
    pd.testing.assert_frame_equal(new, old, check_exact=True)
    arrays = decision_arrays(probability, spend, stability, anomaly, blacklisted, params)
    assert np.array_equal(arrays.points, old["points"].to_numpy())
    assert arrays.tier.tolist() == old["tier"].tolist()
    assert np.array_equal(arrays.limit, old["limit"].to_numpy())
    assert np.array_equal(arrays.review, old["review"].to_numpy())
    tiers = tier(points(probability, params), params)
    for got, want in zip(credit_limit(tiers, spend, stability, anomaly, blacklisted, params),
                         _old_credit_limit(tiers, spend, stability, anomaly, blacklisted, params), strict=True):
        assert np.array_equal(got, want)


def test_broadcast_single_values_and_unknown_levels_behave_as_before() -> None:
    params = ScorecardParams()
    probability = np.array([0.001, 0.2, 0.6])
    assert np.array_equal(decision_arrays(probability, "high", "stable", False, None, params).limit,
                          _old_decisions(probability, "high", "stable", False, None, params)["limit"].to_numpy())
    spend = np.array(["mid", "huge", "low"], dtype=object)
    with pytest.raises(ValueError, match=r"unknown spend level .*huge") as new:
        decisions(probability, spend, np.array(["stable"] * 3, dtype=object), np.zeros(3, bool), None, params)
    with pytest.raises(ValueError) as old:
        _old_decisions(probability, spend, np.array(["stable"] * 3, dtype=object), np.zeros(3, bool), None, params)
    assert str(new.value) == str(old.value)
    as_numpy_str = np.array(["mid", "low", "high"])  # str_ values, not Python str objects
    assert np.array_equal(decision_arrays(probability, as_numpy_str, "unstable", True, None, params).limit,
                          _old_decisions(probability, as_numpy_str, "unstable", True, None, params)["limit"]
                          .to_numpy())
