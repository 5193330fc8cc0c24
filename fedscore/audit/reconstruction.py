"""The lender attacks the payment holder's features from the embeddings it received (lender_view.npz).

Threat model: the lender sees every embedding it received (after all noise) for every aligned user, and knows the
payment features of an auxiliary subset of them (AUX_FRACTION, e.g. customers of both who shared their statements).
It fits a regressor from a user's embeddings to each payment feature on the auxiliary users and predicts the rest.
Scored by R^2 per feature (the payment holder's scaled features, the model's own input) on the users outside the
auxiliary set, per exchange and pooled (every exchange's embedding of a user side by side). R^2 of 0 is what the
lender gets from the auxiliary means alone.

The lender also holds its own columns and, in the end, the final score of every user (which it must learn: it is
the product). So the question issue 18 asks is the EXCESS: the same attack given (its own columns + everything
received) against (its own columns + the final score), and, for reference, its own columns alone. An excess near 0
means the rounds before the last told the lender nothing about the payment columns that the score does not.

The lender also holds its own part, the function that turned its columns and the last partial logit into the score.
So the attack on the score goes through it too (`invert_partial_logit`): for each user, the partial logits that
give the user's score with the user's own columns. A regressor alone cannot undo a GBDT part's thresholds on the
partial logit, so without the inversion the excess measured the attacker's weakness, not what the score tells; both
figures are reported (`excess` with the inversion, `plain_excess` without).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedscore.audit.views import RunViews, lender_part
from fedscore.shared.model.parts import seeded
from fedscore.shared.model.preprocessing import Scaler
from fedscore.shared.protocol.splits import SPLIT_TRAIN

AUX_FRACTION = 0.2
MAX_AUX = 2000  # enough to fit the regressors; keeps the audit within minutes on UCI
INVERSION_GRID = 128  # partial-logit values the attacker tries per user: quantiles over the training users
EXCESS_BAR = 0.05  # issue 18: what everything received may add to the final score, in pooled R^2
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


def invert_partial_logit(part: Callable[[float], np.ndarray], score: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The lender's best guess of every user's partial logit from its own columns and final score, through its own
    part: `part(v)` is every user's score had the user sent `v` (the user's own columns fixed). Each user's guess is
    the mean of the `grid` values whose score comes nearest the user's (all of a piece where the part is flat in the
    partial logit: a tree's leaf cannot tell them apart)."""
    grid = np.asarray(grid, dtype=np.float64)
    distance = np.abs(np.stack([part(float(v)) for v in grid], axis=1) - np.asarray(score)[:, None])
    nearest = distance <= distance.min(axis=1, keepdims=True) + 1e-6 * (1 + np.abs(np.asarray(score)[:, None]))
    return (nearest * grid).sum(axis=1) / nearest.sum(axis=1)


def inversion_grid(last_received: np.ndarray, train: np.ndarray) -> np.ndarray:
    """INVERSION_GRID quantiles of the partial logit over the training users: what the lender's part was fitted on
    (a GBDT bins the column at its own quantiles), not any one user's value."""
    quantiles = (np.arange(INVERSION_GRID) + 0.5) / INVERSION_GRID
    return np.unique(np.quantile(last_received[train, 0], quantiles))


def _attack(inputs: np.ndarray, x: np.ndarray, aux: np.ndarray, rest: np.ndarray, seed: int) -> tuple[str, float]:
    """The better of ridge and an MLP: (regressor, pooled R^2 on the users outside the auxiliary set)."""
    guesses = _fit_predict(inputs[aux], x[aux], inputs[rest], seed, nonlinear=True)
    scored = {name: _r2(x[rest], guess)[1] for name, guess in guesses.items()}
    best = max(scored, key=lambda k: scored[k])
    return best, scored[best]


SCORE = "own columns + final score"
INVERTED = "own columns + final score, inverted through the lender's part"
RECEIVED = "own columns + everything received"


def excess_over_score(own: np.ndarray, score: np.ndarray, received: np.ndarray, x: np.ndarray, aux: np.ndarray,
                      rest: np.ndarray, seed: int, inverted: np.ndarray | None = None) -> dict[str, Any]:
    """Pooled R^2 of the payment columns `x` from the lender's `own` columns, from (own + final `score`), from
    (own + score + the partial logit `inverted` from them through the lender's part, when given) and from
    (own + score + inverted + everything `received`, every exchange side by side). `excess` = the last minus the
    better of the score's rows (issue 18's bar: <= 0.05), `plain_excess` the same without the inversion. Fitted on
    the `aux` users, scored on `rest`; the better of ridge and an MLP each time."""
    mean, std = own[aux].mean(0), own[aux].std(0) + 1e-9
    own = (own - mean) / std  # the regressors' scale, from the auxiliary users only
    score_view = np.hstack([own, score.reshape(len(own), 1)])
    views = {"own columns": own, SCORE: score_view}
    if inverted is not None:
        score_view = np.hstack([score_view, inverted.reshape(len(own), 1)])
        views[INVERTED] = score_view
    views[RECEIVED] = np.hstack([score_view, received])
    rows = {}
    for name, inputs in views.items():
        regressor, r2 = _attack(inputs, x, aux, rest, seed)
        rows[name] = {"regressor": regressor, "pooled_r2": r2}
    everything = rows[RECEIVED]["pooled_r2"]
    excess = everything - max(rows[name]["pooled_r2"] for name in (SCORE, INVERTED) if name in rows)
    return {"inputs": rows, "numbers_received_per_user": int(received.shape[1]), "excess": excess,
            "plain_excess": everything - rows[SCORE]["pooled_r2"], "inverted": inverted is not None,
            "bar": EXCESS_BAR, "within_bar": bool(excess <= EXCESS_BAR)}


def reconstruction_attack(views: RunViews) -> dict[str, Any]:
    state, lender = views.payment_state, views.lender_state
    names = Scaler(**state.scaler).columns  # each declared column once (its one-hot indicators derive from it)
    x = state.x[state.rows].numpy().astype(np.float64)[:, :len(names)]
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
    last = per_round[max(per_round)]
    part = lender_part(views)  # loaded once: the final score, then the inversion's many candidates
    score = part(last)  # the final model's logit for every aligned user: what the lender learns anyway
    inverted = None
    if last.shape[1] == 1:  # one partial logit per user: the lender can search it through its own part
        n = len(views.aligned_ids)
        inverted = invert_partial_logit(lambda v: part(np.full((n, 1), v)), score,
                                        inversion_grid(last, (views.split == SPLIT_TRAIN) & ~views.canary))
    return {"threat_model": THREAT, "auxiliary_users": len(aux), "evaluated_users": len(rest),
            "results": results, "chance": 0.0,
            "excess_over_score": excess_over_score(
                lender.x[lender.rows].numpy().astype(np.float64), score,
                np.concatenate(list(per_round.values()), axis=1), x, aux, rest, views.config.seed, inverted)}
