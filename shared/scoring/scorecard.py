"""The credit product on top of a default probability: points, tiers, credit limits, review flags, reasons.

Why a points scale: lenders, auditors and applicants reason in points, not probabilities. The usual log-odds
scaling is used: `base_points` at good:bad odds `base_odds`, and every `pdo` points double the odds, so a
difference in points means the same change in risk anywhere on the scale.

Why the payment side enters only as coarse signals: the payment holder never shares transactions or individual
features. Beyond the learned embedding it contributes only three categorical facts per applicant (spend level,
spend stability, a recent-spend anomaly flag), computed by `coarse_payment_signals`, and the reason codes name the
embedding only as one factor, "payment_behaviour", never an individual payment feature.

Everything is vectorised numpy over applicants; the policy is a pydantic model so it can be stored in the manifest.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

SPEND_LEVELS = ("low", "mid", "high")
STABILITIES = ("stable", "unstable")
PAYMENT_FACTOR = "payment_behaviour"
P_CLIP = 1e-6


class ScorecardParams(BaseModel):
    """Scaling, tiering and limit policy. Defaults: 600 points at 50:1, 20 points to double the odds."""

    model_config = ConfigDict(extra="forbid")

    base_points: float = 600.0
    base_odds: float = Field(50.0, gt=0, description="good:bad odds that score base_points")
    pdo: float = Field(20.0, gt=0, description="points to double the odds")
    # Defaults are probability-of-default bands on the default scale (points = 600 + 20 * log2(odds / 50)):
    # A >= 620 is PD <= 1.0%, B >= 590 PD <= 2.7%, C >= 560 PD <= 7.4%, D >= 540 PD <= 13.8%, E above that.
    # (Cut-offs like 680/640 would put PD <= 0.12% in A and most of a ~7%-default book in E.)
    tiers: list[tuple[str, float]] = Field(
        default_factory=lambda: [("A", 620.0), ("B", 590.0), ("C", 560.0), ("D", 540.0)],
        description="(name, min points), best first; below the last min the applicant is in lowest_tier")
    lowest_tier: str = "E"
    base_limits: dict[str, float] = Field(
        default_factory=lambda: {"A": 50_000.0, "B": 30_000.0, "C": 15_000.0, "D": 5_000.0, "E": 0.0},
        description="credit limit per tier before the spend/stability adjustments")
    spend_multipliers: dict[str, float] = Field(
        default_factory=lambda: {"low": 0.6, "mid": 1.0, "high": 1.3},
        description="scale the limit to what the applicant actually spends: no point lending far beyond it")
    stability_multipliers: dict[str, float] = Field(default_factory=lambda: {"stable": 1.0, "unstable": 0.75})
    anomaly_multiplier: float = Field(0.5, ge=0, le=1, description="limit factor when recent spend is anomalous")
    review_on_anomaly: bool = True
    review_tiers: list[str] = Field(
        default_factory=lambda: ["E"],
        description="tiers always sent to a human: a decline is never fully automated (right to human review)")
    limit_step: float = Field(100.0, gt=0, description="limits are rounded down to a multiple of this")

    @model_validator(mode="after")
    def _consistent(self) -> ScorecardParams:
        names = [name for name, _ in self.tiers] + [self.lowest_tier]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        mins = [m for _, m in self.tiers]
        if any(a <= b for a, b in itertools.pairwise(mins)):
            raise ValueError(f"tier minimum points must be strictly decreasing (best tier first), got {mins}")
        for field, table, keys in (("base_limits", self.base_limits, names),
                                   ("spend_multipliers", self.spend_multipliers, SPEND_LEVELS),
                                   ("stability_multipliers", self.stability_multipliers, STABILITIES)):
            missing = [k for k in keys if k not in table]
            if missing:
                raise ValueError(f"{field} has no entry for {missing}")
            if any(v < 0 for v in table.values()):
                raise ValueError(f"{field} must not be negative")
        unknown = [t for t in self.review_tiers if t not in names]
        if unknown:
            raise ValueError(f"review_tiers {unknown} are not tiers ({names})")
        return self

    @property
    def factor(self) -> float:
        return self.pdo / math.log(2.0)

    @property
    def offset(self) -> float:
        return self.base_points - self.factor * math.log(self.base_odds)

    @property
    def tier_names(self) -> list[str]:
        """Best to worst, lowest tier last."""
        return [name for name, _ in self.tiers] + [self.lowest_tier]


_DEFAULT = ScorecardParams()


def points(probability: np.ndarray, params: ScorecardParams | None = None) -> np.ndarray:
    """Integer points: offset + factor * ln((1 - p) / p), p clipped to [1e-6, 1 - 1e-6] so 0 and 1 stay finite."""
    params = params or _DEFAULT
    p = np.clip(np.asarray(probability, dtype=np.float64), P_CLIP, 1.0 - P_CLIP)
    return np.rint(params.offset + params.factor * (np.log1p(-p) - np.log(p))).astype(np.int64)


def tier_index(score: np.ndarray, params: ScorecardParams | None = None) -> np.ndarray:
    """Per score, the index of its tier in `params.tier_names` (best first, lowest tier last)."""
    params = params or _DEFAULT
    ascending = np.array([m for _, m in params.tiers][::-1], dtype=np.float64)
    reached = np.searchsorted(ascending, np.asarray(score, dtype=np.float64), side="right")
    return len(params.tiers) - reached


def tier(score: np.ndarray, params: ScorecardParams | None = None) -> np.ndarray:
    """Tier name per score: the best tier whose minimum the score reaches, else `lowest_tier`."""
    params = params or _DEFAULT
    return np.array(params.tier_names, dtype=object)[tier_index(score, params)]


def _lookup(values: np.ndarray, table: dict[str, float], what: str) -> np.ndarray:
    """Vectorised dict lookup, with a clear error for unknown values.

    Fast path: one vectorised comparison per key (the tables have 2-5 keys; sorting a million strings to find the
    distinct ones cost more than the whole scorecard); only when some value equals no key verbatim does it fall back
    to comparing str() forms (and naming the unknown ones)."""
    values = np.asarray(values, dtype=object)
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.float64)
    out = np.empty(values.shape, dtype=np.float64)
    matched = np.zeros(values.shape, dtype=bool)
    for key, value in table.items():
        hit = np.asarray(values == key, dtype=bool)
        out[hit] = value
        matched |= hit
    if matched.all():
        return out
    uniques, inverse = np.unique(values.astype(str), return_inverse=True)
    unknown = [u for u in uniques if u not in table]
    if unknown:
        raise ValueError(f"unknown {what} {unknown[:5]} (expected one of {list(table)})")
    return np.array([table[u] for u in uniques], dtype=np.float64)[inverse].reshape(values.shape)


def credit_limit(tier_name: np.ndarray, spend_level: np.ndarray, stability: np.ndarray,
                 recent_spend_anomaly: np.ndarray, blacklisted: np.ndarray | None = None,
                 params: ScorecardParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(limit, review_flag) per applicant; inputs broadcast together.

    limit = base_limits[tier] * spend_multipliers[spend_level] * stability_multipliers[stability], then
    * anomaly_multiplier if recent spend is anomalous (and flagged for review: a sudden spend jump is a classic
    distress or fraud signal a model trained on history may not price), rounded down to `limit_step`.
    A blacklist hit overrides everything: limit 0 and review. Tiers in `review_tiers` are always reviewed.
    """
    params = params or _DEFAULT
    return _credit_limit(_lookup(np.asarray(tier_name, dtype=object), params.base_limits, "tier"),
                         np.isin(np.asarray(tier_name, dtype=object).astype(str), params.review_tiers), spend_level,
                         stability, recent_spend_anomaly, blacklisted, params)


