"""RUN_DIR/report.html: one self-contained page (plots embedded as PNG) a risk team can open and file.

Built only from the run's own JSON files (metrics.json, outcome.json, privacy-report.json), so
`fedscore report RUN_DIR` can rebuild it at any time.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from fedscore.shared.atomic import write_text_atomic
from fedscore.shared.metrics import METRIC_KEYS, METRIC_LABELS


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _plots(metrics: dict | None, outcome: dict, privacy: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    if privacy.get("guarantees"):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for g in privacy["guarantees"]:
            eps = [r["epsilon_after"] for r in g["per_release"]]
            ax.plot(range(1, len(eps) + 1), eps, marker="o", label=f"{g['protects']} vs {g['against']}")
            limits = [b for b in (g.get("budget") or {}).values() if b is not None]
            if limits:
                ax.axhline(min(limits), ls=":", lw=0.8, color=ax.lines[-1].get_color())
        ax.set_xlabel("release (charge) number")
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
        for name, style in (("lender_only", "--"), ("centralized", ":")):
            value = ((metrics or {}).get("baselines", {}).get(name) or {}).get("auc")
            if value is not None:
                ax.axhline(value, ls=style, color="grey", label=f"{name.replace('_', ' ')} (test)")
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


def _table(rows: list[list[str]], head: list[str]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def render(run_dir: Path) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else None
    outcome = json.loads((run_dir / "outcome.json").read_text())
    privacy = json.loads((run_dir / "privacy-report.json").read_text())
    parts = [f"<h1>fedscore run report</h1><p>{html.escape(str(run_dir))} &middot; transport "
             f"<b>{html.escape(outcome.get('transport', '?'))}</b></p>"]
    if privacy.get("refusal") or outcome.get("error"):
        err = privacy.get("refusal") or outcome["error"]
        parts.append(f"<div class='refusal'><b>Run stopped.</b> party <b>{html.escape(err.get('party') or '-')}"
                     f"</b> refused <code>{html.escape(err.get('request') or '-')}</code>: "
                     f"{html.escape(err.get('reason', ''))}</div>")
    if metrics:
        rows = [["federated (payment + lender)", *(f"{metrics['test'][k]:.4f}" for k in METRIC_KEYS)]]
        for name, values in metrics["baselines"].items():
            if values:
                rows.append([html.escape(name.replace("_", " ")), *(f"{values[k]:.4f}" for k in METRIC_KEYS)])
        parts.append("<h2>Test metrics</h2>" + _table(rows, ["model", *(METRIC_LABELS[k] for k in METRIC_KEYS)]))
    rows = []
    for g in privacy.get("guarantees", []):
        mech = "; ".join(
            f"{m['kind']}" + (f" sigma={m['noise_multiplier']:.3g} x{m['count']} {m['sampling']}"
                              if m["kind"] == "gaussian" else f" eps={m['epsilon']:g}")
            for m in g["mechanisms"][:4]) + (" ..." if len(g["mechanisms"]) > 4 else "")
        budget = ", ".join(f"{party} {'-' if b is None else f'{b:g}'}" for party, b in g["budget"].items())
        status = "<b class='void'>VOID</b>" if g.get("status") == "VOID" else "holds"
        run_eps = "-" if g.get("run_epsilon") is None else f"{g['run_epsilon']:.3f}"
        rows.append([html.escape(g["protects"]), html.escape(g["against"]), status, f"<b>{g['epsilon']:.3f}</b>",
                     run_eps, f"{g['delta']:g}", html.escape(budget), html.escape(g["neighbouring"]),
                     html.escape(g["accountant"]), html.escape(mech), html.escape(g["view"])])
    if privacy.get("void"):
        parts.append(f"<div class='refusal'><b>VOID: no privacy guarantee holds.</b> "
                     f"{html.escape(privacy['void'])}</div>")
    parts.append("<h2>Privacy guarantees</h2>" + (_table(rows, [
        "protects", "against", "status", "epsilon (lifetime)", "epsilon (this run)", "delta", "budget",
        "neighbours", "accountant", "mechanisms", "view"]) if rows else "<p>No mechanism was applied.</p>"))
    release_rows = [[html.escape(party), html.escape(r["what"]), html.escape(r["to"]), html.escape(r["covered_by"])]
                    for party, items in (privacy.get("releases") or {}).items() for r in items]
    if release_rows:
        parts.append("<h2>What leaves each party</h2>" + _table(release_rows, ["party", "what", "to", "covered by"]))
    if privacy.get("unprotected"):
        items = "".join(f"<li><b>{html.escape(u['protects'])}</b> against {html.escape(u['against'])}: "
                        f"{html.escape(u['what'])}</li>" for u in privacy["unprotected"])
        parts.append(f"<h3>Not protected in this run</h3><ul>{items}</ul>")
    for title, img in _plots(metrics, outcome, privacy):
        parts.append(f"<h2>{html.escape(title)}</h2>{img}")
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px}"
             "th{background:#f3f3f3}.refusal{background:#fee;border:1px solid #c00;padding:8px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>fedscore report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_reports(run_dir: Path) -> dict[str, Any]:
    """(Re)build privacy-report.json from the run's outcome, then report.html from all three files; returns the
    privacy report."""
    from fedscore.server.privacy_report import build_privacy_report
    from fedscore.shared.atomic import write_json_atomic
    from fedscore.shared.config import FedConfig

    config = FedConfig.model_validate_json((run_dir / "config.json").read_text())
    outcome = json.loads((run_dir / "outcome.json").read_text())
    report = build_privacy_report(config, outcome.get("ledgers", {}), outcome.get("error"), outcome.get("run_id", ""))
    write_json_atomic(run_dir / "privacy-report.json", report)
    write_text_atomic(run_dir / "report.html", render(run_dir))
    return report
