"""The payment holder attacks the lender's labels from what it received (RUN_DIR/transcripts/payment_view.npz).

Threat model: the payment holder sees every gradient the lender sent (after all noise), knows the public run config
(seed included) and the labels of a few dozen training users (KNOWN_LABELS, e.g. its own staff who borrowed), and
holds its own bottom model and features. It never sees the lender's state.

- norm attack (Li et al., ICLR 2022): a defaulter's gradient is larger, |p_i - y_i| with p_i mostly small; score
  ||g_i||;
- cosine (direction) attack (Li et al.): gradients of one class point one way; score cos(g_i, r), r the known
  defaulters' mean gradient minus the known non-defaulters' (Li et al. use one known defaulter's gradient; the
  difference keeps the orientation when randomized response has flipped some of the known users' labels);
- principal-direction attack (ours): score g_i . u, u the top right singular vector of all of that exchange's
  gradients, oriented by r; for a linear top every clean gradient lies on one line, and under isotropic noise the
  projection keeps the signal the cosine's noisy denominator dilutes;
- label inference: guess "default" when that cosine is positive (accuracy against the clean labels);
- replay: recompute the randomized-response flips from the public seed, as a regression to a seeded generator (or
  the VOID replayable test mode) would allow, and undo them (in the replayable mode the gradient noise too);
- model completion (Fu et al., USENIX Security 2022): a logistic head on the payment holder's own final bottom model,
  fitted on the known labels, applied to the other training users and to held-out users (features alone predict
  defaults, so the leak is the gap between the two).

Each score attack is reported at its better orientation, max(AUC, 1 - AUC): which way a score points is one bit,
and an attacker who orients by the known users' few labels can get it wrong where one who orients by the base rate
(defaulters are the minority) would not; an AUC of 0.40 is a leak of 0.60, never "below chance".
Each is scored per exchange and pooled over exchanges, on real training users (canaries and known users excluded).
R rounds make R-1 exchanges (rounds 0..R-2): the lender computes no gradients in the last round (nobody would receive
them), so the payment holder's transcript holds every gradient that exists; none sits unaudited elsewhere.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fedscore.audit.views import RunViews
from fedscore.clients.state import NoiseLabel
from fedscore.shared.model.parts import seeded
from fedscore.shared.privacy.secure_random import NoiseSource

KNOWN_LABELS = 40
# the report rows' names (experiment.py turns them into results.csv columns)
SCORE_ATTACKS = {"norm": "norm attack AUC", "cosine": "cosine attack AUC",
                 "principal": "principal-direction attack AUC"}
LABEL_INFERENCE = "label inference (cosine > 0) accuracy"
THREAT = ("the payment holder: every gradient it received (after all noise), the public run config and seed, its "
          f"own model and features, and the labels of {KNOWN_LABELS} training users")


def rr_ceiling(epsilon: float | None) -> float:
    """The best accuracy (and AUC) any attack can reach on a label released by eps randomized response."""
    return 1.0 if epsilon is None else math.exp(epsilon) / (1 + math.exp(epsilon))


def replayed_flip_masks(seed: int, n_train: int, epsilon: float) -> dict[str, np.ndarray]:
    """Every way the flip mask could be recomputed from public values: the torch generator seeded from `seed` (the
    defect an audit found once) and the VOID replayable stream. Under the CSPRNG both are unrelated to the real
    flips."""

    flip_p = 1 / (1 + math.exp(epsilon))
    seeded_torch = torch.rand(n_train, generator=torch.Generator().manual_seed(
        seeded(seed, "lender", NoiseLabel.RANDOMIZED_RESPONSE)), dtype=torch.float64) < flip_p
    replay = NoiseSource.replayable_from(seed, "lender", NoiseLabel.RANDOMIZED_RESPONSE).bernoulli((n_train,),
                                                                                               flip_p)
    return {"seeded torch generator": seeded_torch.numpy(), "replayable stream": replay.numpy()}


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def known_users(views: RunViews, n: int = KNOWN_LABELS) -> np.ndarray:
    """Aligned positions of the real training users whose labels the attacker is granted (at least one of each)."""
    candidates = np.flatnonzero(views.train & ~views.canary)
    rng = np.random.default_rng(seeded(views.config.seed, "attacker", "known-labels"))
    for _ in range(100):
        chosen = rng.choice(candidates, size=min(n, len(candidates)), replace=False)
        if 0 < views.clean[chosen].sum() < len(chosen):
            return np.sort(chosen)
    raise ValueError("too few training users of each class for the attacker's known labels")


Denoise = Callable[[int, np.ndarray], np.ndarray]  # (round, gradients as received) -> gradients an attacker uses


def exchanges(views: RunViews, denoise: Denoise | None = None) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(round, aligned positions, gradients) per exchange the payment holder received."""
    index = {i: k for k, i in enumerate(views.aligned_ids)}
    view = views.payment_view
    out = []
    for r in np.unique(view["round"]):
        rows = view["round"] == r
        g = view["gradient"][rows] if denoise is None else denoise(int(r), view["gradient"][rows])
        out.append((int(r), np.array([index[str(i)] for i in view["id"][rows]]), g))
    return out


