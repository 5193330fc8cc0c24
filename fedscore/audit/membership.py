"""An outsider attacks the released model: loss-threshold membership inference (Yeom et al. 2018).

Threat model: whoever holds the released model (both parts) and a user's records at both parties and clean label
guesses whether the user was a training user: a lower loss says "member". Scored by AUC on real training users
against held-out test users (same population, never trained on). Under (eps, delta)-DP no test of membership does
better than the DP trade-off curve, whose AUC is `dp_auc_ceiling` (e^eps / (1 + e^eps) for delta = 0).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fedscore.audit.views import RunViews, released_lender_output

THREAT = ("an outsider: both released model parts, and the features and true label of the users it tests")


def dp_auc_ceiling(epsilon: float | None, delta: float) -> float:
    """1 - the area under the (eps, delta)-DP trade-off curve f(a) = max(0, 1-delta-e^eps a, e^-eps (1-delta-a))."""
    if epsilon is None:
        return 1.0
    a = np.linspace(0, 1, 200_001)
    f = np.maximum.reduce([np.zeros_like(a), 1 - delta - math.exp(epsilon) * a,
                           math.exp(-epsilon) * (1 - delta - a)])
    return float(1 - np.trapezoid(f, a))


def losses(views: RunViews) -> np.ndarray:
    """The released model's log loss on every aligned user, with its clean label (canaries: their random one)."""
    from fedscore.shared.model.parts import payment_model

    config = views.config
    pay = views.payment_state
    xp = pay.x[pay.rows]
    bottom = payment_model(xp.shape[1], config)
    bottom.load_state_dict(pay.model)
    bottom.eval()
    with torch.no_grad():
        sent = bottom(xp).numpy()
    p = np.clip(released_lender_output(views, sent, "probability"), 1e-12, 1 - 1e-12)
    y = views.clean
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def canary_scores(views: RunViews, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the one-run audit of the release: (score per canary, > 0 guessing "it trained", and whether it did).
    The score is how far below the canaries' median loss its loss lies: a lower loss suggests training."""
    canary = views.canary
    return np.median(loss[canary]) - loss[canary], views.train[canary]


def membership_attack(views: RunViews, epsilon: float | None, delta: float,
                      loss: np.ndarray | None = None) -> dict[str, Any]:
    loss = losses(views) if loss is None else loss
    members, others = views.train & ~views.canary, views.test & ~views.canary
    truth = np.concatenate([np.ones(members.sum()), np.zeros(others.sum())])
    auc = float(roc_auc_score(truth, -np.concatenate([loss[members], loss[others]])))
    return {"threat_model": THREAT, "attack": "loss-threshold membership inference AUC", "value": auc,
            "chance": 0.5, "ceiling": dp_auc_ceiling(epsilon, delta), "members": int(members.sum()),
            "non_members": int(others.sum()), "dp_sgd": views.config.privacy.dp_sgd}
