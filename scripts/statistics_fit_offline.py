"""Offline, on finished runs (issue 18, seventh session): what the statistics fit would have kept of the lift, from
the very gradients the payment holder received under DP-SGD.

For each run recorded with audit.record_transcripts=true: the payment holder's transcript (the received gradients,
after all noise) is fitted by shared/privacy/statistics_fit.py at each given setting (C, B, z, lambda), the partial
logit it gives is restacked with the lender's own part exactly as the lender fits it, and the test users are scored
as the lift kept against the run's own references. Local simulation only: it reads both parties' states. This is how
the default setting (C 5, B 6, lambda 1e4) was chosen before the fit was built into the party.

    .venv/bin/python scripts/statistics_fit_offline.py "5,6,3,1e4;5,6,0,1e4" runs/exp-i18-linear/runs/c00-*-s?-p?
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fedscore.shared.metrics import auc
from fedscore.shared.model.lender_gbdt import fit_lender_gbdt, gbdt_features
from fedscore.shared.privacy.secure_random import NoiseSource
from fedscore.shared.privacy.statistics_fit import (
    StatisticsFitPlan,
    design_rows,
    noisy_gram,
    noisy_moment,
    ridge_solve,
)

sys.path.insert(0, str(Path(__file__).parent))
from own_part_restack import lift, offline_run, received_targets


def settings(text: str) -> list[StatisticsFitPlan]:
    """'C,B,z,lambda;...' -> plans (z 0: no noise, the non-private ridge on the same clipped rows)."""
    plans = []
    for item in text.split(";"):
        c, b, z, ridge = map(float, item.split(","))
        plans.append(StatisticsFitPlan(noise_multiplier=z, row_clip=c, target_clip=b, ridge=ridge))
    return plans


def main() -> None:
    plans = settings(sys.argv[1])
    for run in map(Path, sys.argv[2:]):
        done = offline_run(run)
        views, y, train, val, test = done.views, done.y, done.train, done.val, done.test
        lender, payment = views.lender_state, views.payment_state
        x = payment.x[payment.rows].double()
        rows_np, target_np = received_targets(views)
        rows, targets = torch.as_tensor(rows_np), torch.as_tensor(target_np)
        out = []
        for plan in plans:
            fit_rows = design_rows(x[rows], plan)
            gram = noisy_gram(fit_rows, plan, NoiseSource())
            coefficients = ridge_solve(gram, noisy_moment(fit_rows, targets, plan, NoiseSource()), plan)
            s = (x @ coefficients[:-1] + coefficients[-1]).numpy()[:, None]
            features = gbdt_features(lender.raw[lender.rows].numpy(), s)
            model = fit_lender_gbdt(features, y, train, val).model
            kept = lift(auc(y[test], model.decision_function(features[test])), done.low, done.high)
            out.append(f"C {plan.row_clip:g} B {plan.target_clip:g} z {plan.noise_multiplier:g} "
                       f"lambda {plan.ridge:g}: {kept:.3f}")
        print(f"{run.name}: run's lift kept {done.record_lift:.3f} | " + " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
