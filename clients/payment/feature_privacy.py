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

import math
from typing import Any

from fedscore.shared.config import FedConfig, PrivacyConfig
from fedscore.shared.privacy import (
    CalibrationError,
    DpSgdRelease,
    GaussianRelease,
    calibrate_noise_multiplier,
    calibrate_noise_scale,
    embedding_release,
    scaler_statistics_release,
)
from fedscore.shared.privacy.dp_sgd import DpSgdPlan, dp_sgd_rounds, part_release

GUARANTEE = "payment.features@lender"


def model_exposure(plan: DpSgdPlan, privacy: PrivacyConfig) -> DpSgdRelease:
    """One round of the payment part's DP-SGD, as the lender sees it through the embeddings."""
    return part_release(plan, plan.steps_per_round, protects="payment.features",
                        neighbouring=privacy.feature_neighbouring)


def part_exposure(config: FedConfig, dpsgd: dict[str, Any] | None) -> list:
    """What the payment part's own training costs against the lender over the run, seen through its partial logits
    and in model/: every planned round of its DP-SGD (`dpsgd`, its plan), or of its statistics fit."""
    privacy = config.privacy
    fits = dp_sgd_rounds(config.training.rounds)["payment"]
    if privacy.statistics_fit:
        from fedscore.shared.privacy.statistics_fit import StatisticsFitPlan, planned_fit_releases

        return planned_fit_releases(StatisticsFitPlan.from_privacy(privacy), fits, "payment.features", "outsider",
                                    privacy.feature_neighbouring)
    assert dpsgd is not None  # the config validator requires DP on the part with feature protection
    return [model_exposure(DpSgdPlan(**dpsgd), privacy)] * fits


def constant_first_release(config: FedConfig) -> bool:
    """Round 0's release is the constant 0 for every user (a partial logit whose head starts at zero): it depends
    on no one's data, so it needs no noise and costs nothing; the budget goes to the releases that do."""
    return config.model.payment_output == "partial_logit" and config.model.payment_head_init == "zero"


def feature_noise_schedule(config: FedConfig, final_sigma: float) -> list[float | None]:
    """The noise multiplier of every round's release (None: round 0's constant release, see
    `constant_first_release`), from the last round's: the same for every data-dependent release, or (with
    `feature_final_share` s) the earlier k of them noisier so that the last one holds s of the Gaussian budget:
    k/a^2 : 1/b^2 = (1-s) : s, i.e. a = b sqrt(k s / (1-s))."""
    rounds, share = config.training.rounds, config.privacy.feature_final_share
    first: list[float | None] = [None] if constant_first_release(config) else []
    k = rounds - len(first) - 1  # data-dependent releases before the last
    if share is None or k == 0:
        return [*first, *[final_sigma] * (k + 1)]
    early = final_sigma * math.sqrt(k * share / (1 - share))
    return [*first, *[early] * k, final_sigma]


def schedule_releases(config: FedConfig, final_sigma: float) -> list[GaussianRelease]:
    """The releases every planned round makes that carry users' data, as records (what the rounds will charge)."""
    privacy = config.privacy
    return [embedding_release(sigma, privacy.embedding_clip, 1, privacy.feature_neighbouring)
            for sigma in feature_noise_schedule(config, final_sigma) if sigma is not None]


def plan_feature_noise(config: FedConfig, dpsgd: dict[str, Any] | None) -> float:
    """The last round's embedding noise multiplier (the one scoring answers use too; earlier rounds' follow from
    it by `feature_noise_schedule`): given directly, or calibrated so that every planned embedding release and
    every planned DP-SGD round of the payment part compose to at most `feature_epsilon`."""
    privacy = config.privacy
    if privacy.feature_noise_multiplier is not None:
        return float(privacy.feature_noise_multiplier)
    assert privacy.feature_epsilon is not None  # the config validator guarantees it, and DP on the part
    exposure = part_exposure(config, dpsgd)
    if privacy.dp_scaler:  # the scaler statistics, charged at setup, reach the lender too
        exposure.append(scaler_statistics_release(float(privacy.scaler_noise_multiplier), 1.0, "payment.features",
                                                  "outsider", privacy.feature_neighbouring))
    try:
        releases = len(schedule_releases(config, 1.0))
        if privacy.feature_final_share is not None and releases > 1:
            return float(calibrate_noise_scale(lambda t: schedule_releases(config, t), privacy.feature_epsilon,
                                               privacy.delta, already=exposure))
        template = embedding_release(1.0, privacy.embedding_clip, releases, privacy.feature_neighbouring)
        return float(calibrate_noise_multiplier(template, privacy.feature_epsilon, privacy.delta, already=exposure))
    except CalibrationError as exc:
        raise CalibrationError(
            f"privacy.feature_epsilon={privacy.feature_epsilon:g} cannot be met: the payment part's training "
            f"(privacy.payment_fit = {privacy.payment_fit!r}) alone already spends too much against the lender "
            f"({exc}); raise feature_epsilon or that training's noise") from exc