def _credit_limit(base: np.ndarray, review_tier: np.ndarray, spend_level: np.ndarray, stability: np.ndarray,
                  recent_spend_anomaly: np.ndarray, blacklisted: np.ndarray | None,
                  params: ScorecardParams) -> tuple[np.ndarray, np.ndarray]:
    """`credit_limit` from each applicant's tier already looked up: its base limit, and whether it is a review tier
    (the same arithmetic, in the same order)."""
    if blacklisted is None:
        blacklisted = np.zeros(np.shape(base), dtype=bool)
    b, rt, s, st, anomaly, black = np.broadcast_arrays(
        np.asarray(base, dtype=np.float64), np.asarray(review_tier, dtype=bool), np.asarray(spend_level, dtype=object),
        np.asarray(stability, dtype=object), np.asarray(recent_spend_anomaly, dtype=bool),
        np.asarray(blacklisted, dtype=bool))
    limit = (b * _lookup(s, params.spend_multipliers, "spend level")
             * _lookup(st, params.stability_multipliers, "stability"))
    limit = np.where(anomaly, limit * params.anomaly_multiplier, limit)
    limit = np.where(black, 0.0, np.floor(limit / params.limit_step + 1e-9) * params.limit_step)
    review = black | rt
    if params.review_on_anomaly:
        review = review | anomaly
    return limit, review


