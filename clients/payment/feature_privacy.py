"""What protects the payment holder's features against the lender, and how its noise is calibrated.

The lender sees a user's features through two channels: (1) the noisy embedding of that user, sent every round
(a Gaussian release each time, no subsampling amplification: the lender knows who is in each exchange), and (2) the
payment model itself, trained on every training user and evaluated for the lender in every later embedding and in
every online answer. Channel (2) is the payment part's DP-SGD, a Poisson-sampled Gaussian whose sampling the lender
never sees (it is drawn from the payment holder's CSPRNG), so its amplified accounting holds against the lender too.
Both channels are charged to `payment.features@lender` and the embedding noise is calibrated so that their
composition meets `privacy.feature_epsilon`, together with the payment holder's DP standardisation statistics
(which ship in its model part). Without DP-SGD on the payment part channel (2) is unbounded, so the
config refuses feature protection without it.
"""

from __future__ import annotations

from typing import Any

from fedscore.shared.config import FedConfig, PrivacyConfig
from fedscore.shared.privacy import (
    CalibrationError,
    DpSgdRelease,
    calibrate_noise_multiplier,
    embedding_release,
    scaler_statistics_release,
)
from fedscore.shared.privacy.dp_sgd import DpSgdPlan, dp_sgd_rounds, part_release

GUARANTEE = "payment.features@lender"


def model_exposure(plan: DpSgdPlan, privacy: PrivacyConfig) -> DpSgdRelease:
    """One round of the payment part's DP-SGD, as the lender sees it through the embeddings."""
    return part_release(plan, plan.steps_per_round, protects="payment.features",
                        neighbouring=privacy.feature_neighbouring)


def plan_feature_noise(config: FedConfig, dpsgd: dict[str, Any] | None) -> float:
    """The embedding noise multiplier: given directly, or calibrated so that every planned embedding release and
    every planned DP-SGD round of the payment part compose to at most `feature_epsilon`."""
    privacy = config.privacy
    if privacy.feature_noise_multiplier is not None:
        return float(privacy.feature_noise_multiplier)
    assert privacy.feature_epsilon is not None and dpsgd is not None  # the config validator guarantees both
    plan = DpSgdPlan(**dpsgd)
    exposure: list = [model_exposure(plan, privacy)] * dp_sgd_rounds(config.training.rounds)["payment"]
    if privacy.dp_scaler:  # the scaler statistics, charged at setup, reach the lender too
        exposure.append(scaler_statistics_release(float(privacy.scaler_noise_multiplier), 1.0, "payment.features",
                                                  "outsider", privacy.feature_neighbouring))
    template = embedding_release(1.0, privacy.embedding_clip, config.training.rounds, privacy.feature_neighbouring)
    try:
        return float(calibrate_noise_multiplier(template, privacy.feature_epsilon, privacy.delta, already=exposure))
    except CalibrationError as exc:
        raise CalibrationError(
            f"privacy.feature_epsilon={privacy.feature_epsilon:g} cannot be met: the payment part's DP-SGD alone "
            f"already spends too much against the lender ({exc}); raise feature_epsilon or the DP-SGD noise") from exc
