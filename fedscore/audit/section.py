"""`fedscore audit RUN_DIR`: run every attack and the one-run audit on a finished run and write the report section.

The section goes to RUN_DIR/audit.json (kept, so `fedscore report` rebuilds privacy-report.json and report.html
with it) and its plot to RUN_DIR/audit.png. A lower bound above the claimed epsilon is a violation: listed in
`violations`, shown in red, and the command exits non-zero.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedscore.audit.label_leakage import label_attacks
from fedscore.audit.membership import canary_scores, losses, membership_attack
from fedscore.audit.one_run import audit
from fedscore.audit.reconstruction import reconstruction_attack
from fedscore.audit.views import RunViews, load_run
from fedscore.shared.atomic import write_json_atomic
from fedscore.shared.run_folder import RunFolder

NOT_DONE = ("white-box audit of the composed outsider guarantee (both parts and the DP scaler together): each part's "
            "DP-SGD is audited on its own, against its own share of the claim")


def _claim(views: RunViews, key: str) -> tuple[float | None, str]:
    protects, _, against = key.partition("@")
    g = views.claim(protects, against)
    if g is None:
        return None, "no claim (unprotected in this run)"
    epsilon = g["run_epsilon"] if g.get("run_epsilon") is not None else g["epsilon"]
    return float(epsilon), str(g.get("status", "holds"))


def audit_section(run_dir: Path) -> dict[str, Any]:
    """Every attack and the audit, with BLAS on one thread: on a shared 2-core machine numpy's default thread pool
    oversubscribed the cores and made the regressors 30x slower (measured: 228 s against 6.5 s)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _audit_section(run_dir)


