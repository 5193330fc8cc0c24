"""The three coarse facts the payment holder adds to a score, per applicant, as they travel between the parties.

Why its own type: the payment side produces them (batch scoring or the gRPC service) and the lender side consumes
them (the credit limit), so both parties need the same shape without importing each other's code. When the payment
holder cannot compute them (its features lack the columns `fedscore.shared.scoring.scorecard.coarse_payment_signals`
needs, or the applicant is not one of its users) every applicant gets the neutral values: spend "mid", "stable", no
anomaly, i.e. the limit is neither raised nor cut on evidence that does not exist. (Missing applicants are flagged for
review by the lender rule anyway.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedscore.shared.scoring.scorecard import SPEND_LEVELS, STABILITIES

NEUTRAL_SPEND = "mid"
NEUTRAL_STABILITY = "stable"


@dataclass(frozen=True)
class PaymentSignals:
    """Per applicant: spend_level (low/mid/high), stability (stable/unstable), recent_spend_anomaly (bool)."""

    spend_level: np.ndarray
    stability: np.ndarray
    recent_spend_anomaly: np.ndarray

    def __post_init__(self) -> None:
        sizes = {len(self.spend_level), len(self.stability), len(self.recent_spend_anomaly)}
        if len(sizes) != 1:
            raise ValueError(f"payment signals of different lengths {sorted(sizes)}")
        for name, values, allowed in (("spend_level", self.spend_level, SPEND_LEVELS),
                                      ("stability", self.stability, STABILITIES)):
            unknown = set(np.asarray(values, dtype=object).tolist()) - set(allowed)
            if unknown:
                raise ValueError(f"unknown {name} {sorted(map(str, unknown))[:5]} (expected one of {list(allowed)})")

    def __len__(self) -> int:
        return len(self.spend_level)

    @classmethod
    def neutral(cls, n: int) -> PaymentSignals:
        return cls(np.full(n, NEUTRAL_SPEND, dtype=object), np.full(n, NEUTRAL_STABILITY, dtype=object),
                   np.zeros(n, dtype=bool))

    @classmethod
    def single(cls, spend_level: str, stability: str, recent_spend_anomaly: bool) -> PaymentSignals:
        return cls(np.array([spend_level], dtype=object), np.array([stability], dtype=object),
                   np.array([bool(recent_spend_anomaly)]))

    def take(self, rows: np.ndarray) -> PaymentSignals:
        """Rows by index; -1 (no such user) gives the neutral values."""
        rows = np.asarray(rows, dtype=np.int64)
        known = rows >= 0
        safe = np.where(known, rows, 0)
        neutral = PaymentSignals.neutral(len(rows))
        if len(self) == 0:
            return neutral
        return PaymentSignals(
            np.where(known, np.asarray(self.spend_level, dtype=object)[safe], neutral.spend_level),
            np.where(known, np.asarray(self.stability, dtype=object)[safe], neutral.stability),
            np.where(known, np.asarray(self.recent_spend_anomaly, dtype=bool)[safe], False))