def replayed_gradient_noise(views: RunViews) -> Denoise | None:
    """In the VOID replayable mode: take off the lender's gradient noise, recomputed from the public seed exactly as
    the lender drew it (one draw per exchange, training users in the order received); None when no noise was added.

    Isotropic noise is subtracted. Residual-shaped noise, g_i = (r_i + n_i) J_i with n_i replayed, is undone along
    the gradients' principal line u: t_i = g_i . u = (r_i + n_i) |J_i|; with a linear top (the default) |J_i| is
    one constant, which the regression of t on the replayed n recovers (n is independent of r), so
    r_i = t_i / slope - n_i and the noise-free gradient is r_i |J| u."""
    privacy = views.config.privacy
    if not privacy.gradient_noise_on:
        return None
    sigma = float(privacy.gradient_noise_multiplier)

    def denoise(round_: int, g: np.ndarray) -> np.ndarray:
        source = NoiseSource.replayable_from(views.config.seed, "lender", "grad-noise", str(round_))
        if privacy.gradient_noise_shape == "isotropic":
            return g - source.normal(g.shape, sigma * privacy.gradient_clip, torch.float32).numpy()
        noise = source.normal((len(g), 1), sigma, torch.float32).numpy()[:, 0].astype(np.float64)
        u = np.linalg.svd(g.astype(np.float64), full_matrices=False)[2][0]
        t = g @ u
        slope = float(np.cov(t, noise)[0, 1] / np.var(noise, ddof=1))  # = |J| (signed by u's orientation)
        return ((t / slope - noise) * slope)[:, None] * u[None, :]

    return denoise


def _cosines(g: np.ndarray, reference: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(reference)
    return (g @ reference) / np.maximum(norms, 1e-12)


def gradient_scores(views: RunViews, known: np.ndarray,
                    denoise: Denoise | None = None) -> dict[int | str, dict[str, np.ndarray]]:
    """Per exchange and pooled: norm, cosine and principal-direction scores for every aligned user (NaN where a user
    got no gradient)."""
    n = len(views.aligned_ids)
    per: dict[int | str, dict[str, np.ndarray]] = {}
    positives, negatives = known[views.clean[known] == 1], known[views.clean[known] == 0]
    for round_, pos, g in exchanges(views, denoise):
        norm, cos = np.full(n, np.nan), np.full(n, np.nan)
        norm[pos] = np.linalg.norm(g, axis=1)
        where = {p: k for k, p in enumerate(pos)}
        reference = (g[[where[p] for p in positives if p in where]].mean(0)
                     - g[[where[p] for p in negatives if p in where]].mean(0))
        cos[pos] = _cosines(g, reference)
        # the gradients' principal direction (the top right singular vector of all of them: for a linear top every
        # clean gradient lies on one line), oriented by the known labels; stronger than the cosine under noise
        direction = np.linalg.svd(g.astype(np.float64), full_matrices=False)[2][0]
        if direction @ reference < 0:
            direction = -direction
        principal = np.full(n, np.nan)
        principal[pos] = g @ direction
        per[round_] = {"norm": norm, "cosine": cos, "principal": principal}
    if per:
        with warnings.catch_warnings():  # users who never got a gradient (not training) stay NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            per["pooled"] = {key: np.nanmean(np.stack([p[key] for p in per.values()]), axis=0)
                             for key in SCORE_ATTACKS}
    return per


