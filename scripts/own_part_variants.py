"""Offline, on finished runs (issue 18): other forms of the lender's own part, scored as the lift kept and, with
--attack, the reconstruction excess seen by a plain regressor (no inversion of the part).

A: the default (shared/model/lender_gbdt.py: a GBDT on [own columns, partial logit]); B: a GBDT on the own columns
alone, stacked with the partial logit by a logistic regression fitted on the validation (or training) users, so the
score is linear in the partial logit; D: B with their product; C: A with a monotone constraint on the partial logit,
stacked with it. With --reference-grid, also A over fedscore/references.py's 24 settings (up to 1000 iterations,
early stopping), as the lift's references are tuned. Local simulation only: it reads the lender's state and the
payment holder's columns.

    .venv/bin/python scripts/own_part_variants.py --attack runs/exp-i18-own/runs/c00-*-s?-p?
    .venv/bin/python scripts/own_part_variants.py --reference-grid runs/exp-i18-fate-own/runs/c00-*-s0-p0
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from fedscore.audit.reconstruction import AUX_FRACTION, MAX_AUX, excess_over_score
from fedscore.audit.views import load_run
from fedscore.shared.metrics import auc
from fedscore.shared.model.lender_gbdt import GRID, MAX_ITER, fit_lender_gbdt, gbdt_features
from fedscore.shared.model.parts import seeded
from fedscore.shared.model.preprocessing import Scaler
from fedscore.shared.protocol.splits import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL

sys.path.insert(0, str(Path(__file__).parent))
from own_part_restack import last_partial_logits, lift


def grid_fit(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, monotone: list[int] | None = None):
    """lender_gbdt's GRID, best on validation, optionally with a monotone constraint per column."""
    best = None
    for rate, leaves, min_leaf in GRID:
        model = HistGradientBoostingClassifier(learning_rate=rate, max_leaf_nodes=leaves, min_samples_leaf=min_leaf,
                                               max_iter=MAX_ITER, early_stopping=False, random_state=0,
                                               monotonic_cst=monotone).fit(x[train], y[train])
        score = auc(y[val], model.decision_function(x[val]))
        if best is None or score > best[1]:
            best = (model, score)
    return best[0]


def stacked(z: np.ndarray, y: np.ndarray, fit_on: np.ndarray) -> np.ndarray:
    return LogisticRegression(C=1e4, max_iter=1000).fit(z[fit_on], y[fit_on]).decision_function(z)


def variants(run: Path) -> tuple[dict[str, np.ndarray], object, np.ndarray]:
    views = load_run(run)
    lender = views.lender_state
    s = last_partial_logits(views)
    y, split = views.clean.astype(np.int64), views.split
    train, val = (split == SPLIT_TRAIN) & ~views.canary, split == SPLIT_VAL
    raw = lender.raw[lender.rows].numpy().astype(np.float32)
    features = gbdt_features(raw, s)
    own_only = grid_fit(raw, y, train, val).decision_function(raw)
    monotone = grid_fit(features, y, train, val, [0] * raw.shape[1] + [1]).decision_function(features)
    out = {"A gbdt(own,s)": fit_lender_gbdt(features, y, train, val).model.decision_function(features),
           "B stack val": stacked(np.c_[own_only, s[:, 0]], y, val),
           "B stack train": stacked(np.c_[own_only, s[:, 0]], y, train),
           "D stack+product val": stacked(np.c_[own_only, s[:, 0], own_only * s[:, 0]], y, val),
           "C monotone+stack": stacked(np.c_[monotone, s[:, 0]], y, val)}
    if "--reference-grid" in sys.argv:
        from fedscore.references import fit_gbdt, sweep

        codes = split.copy()
        codes[views.canary & (split == SPLIT_TRAIN)] = -1  # canaries out of training, as the party does
        chosen = sweep(features, y, codes, "own columns + partial logit").setting
        out["A reference grid"] = fit_gbdt(chosen, features, y, codes == SPLIT_TRAIN)
    return out, views, s


def main() -> None:
    attack = "--attack" in sys.argv
    for run in (Path(a) for a in sys.argv[1:] if not a.startswith("--")):
        out, views, s = variants(run)
        record = json.loads((run / "parties/evaluation/references.json").read_text())
        low, high, y = record["lender_only_auc"], record["ceiling_auc"], views.clean.astype(np.int64)
        test = views.split == SPLIT_TEST
        print(f"{run.parent.parent.name}/{run.name} run {record['lift_kept']:.3f} | " + " | ".join(
            f"{k} {lift(auc(y[test], v[test]), low, high)}" for k, v in out.items()), flush=True)
        if not attack:
            continue
        state, lender = views.payment_state, views.lender_state
        x = state.x[state.rows].numpy().astype(np.float64)[:, :len(Scaler(**state.scaler).columns)]
        real = np.flatnonzero(~views.canary)
        rng = np.random.default_rng(seeded(views.config.seed, "attacker", "aux-features"))
        aux = rng.choice(real, size=min(int(AUX_FRACTION * len(real)), MAX_AUX), replace=False)
        rest = np.setdiff1d(real, aux)
        own = lender.x[lender.rows].numpy().astype(np.float64)
        for name in ("A gbdt(own,s)", "B stack val", "C monotone+stack"):
            excess = excess_over_score(own, out[name], s.astype(np.float64), x, aux, rest, views.config.seed)
            print(f"   plain excess {name}: {excess['excess']:.3f}", flush=True)


if __name__ == "__main__":
    main()
