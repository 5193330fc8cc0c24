"""Differential privacy for fedscore: mechanisms as records, the noise, accounting, calibration, budgets.

Flow: a party builds a record (`mechanisms`), charges it to its own `Ledger` before anything leaves, draws the
noise (`noise`), and the report lists every guarantee (`accounting.privacy_report`) in a form a third party can
recompute (`accounting.recompute_from_report`). See /work/shared/NOTES.md "Accounting" for the facts this follows.
Opacus is imported lazily (only the PRV accountant needs it).
"""

from shared.privacy.accounting import (
    Guarantee,
    account,
    account_guarantee,
    epsilon_for,
    guarantees_for,
    privacy_report,
    recompute_from_report,
)
from shared.privacy.calibrate import (
    CalibrationError,
    calibrate_dp_sgd,
    calibrate_gaussian,
    calibrate_noise_multiplier,
    calibrate_randomized_response,
    resolve_noise_multiplier,
)
from shared.privacy.ledger import BudgetExceeded, Ledger
from shared.privacy.mechanisms import (
    DpSgdRelease,
    GaussianRelease,
    Mechanism,
    RandomizedResponse,
    embedding_release,
    guarantee_key,
    label_gradient_release,
    mechanism_from_dict,
    mechanisms_from_dicts,
)
from shared.privacy.noise import clip_rows, clipped_label_gradients, gaussian_release, randomized_response

__all__ = [
    "BudgetExceeded",
    "CalibrationError",
    "DpSgdRelease",
    "GaussianRelease",
    "Guarantee",
    "Ledger",
    "Mechanism",
    "RandomizedResponse",
    "account",
    "account_guarantee",
    "calibrate_dp_sgd",
    "calibrate_gaussian",
    "calibrate_noise_multiplier",
    "calibrate_randomized_response",
    "clip_rows",
    "clipped_label_gradients",
    "embedding_release",
    "epsilon_for",
    "gaussian_release",
    "guarantee_key",
    "guarantees_for",
    "label_gradient_release",
    "mechanism_from_dict",
    "mechanisms_from_dicts",
    "privacy_report",
    "randomized_response",
    "recompute_from_report",
    "resolve_noise_multiplier",
]
