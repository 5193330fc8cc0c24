"""RUN_DIR/report.html: one self-contained page (plots embedded as PNG) a risk team can open and file.

Built only from the run's own JSON files (metrics.json, outcome.json, privacy-report.json, and for a local
simulation parties/evaluation/references.json), so `fedscore report RUN_DIR` can rebuild it at any time. Like
them it shows only what reached the coordinator: the validation/test metrics the lender shared (the lender-only
baseline and the centralized reference stay in RUN_DIR/parties/; the CLI prints them in local runs), plus, in a
local simulation, the lift kept between the operator's tuned references. This module turns those files into a
view model (numbers formatted, nothing escaped); the markup is fedscore/templates/report.html.j2, rendered by jinja2
with autoescape on."""

from __future__ import annotations

import base64
import functools
import io
from pathlib import Path
from typing import Any

import jinja2

from fedscore.shared.atomic import write_text_atomic
from fedscore.shared.metrics import METRIC_KEYS, METRIC_LABELS
from fedscore.shared.run_folder import RunFolder


def _png(fig: Any) -> str:
    """The figure as base64 PNG, to embed in the page (one self-contained file)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(outcome: dict, privacy: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    if privacy.get("guarantees"):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for g in privacy["guarantees"]:
            # each party's ledger composes its own charges: one line per party that holds the guarantee (a joint
            # guarantee's total, both ledgers composed, is the table's epsilon)
            holders = g.get("held_by") or [None]
            for party in holders:
                eps = [r["epsilon_after"] for r in g["per_release"] if party is None or r.get("party") == party]
                label = f"{g['protects']} vs {g['against']}" + (f" ({party}'s ledger)" if len(holders) > 1 else "")
                ax.plot(range(1, len(eps) + 1), eps, marker="o", label=label)
                budget = (g.get("budget") or {}).get(party)
                if budget is not None:
                    ax.axhline(budget, ls=":", lw=0.8, color=ax.lines[-1].get_color())
        ax.set_xlabel("release (charge) number, per ledger")
        ax.set_ylabel(f"epsilon (delta={privacy['delta']:g})")
        ax.set_title("privacy spent per release (dotted: the party's budget)")
        ax.legend(fontsize=7)
        plots.append(("Epsilon per round", _png(fig)))
    rounds = outcome.get("rounds", [])
    if rounds:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        x = [r["round"] + 1 for r in rounds]
        for key, label in (("test_auc", "federated, test"), ("val_auc", "federated, validation")):
            if all(key in r for r in rounds):
                ax.plot(x, [r[key] for r in rounds], marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel("AUC")
        ax.set_title("test AUC per round")
        ax.legend(fontsize=7)
        plots.append(("AUC per round", _png(fig)))
    curves = outcome.get("curves") or {}
    if curves:
        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.plot(curves["fpr"], curves["tpr"], label="federated model")
        ax.plot([0, 1], [0, 1], ls="--", color="grey")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("ROC, test split")
        plots.append(("ROC curve", _png(fig)))
        fig, ax = plt.subplots(figsize=(5, 4))
        gaps = [t - f for t, f in zip(curves["tpr"], curves["fpr"], strict=True)]
        best = max(range(len(gaps)), key=gaps.__getitem__)
        ax.plot(curves["population"], curves["tpr"], label="defaulters (cumulative)")
        ax.plot(curves["population"], curves["fpr"], label="non-defaulters (cumulative)")
        ax.vlines(curves["population"][best], curves["fpr"][best], curves["tpr"][best], color="red",
                  label=f"KS = {gaps[best]:.3f}")
        ax.set_xlabel("share of applicants, riskiest first")
        ax.set_ylabel("cumulative share")
        ax.set_title("KS curve, test split")
        ax.legend(fontsize=7)
        plots.append(("KS curve", _png(fig)))
    return plots


def _mechanisms_summary(mechanisms: list[dict[str, Any]]) -> str:
    """The first four report entries in one line: the full list is in privacy-report.json."""
    parts = [m["kind"] + (f" sigma={m['noise_multiplier']:.3g} x{m['count']} {m['sampling']}"
                          if m["kind"] == "gaussian" else f" eps={m['epsilon']:g}") for m in mechanisms[:4]]
    return "; ".join(parts) + (" ..." if len(mechanisms) > 4 else "")


def _guarantee_row(g: dict[str, Any]) -> dict[str, Any]:
    """One row of the guarantees table; numbers formatted here, escaping left to the template."""
    return {
        "protects": g["protects"], "against": g["against"], "void": g.get("status") == "VOID",
        "epsilon": g["epsilon"], "run_epsilon": "-" if g.get("run_epsilon") is None else f"{g['run_epsilon']:.3f}",
        "delta": g["delta"], "neighbouring": g["neighbouring"], "accountant": g["accountant"],
        "budget": ", ".join(f"{party} {'-' if b is None else f'{b:g}'}" for party, b in g["budget"].items()),
        "mechanisms": _mechanisms_summary(g["mechanisms"]), "view": g["view"], "ceiling": ceiling_text(g),
    }


def ceiling_text(g: dict[str, Any]) -> str:
    """The attack ceiling a guarantee's privacy profile implies, e.g. "AUC 0.62 / accuracy 0.59" ("-" if absent)."""
    ceiling = g.get("attack_ceiling")
    if not ceiling:
        return "-"
    mixture = " (RR mixture)" if g.get("composition") == "rr_mixture" else ""
    return f"AUC {ceiling['auc']:.3f} / accuracy {ceiling['balanced_accuracy']:.3f}{mixture}"