def decisions(probability: np.ndarray, spend_level: np.ndarray, stability: np.ndarray,
              recent_spend_anomaly: np.ndarray, blacklisted: np.ndarray | None = None,
              params: ScorecardParams | None = None) -> pd.DataFrame:
    """points, tier, limit, review for each applicant: the whole product in one call."""
    params = params or _DEFAULT
    d = decision_arrays(probability, spend_level, stability, recent_spend_anomaly, blacklisted, params)
    return pd.DataFrame({"probability": np.asarray(probability, dtype=np.float64), "points": d.points,
                         "tier": d.tier, "limit": d.limit, "review": d.review})


@dataclass(frozen=True)
class DecisionArrays:
    """`decisions` as plain arrays (no DataFrame: scoring one applicant online, the frame cost more than the rest)."""

    points: np.ndarray  # int64
    tier: np.ndarray  # object (str)
    limit: np.ndarray  # float64
    review: np.ndarray  # bool


def decision_arrays(probability: np.ndarray, spend_level: np.ndarray, stability: np.ndarray,
                    recent_spend_anomaly: np.ndarray, blacklisted: np.ndarray | None = None,
                    params: ScorecardParams | None = None) -> DecisionArrays:
    """points, tier, limit, review: the same values as `decisions`, tiers looked up by index, not by name."""
    params = params or _DEFAULT
    score = points(probability, params)
    index = tier_index(score, params)
    names = params.tier_names
    base = np.array([params.base_limits[name] for name in names], dtype=np.float64)[index]
    review_tier = np.array([name in params.review_tiers for name in names], dtype=bool)[index]
    limit, review = _credit_limit(base, review_tier, spend_level, stability, recent_spend_anomaly, blacklisted,
                                  params)
    return DecisionArrays(points=score, tier=np.array(names, dtype=object)[index], limit=limit, review=review)


# -------------------------------------------------------------------------------------- coarse payment signals


class CoarseSignalRules(BaseModel):
    """Which payment feature columns feed the coarse signals, and the cut-offs.

    Columns (defaults are the names in fedscore.clients.payment.features): `spend_column` = log1p of the 12-month spend,
    `cv_column` = std/mean of the 12 monthly spend totals, `recent_column` = last-30-day spend / average month.
    Fixed cut-offs (not batch quantiles) so one applicant's signals do not depend on who else is scored with them.
    """

    model_config = ConfigDict(extra="forbid")

    id_column: str = "id"
    spend_column: str = "log_total_spend"
    cv_column: str = "monthly_spend_cv"
    recent_column: str = "recent_30d_spend_ratio"
    spend_is_log1p: bool = True
    low_spend_below: float = Field(5_000.0, description="12-month spend under this is 'low'")
    high_spend_from: float = Field(15_000.0, description="12-month spend at or above this is 'high'")
    stable_cv_below: float = Field(1.0, gt=0, description="monthly spend cv under this is 'stable'")
    anomaly_ratio_from: float = Field(3.0, gt=0, description="30-day spend >= this many average months")

    @model_validator(mode="after")
    def _ordered(self) -> CoarseSignalRules:
        if not 0 <= self.low_spend_below <= self.high_spend_from:
            raise ValueError("need 0 <= low_spend_below <= high_spend_from")
        return self

    @property
    def columns(self) -> list[str]:
        return [self.id_column, self.spend_column, self.cv_column, self.recent_column]