def _audit_section(run_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    views = load_run(run_dir)
    delta = float(views.privacy.get("delta", views.config.privacy.delta))
    label_eps, label_status = _claim(views, "lender.labels@payment")
    outsider_eps, outsider_status = _claim(views, "joint.records@outsider")
    feature_eps, feature_status = _claim(views, "payment.features@lender")
    labels = label_attacks(views, label_eps)
    label_scores = labels.pop("canary_scores")
    loss = losses(views)
    # the lender's own GBDT part is fitted on the real training users' clean labels without DP (canaries are left
    # out of it): a membership test on real users has no DP ceiling then; the canary audit below still checks the
    # DP-SGD parts, which are all a canary trains
    own_part = views.config.model.lender_part == "gbdt"
    membership = membership_attack(views, None if own_part else outsider_eps, delta, loss)
    reconstruction = reconstruction_attack(views)
    audits = []
    m = int(views.canary.sum())
    if m and label_scores:
        secrets = views.clean[views.canary & views.train]
        result = audit(label_scores, secrets, delta, views.config.audit.confidence)
        violation = label_eps is not None and result.epsilon_lower_bound > label_eps
        audits.append({"guarantee": "lender.labels@payment", "claim": label_eps, "claim_status": label_status,
                       **result.to_dict(), "violation": violation,
                       "canary_design": "each canary's label is 0 or 1 with probability 1/2 (label DP's neighbours "
                       "differ in one label: the label is the secret bit Steinke et al. include with probability "
                       "1/2); the auditor guesses from the payment holder's view only"})
    else:
        audits.append({"guarantee": "lender.labels@payment", "claim": label_eps, "claim_status": label_status,
                       "epsilon_lower_bound": None, "violation": False,
                       "note": "no canaries in this run (audit.canaries=0) or no gradients received"})
    if m:
        scores, trained = canary_scores(views, loss)
        result = audit({"loss": scores}, trained, delta, views.config.audit.confidence)
        violation = outsider_eps is not None and result.epsilon_lower_bound > outsider_eps
        audits.append({"guarantee": "joint.records@outsider", "claim": outsider_eps, "claim_status": outsider_status,
                       **result.to_dict(), "violation": violation,
                       "canary_design": "each canary trains with probability 1/2 (keyed hash under the parties' "
                       "secret); the auditor guesses from the released model's loss on it (black box: no gradient "
                       "canaries)"})
    if views.config.audit.gradient_canaries:
        from fedscore.audit.gradient_audit import gradient_canary_audits, statistics_fit_audits

        audits += gradient_canary_audits({"payment": views.payment_state, "lender": views.lender_state},
                                         views.config.seed, views.config.privacy.replayable_noise, delta,
                                         views.config.audit.confidence)
        audits += statistics_fit_audits({"payment": views.payment_state}, views.config.privacy.replayable_noise,
                                        delta, views.config.audit.confidence)
    violations = [f"{a['guarantee']}: lower bound {a['epsilon_lower_bound']:.3f} > claimed {a['claim']:.3f}"
                  for a in audits if a["violation"]]
    return {
        "labels_vs_payment": {**labels, "claim": label_eps, "claim_status": label_status},
        "features_vs_lender": {**reconstruction, "claim": feature_eps, "claim_status": feature_status},
        "membership_vs_outsider": {**membership, "claim": None if own_part else outsider_eps,
                                   "claim_status": ("none: the lender part is its own GBDT on clean labels (not DP)"
                                                    if own_part else outsider_status),
                                   "above_ceiling": membership["value"] > membership["ceiling"] + 0.01},
        "one_run_audits": audits,
        "not_done": [NOT_DONE],
        "violations": violations,
        "seconds": time.perf_counter() - started,
    }


def plot_section(section: dict[str, Any], out: Path) -> Path:
    """Attacks beside chance and ceiling (left), the audit's lower bounds beside the claims (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in section["labels_vs_payment"]["attacks"] if r["exchange"] in ("pooled over exchanges",
                                                                                     "final model")]
    mem = section["membership_vs_outsider"]
    rows.append({"attack": "membership (outsider) AUC", "value": mem["value"], "chance": mem["chance"],
                 "ceiling": mem["ceiling"], "above_ceiling": mem["above_ceiling"]})
    pooled = [r for r in section["features_vs_lender"]["results"] if r["exchange"] == "pooled over exchanges"]
    recon = (pooled or section["features_vs_lender"]["results"])[-1:]
    for r in recon:
        rows.append({"attack": "feature reconstruction R^2 (lender)", "value": r["pooled_r2"], "chance": 0.0,
                     "ceiling": None, "above_ceiling": False})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 2),
                                      gridspec_kw={"width_ratios": [2.2, 1]})
    y = np.arange(len(rows))
    left.barh(y, [r["value"] for r in rows], color=["#c00" if r["above_ceiling"] else "#4a7" for r in rows])
    left.scatter([r["chance"] for r in rows], y, marker="|", s=300, color="grey", label="chance", zorder=3)
    ceilings = [(i, r["ceiling"]) for i, r in enumerate(rows) if r["ceiling"] is not None]
    if ceilings:
        left.scatter([c for _, c in ceilings], [i for i, _ in ceilings], marker="|", s=300, color="red",
                     label="ceiling the claim allows", zorder=3)
    left.set_yticks(y, [r["attack"] for r in rows], fontsize=7)
    left.set_xlim(0, 1.05)
    left.set_title("attacks (pooled over exchanges)")
    left.legend(fontsize=7, loc="lower right")
    audits = [a for a in section["one_run_audits"] if a.get("epsilon_lower_bound") is not None]
    ya = np.arange(len(audits))
    bounds = [min(a["epsilon_lower_bound"], 20.0) for a in audits]
    confidence = f"{audits[0]['confidence']:.1%} " if audits else ""
    right.barh(ya, bounds, color=["#c00" if a["violation"] else "#47a" for a in audits],
               label=f"{confidence}lower bound")
    claims = [(i, a["claim"]) for i, a in enumerate(audits) if a["claim"] is not None]
    if claims:
        right.scatter([c for _, c in claims], [i for i, _ in claims], marker="|", s=400, color="black",
                      label="claimed epsilon", zorder=3)
    right.set_yticks(ya, [_short(a["guarantee"]) for a in audits], fontsize=7)
    right.set_xlabel("epsilon")
    right.set_title("one-run audit")
    if audits:
        right.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _short(guarantee: str) -> str:
    """A plot label: the white-box rows' long names on two lines."""
    key, _, detail = guarantee.partition(" (")
    return f"{key}\n({detail}" if detail else key


def run_audit(run_dir: Path) -> dict[str, Any]:
    """Audit the run, write audit.json and audit.png, and rebuild privacy-report.json and report.html with it."""
    from fedscore.report import write_reports

    section = audit_section(run_dir)
    folder = RunFolder(run_dir)
    plot_section(section, folder.audit_plot)
    write_json_atomic(folder.audit, _finite(section))
    write_reports(run_dir)
    return section


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