@functools.cache
def _template() -> jinja2.Template:
    """The page's markup lives in fedscore/templates (package data), rendered with autoescape on: the run's JSON
    carries free text (notes, names, refusal reasons) that must show as text, never as markup."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("fedscore", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2")


def render(run_dir: Path, with_lift: bool = False) -> str:
    """The page for this run directory, from its metrics.json (optional), outcome.json and privacy-report.json;
    `with_lift` adds the lift kept from parties/evaluation/ (the local operator's copy, never RUN_DIR's top level:
    its references are fitted on clean training labels)."""
    folder = RunFolder(run_dir)
    metrics = folder.read_json(folder.metrics) if folder.finished else None
    outcome = folder.read_outcome()
    privacy = folder.read_json(folder.privacy_report)
    err = privacy.get("refusal") or outcome.get("error")
    stopped = ({"party": err.get("party") or "-", "request": err.get("request") or "-",
                "reason": err.get("reason", "")} if err else None)
    metric_rows: list[dict[str, Any]] = []
    if metrics:
        # "scores", not "values": jinja's `row.values` would find the dict method first
        metric_rows = [{"model": "federated (payment + lender)", "scores": [metrics["test"][k] for k in METRIC_KEYS]}]
    return _template().render(
        run_dir=str(run_dir), transport=outcome.get("transport", "?"), stopped=stopped,
        metrics=metric_rows, metric_labels=[METRIC_LABELS[k] for k in METRIC_KEYS], void=privacy.get("void"),
        guarantees=[_guarantee_row(g) for g in privacy.get("guarantees", [])],
        releases=[{"party": party, **r} for party, items in (privacy.get("releases") or {}).items() for r in items],
        unprotected=privacy.get("unprotected") or [],
        plots=[{"title": title, "png_base64": png} for title, png in _plots(outcome, privacy)],
        audit=_audit_view(run_dir, privacy.get("attacks_and_audit")),
        lift=_lift_view(run_dir) if with_lift else None)


def _lift_view(run_dir: Path) -> dict[str, Any] | None:
    """The lift kept with both tuned references, when the local operator wrote
    RUN_DIR/parties/evaluation/references.json (only someone holding both parties' data can: a simulation, never a
    deployment's coordinator)."""
    from fedscore.references import read_evaluation

    record = read_evaluation(run_dir)
    if record is None:
        return None
    refs = record["references"]

    def setting(fit: dict[str, Any]) -> str:
        s = fit["setting"]
        return (f"learning rate {s['learning_rate']:g}, {s['max_leaf_nodes']} leaves, min leaf "
                f"{s['min_samples_leaf']}, l2 {s['l2_regularization']:g}; validation AUC {_fmt(fit['val_auc'], 4)}")

    kept = record["lift_kept"]
    return {"scope": record["scope"], "federated": _fmt(record["federated_test_auc"], 4),
            "lender_only": _fmt(record["lender_only_auc"], 4), "ceiling": _fmt(record["ceiling_auc"], 4),
            "kept": f"{kept:.1%}" if kept is not None else f"n/a: {record['lift_kept_note']}",
            "settings": len(refs["ceiling"]["sweep"]), "users": refs["users"], "test": refs["test"],
            "lender_setting": setting(refs["lender_only"]), "ceiling_setting": setting(refs["ceiling"])}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _audit_view(run_dir: Path, section: dict[str, Any] | None) -> dict[str, Any] | None:
    """The "Attacks and audit" section: numbers formatted, red flags decided here, the plot embedded."""
    if not section:
        return None
    labels = section["labels_vs_payment"]
    mem = section["membership_vs_outsider"]
    attacks = [{"who": "payment holder", "attack": r["attack"], "exchange": r["exchange"], "value": _fmt(r["value"]),
                "chance": _fmt(r["chance"]), "ceiling": _fmt(r["ceiling"]), "red": bool(r["above_ceiling"])}
               for r in labels["attacks"]]
    attacks.append({"who": "outsider", "attack": mem["attack"], "exchange": "released model",
                    "value": _fmt(mem["value"]), "chance": _fmt(mem["chance"]), "ceiling": _fmt(mem["ceiling"]),
                    "red": bool(mem["above_ceiling"])})
    features = section["features_vs_lender"]
    recon = [{"exchange": r["exchange"], "regressor": r["regressor"], "pooled": _fmt(r["pooled_r2"]),
              "best": _best_reconstructed(r["per_feature_r2"]), "count": len(r["per_feature_r2"]),
              "per_feature": ", ".join(f"{k} {_fmt(v, 2)}" for k, v in r["per_feature_r2"].items())}
             for r in features["results"]]
    excess = features.get("excess_over_score")
    excess_view = None if not excess else {
        "bar": _fmt(excess["bar"]), "value": _fmt(excess["excess"]), "red": not excess["within_bar"],
        "plain": _fmt(excess["plain_excess"]) if excess.get("inverted") else None,
        "rows": [{"name": name, "regressor": row["regressor"], "pooled": _fmt(row["pooled_r2"])}
                 for name, row in excess["inputs"].items()]}
    audits = [{"guarantee": a["guarantee"], "claim": _fmt(a["claim"]), "status": a["claim_status"],
               "bound": _fmt(a["epsilon_lower_bound"]), "red": bool(a["violation"]),
               "detail": (f"{a['correct']}/{a['guesses']} correct of {a['canaries']} canaries ({a['policy']}; "
                          f"{a['confidence']:.0%} confidence over {a['policies_tried']} guess policies)"
                          if a.get("guesses") else a.get("note", ""))} for a in section["one_run_audits"]]
    png = RunFolder(run_dir).audit_plot
    return {"threats": {"labels": labels["threat_model"], "features": features["threat_model"],
                        "membership": mem["threat_model"]},
            "label_claim": _fmt(labels.get("claim")), "feature_claim": _fmt(features.get("claim")),
            "attacks": attacks, "reconstruction": recon, "excess": excess_view, "audits": audits,
            "violations": section["violations"],
            "not_done": section.get("not_done", []),
            "png_base64": base64.b64encode(png.read_bytes()).decode() if png.exists() else None}


def write_reports(run_dir: Path) -> dict[str, Any]:
    """(Re)build privacy-report.json from the run's outcome, then report.html from all three files; returns the
    privacy report."""
    from fedscore.server.privacy_report import build_privacy_report
    from fedscore.shared.atomic import write_json_atomic
    folder = RunFolder(run_dir)
    config = folder.read_config()
    outcome = folder.read_outcome()
    report = build_privacy_report(config, outcome.get("ledgers", {}), outcome.get("error"), outcome.get("run_id", ""))
    if folder.audit.exists():  # written by `fedscore audit` (fedscore/audit/section.py)
        report["attacks_and_audit"] = folder.read_json(folder.audit)
    write_json_atomic(folder.privacy_report, report)
    write_text_atomic(folder.report_html, render(run_dir))
    from fedscore.references import EVALUATION_DIR, read_evaluation

    if read_evaluation(run_dir) is not None:  # a local simulation: the operator's copy with the lift kept
        write_text_atomic(run_dir / EVALUATION_DIR / RunFolder.REPORT_HTML, render(run_dir, with_lift=True))
    return report


def _best_reconstructed(per_feature: dict[str, float | None], shown: int = 5) -> str:
    """The columns the lender reconstructs best, first: what a reader of the report needs before the full list."""
    ranked = sorted(((v, k) for k, v in per_feature.items() if v is not None), reverse=True)[:shown]
    return ", ".join(f"{k} {_fmt(v, 2)}" for v, k in ranked)
