"""The lender attacks the payment holder's features from the embeddings it received (lender_view.npz).

Threat model: the lender sees every embedding it received (after all noise) for every aligned user, and knows the
payment features of an auxiliary subset of them (AUX_FRACTION, e.g. customers of both who shared their statements).
It fits a regressor from a user's embeddings to each payment feature on the auxiliary users and predicts the rest.
Scored by R^2 per feature (the payment holder's scaled features, the model's own input) on the users outside the
auxiliary set, per exchange and pooled (every exchange's embedding of a user side by side). R^2 of 0 is what the
lender gets from the auxiliary means alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedscore.audit.views import RunViews
from fedscore.shared.model.parts import seeded
from fedscore.shared.model.preprocessing import Scaler

AUX_FRACTION = 0.2
MAX_AUX = 2000  # enough to fit the regressors; keeps the audit within minutes on UCI
THREAT = ("the lender: every embedding it received (after all noise) and the payment features of "
          f"{AUX_FRACTION:.0%} of the aligned users (at most {MAX_AUX})")


def _r2(truth: np.ndarray, guess: np.ndarray) -> tuple[np.ndarray, float]:
    sse = ((truth - guess) ** 2).sum(0)
    sst = ((truth - truth.mean(0)) ** 2).sum(0)
    keep = sst > 0
    per = np.where(keep, 1 - sse / np.where(keep, sst, 1), np.nan)
    return per, float(1 - sse[keep].sum() / sst[keep].sum())


def _fit_predict(h_aux: np.ndarray, x_aux: np.ndarray, h_rest: np.ndarray, seed: int,
                 nonlinear: bool) -> dict[str, np.ndarray]:
    """Ridge always; an MLP too where it matters most (the pooled view), to keep the audit within minutes."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Ridge
    from sklearn.neural_network import MLPRegressor

    guesses = {"ridge": Ridge(alpha=1.0).fit(h_aux, x_aux).predict(h_rest)}
    if nonlinear:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            guesses["mlp"] = MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=300, early_stopping=True,
                                          random_state=seed).fit(h_aux, x_aux).predict(h_rest)
    return guesses


def reconstruction_attack(views: RunViews) -> dict[str, Any]:
    state = views.payment_state
    names = Scaler(**state["scaler"]).columns  # each declared column once (its one-hot indicators derive from it)
    x = state["x"][state["rows"]].numpy().astype(np.float64)[:, :len(names)]
    real = np.flatnonzero(~views.canary)
    rng = np.random.default_rng(seeded(views.config.seed, "attacker", "aux-features"))
    aux = rng.choice(real, size=min(int(AUX_FRACTION * len(real)), MAX_AUX), replace=False)
    rest = np.setdiff1d(real, aux)
    index = {i: k for k, i in enumerate(views.aligned_ids)}
    view = views.lender_view
    per_round = {}
    for r in np.unique(view["round"]):
        rows = view["round"] == r
        h = np.zeros((len(views.aligned_ids), view["embedding"].shape[1]))
        h[[index[str(i)] for i in view["id"][rows]]] = view["embedding"][rows]
        per_round[int(r)] = h
    inputs: dict[Any, np.ndarray] = dict(per_round)
    if len(per_round) > 1:
        inputs["pooled"] = np.concatenate(list(per_round.values()), axis=1)
    results = []
    for exchange, h in inputs.items():
        guesses = _fit_predict(h[aux], x[aux], h[rest], views.config.seed,
                               nonlinear=exchange == "pooled" or len(inputs) == 1)
        best = max(guesses.items(), key=lambda item: _r2(x[rest], item[1])[1])
        per, pooled = _r2(x[rest], best[1])
        results.append({"exchange": "pooled over exchanges" if exchange == "pooled" else f"exchange {exchange}",
                        "regressor": best[0], "pooled_r2": pooled,
                        "per_feature_r2": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, per,
                                                                                                  strict=True)}})
    return {"threat_model": THREAT, "auxiliary_users": len(aux), "evaluated_users": len(rest),
            "results": results, "chance": 0.0}