def _completion(views: RunViews, known: np.ndarray, evaluate: np.ndarray) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    from fedscore.shared.model.parts import payment_model

    state = views.payment_state
    x = state.x[state.rows]
    model = payment_model(x.shape[1], views.config)
    model.load_state_dict(state.model)
    model.eval()
    with torch.no_grad():
        h = model(x).numpy()
    head = LogisticRegression(max_iter=1000).fit(h[known], views.clean[known])
    p = head.predict_proba(h)[:, 1]
    test = views.test & ~views.canary
    return {"train_auc": _auc(views.clean[evaluate], p[evaluate]), "heldout_auc": _auc(views.clean[test], p[test])}


def label_attacks(views: RunViews, epsilon: float | None) -> dict[str, Any]:
    """Every attack on the payment holder's view, with chance and the ceiling eps allows, plus the canary scores
    the one-run audit needs (`canary_scores`: strategy -> score per canary, > 0 guessing label 1)."""
    known = known_users(views)
    per = gradient_scores(views, known)
    if not per:
        return {"threat_model": THREAT, "note": "the payment holder received no gradients (a single round)",
                "attacks": [], "canary_scores": {}}
    evaluate = views.train & ~views.canary
    evaluate[known] = False
    y = views.clean[evaluate]
    ceiling = rr_ceiling(epsilon)
    rows: list[dict[str, Any]] = []
    for exchange, scores in per.items():
        where = "pooled over exchanges" if exchange == "pooled" else f"exchange {exchange}"
        for key, label in SCORE_ATTACKS.items():
            value = _auc(y, scores[key][evaluate])
            rows.append({"attack": label, "exchange": where, "metric": "AUC",
                         "value": max(value, 1.0 - value), "chance": 0.5, "ceiling": ceiling,
                         "as_oriented": value})
        rows.append({"attack": LABEL_INFERENCE, "exchange": where, "metric": "accuracy",
                     "value": float(((scores["cosine"][evaluate] > 0) == (y == 1)).mean()),
                     "chance": float(max(y.mean(), 1 - y.mean())), "ceiling": ceiling})
    pooled = per["pooled"]["cosine"]
    train_positions = np.flatnonzero(views.train)
    audited = views.canary & views.train  # the canaries that trained (the others got no gradient)
    canary_scores = {"cosine": pooled[audited]}
    flips_epsilon = views.config.privacy.label_epsilon
    if flips_epsilon is not None and views.config.privacy.labels_protected:  # else nothing was flipped
        for name, mask in replayed_flip_masks(views.config.seed, len(train_positions), flips_epsilon).items():
            sign = np.ones(len(views.aligned_ids))
            sign[train_positions[mask]] = -1.0  # undo the replayed flip
            scores = pooled
            denoise = replayed_gradient_noise(views) if name == "replayable stream" else None
            if denoise is not None:  # the gradient noise replays from the same stream: take it off first
                scores = gradient_scores(views, known, denoise)["pooled"]["cosine"]
            guess = scores * sign
            rows.append({"attack": f"replay ({name}) + label inference accuracy", "exchange": "pooled over exchanges",
                         "metric": "accuracy", "value": float(((guess[evaluate] > 0) == (y == 1)).mean()),
                         "chance": float(max(y.mean(), 1 - y.mean())), "ceiling": ceiling})
            canary_scores[f"replay ({name})"] = guess[audited]
    completion = _completion(views, known, evaluate)
    rows.append({"attack": "model completion AUC, training users", "exchange": "final model", "metric": "AUC",
                 "value": completion["train_auc"], "chance": completion["heldout_auc"], "ceiling": None,
                 "note": "chance = the same head on held-out users (features alone predict defaults)"})
    for row in rows:
        row["above_ceiling"] = row["ceiling"] is not None and row["value"] > row["ceiling"] + 0.01
    return {"threat_model": THREAT, "attacks": rows, "canary_scores": canary_scores,
            "known_labels": len(known), "evaluated_users": int(evaluate.sum())}
