"""Differential privacy for fedscore: mechanisms as records, the noise, accounting, calibration, budgets, DP-SGD.

Flow: a party builds a record (`mechanisms`), charges it to its own lifetime `Ledger` (`ledger`) before anything
leaves, and draws the noise (`noise`, `dp_sgd`) from a CSPRNG (`secure_random`). The operator's privacy report
(server/privacy_report.py) is built from the parties' ledgers, in a form a third party can recompute
(`accounting.recompute_from_report`). Opacus is imported lazily, inside the functions that run it (the PRV
accountant in `accounting`, DP-SGD in `dp_sgd`); `dp_sgd` is not re-exported here, so importing this package
never loads it.
"""

from fedscore.shared.privacy.accounting import (
    Guarantee,
    account,
    account_guarantee,
    epsilon_for,
    recompute_from_report,
)
from fedscore.shared.privacy.calibrate import (
    CalibrationError,
    calibrate_dp_sgd,
    calibrate_gaussian,
    calibrate_noise_multiplier,
    calibrate_noise_scale,
    calibrate_randomized_response,
    resolve_noise_multiplier,
)
from fedscore.shared.privacy.ledger import BudgetExceeded, Ledger
from fedscore.shared.privacy.mechanisms import (
    DpSgdRelease,
    GaussianRelease,
    Mechanism,
    RandomizedResponse,
    embedding_release,
    flip_probability,
    guarantee_key,
    label_gradient_release,
    mechanisms_from_dicts,
    scaler_statistics_release,
)
from fedscore.shared.privacy.noise import clip_rows, clipped_label_gradients, gaussian_release, randomized_response
from fedscore.shared.privacy.secure_random import NoiseSource, noise_source

__all__ = [
    "BudgetExceeded",
    "CalibrationError",
    "DpSgdRelease",
    "GaussianRelease",
    "Guarantee",
    "Ledger",
    "Mechanism",
    "NoiseSource",
    "RandomizedResponse",
    "account",
    "account_guarantee",
    "calibrate_dp_sgd",
    "calibrate_gaussian",
    "calibrate_noise_multiplier",
    "calibrate_noise_scale",
    "calibrate_randomized_response",
    "clip_rows",
    "clipped_label_gradients",
    "embedding_release",
    "epsilon_for",
    "flip_probability",
    "gaussian_release",
    "guarantee_key",
    "label_gradient_release",
    "mechanisms_from_dicts",
    "noise_source",
    "randomized_response",
    "recompute_from_report",
    "resolve_noise_multiplier",
    "scaler_statistics_release",
]