def coarse_payment_signals(features: pd.DataFrame, rules: CoarseSignalRules | None = None) -> pd.DataFrame:
    """[id, spend_level, stability, recent_spend_anomaly] from the payment holder's feature frame.

    Needs only `rules.columns`; extra columns are ignored. Conservative on missing or empty data: NaN spend is
    'low', NaN cv or no spend at all is 'unstable' (no history is no evidence of stability), NaN ratio is no anomaly.
    """
    rules = rules or CoarseSignalRules()
    missing = [c for c in rules.columns if c not in features.columns]
    if missing:
        raise ValueError(f"payment features lack column(s) {missing} needed for the coarse signals")
    spend = features[rules.spend_column].to_numpy(dtype=np.float64)
    if rules.spend_is_log1p:
        spend = np.expm1(spend)
    cv = features[rules.cv_column].to_numpy(dtype=np.float64)
    ratio = features[rules.recent_column].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        level = np.where(spend >= rules.high_spend_from, "high", np.where(spend >= rules.low_spend_below, "mid", "low"))
        stable = (cv < rules.stable_cv_below) & (spend > 0)
        anomaly = ratio >= rules.anomaly_ratio_from
    level = np.where(np.isnan(spend), "low", level)
    return pd.DataFrame({
        "id": features[rules.id_column].to_numpy(),
        "spend_level": pd.Categorical(level, categories=list(SPEND_LEVELS)),
        "stability": pd.Categorical(np.where(stable, "stable", "unstable"), categories=list(STABILITIES)),
        "recent_spend_anomaly": anomaly.astype(bool),
    })


# ---------------------------------------------------------------------------------------------- reason codes
# The contributions are computed by occlusion on the lender's ONNX part (fedscore.clients.lender.scoring): a factor's
# contribution is logit(applicant) - logit(applicant with that factor at its reference), where the reference is the
# value declared in the lender's schema for a lender feature and the zero embedding for the payment side. Here:
# only ranking them and wording them.


def reason_codes(contributions: np.ndarray, factor_names: list[str], top_k: int = 3) -> list[list[str]]:
    """Per applicant, up to `top_k` factor names that lowered the score most (largest positive contribution to the
    default logit), worst first; factors that helped the applicant are never given as reasons."""
    values = np.asarray(contributions, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(factor_names):
        raise ValueError(f"contributions shape {values.shape} does not match {len(factor_names)} factor names")
    order = np.argsort(-values, axis=1, kind="stable")[:, :top_k]
    taken = np.take_along_axis(values, order, axis=1) > 0
    names = np.asarray(factor_names, dtype=object)
    return [names[row[keep]].tolist() for row, keep in zip(order, taken, strict=True)]


# Known lender features: text for the risky direction seen (higher / lower than the reference applicant).
REASON_TEXTS: dict[str, dict[int, str]] = {
    "bureau_score": {-1: "lower than typical applicants", 1: "higher than typical applicants"},
    "existing_debt": {1: "existing debt higher than typical applicants",
                      -1: "existing debt lower than typical applicants"},
    "requested_amount": {1: "requested amount higher than typical applicants",
                         -1: "requested amount lower than typical applicants"},
    "income_band": {-1: "income band lower than typical applicants", 1: "income band higher than typical applicants"},
    "tenure_months": {-1: "shorter relationship than typical applicants",
                      1: "longer relationship than typical applicants"},
    "age": {-1: "age group associated with higher risk", 1: "age group associated with higher risk"},
}
PAYMENT_TEXT = "payment activity pattern associated with higher risk"


def reason_text(factor: str, direction: int = 0, texts: dict[str, dict[int, str]] | None = None) -> str:
    """"factor: why" for one reason; unknown features fall back to their name and the observed direction."""
    if factor == PAYMENT_FACTOR:
        return f"{factor}: {PAYMENT_TEXT}"
    known = (texts if texts is not None else REASON_TEXTS).get(factor, {})
    if direction in known:
        return f"{factor}: {known[direction]}"
    if direction:
        return f"{factor}: {'higher' if direction > 0 else 'lower'} than typical applicants"
    return f"{factor}: associated with higher risk"
