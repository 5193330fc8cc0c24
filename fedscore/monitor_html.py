"""monitor.html: one self-contained page from monitor.json (figures as embedded PNGs), for the lender's analysts.

Why a separate module: fedscore/monitor.py computes and charges; this only draws what monitor.json already holds,
so the page can be redrawn from the file alone (nothing here reads data).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

LIGHT_COLOURS = {"stable": "#2e7d32", "watch": "#f9a825", "act": "#c62828"}


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _psi_over_months(doc: dict[str, Any], side: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    months = sorted(doc["months"], key=int)
    columns = list(doc["months"][months[-1]][side])
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.axhspan(0, 0.1, color=LIGHT_COLOURS["stable"], alpha=0.08)
    ax.axhspan(0.1, 0.25, color=LIGHT_COLOURS["watch"], alpha=0.12)
    ax.axhspan(0.25, 10, color=LIGHT_COLOURS["act"], alpha=0.06)
    top = 0.3
    # a colour of its own for each column that crossed 0.1 (the default cycle repeats after ten and gave two
    # labelled columns the same colour); the quiet ones in grey, behind
    strong, light_ = plt.get_cmap("tab20").colors[::2], plt.get_cmap("tab20").colors[1::2]
    palette = iter([c for i, c in enumerate(strong + light_) if i % 10 != 7])  # no grey: grey is for the quiet
    for name in columns:
        values = [doc["months"][m][side][name]["psi"] for m in months if name in doc["months"][m][side]]
        x = [int(m) for m in months if name in doc["months"][m][side]]
        top = max(top, *values)
        if max(values) > 0.1:
            ax.plot(x, values, marker="o", markersize=3, linewidth=2.0 if max(values) > 0.25 else 1.2,
                    color=next(palette, "black"), label=name, zorder=3)
        else:
            ax.plot(x, values, linewidth=0.7, color="#9e9e9e", alpha=0.7, zorder=2)
    ax.set_ylim(0, min(top * 1.1, 3.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # months: no 7.5
    ax.set_xlabel("month")
    ax.set_ylabel("PSI")
    ax.set_title(f"{side} columns: PSI against the training reference (labelled: above 0.1 at some month)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=3, loc="upper left")
    return _png(fig)


def _score_and_calibration(doc: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    months = sorted(doc["months"], key=int)
    last = doc["months"][months[-1]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    score = last["score"]
    labels = [f"<{score['edges'][0]:.0f}"] + [f"{e:.0f}+" for e in score["edges"]]
    x = range(len(labels))
    axes[0].bar([i - 0.2 for i in x], score["reference_share"], width=0.4, label="training reference")
    axes[0].bar([i + 0.2 for i in x], score["current_share"], width=0.4, label=f"month {months[-1]}")
    axes[0].set_xticks(list(x), labels, rotation=60, fontsize=7)
    axes[0].set_title(f"score distribution (PSI {score['psi']:.3f})")
    axes[0].legend(fontsize=7)
    matured = [m for m in months if "realised" in doc["months"][m]]
    if matured:
        cal = doc["months"][matured[-1]]["realised"]
        bands = [b["band"] for b in cal["bands"]]
        axes[1].bar([i - 0.2 for i in range(len(bands))], [b["expected"] for b in cal["bands"]], width=0.4,
                    label="expected (mean PD)")
        axes[1].bar([i + 0.2 for i in range(len(bands))], [b["realised"] for b in cal["bands"]], width=0.4,
                    label="realised bad rate")
        axes[1].set_xticks(range(len(bands)), bands)
        axes[1].set_title(f"calibration by band, cohort of month {cal['cohort']}")
        axes[1].legend(fontsize=7)
        axes[2].plot([doc["months"][m]["realised"]["cohort"] for m in matured],
                     [doc["months"][m]["realised"]["auc"] for m in matured], marker="o", label="AUC")
        axes[2].plot([doc["months"][m]["realised"]["cohort"] for m in matured],
                     [doc["months"][m]["realised"]["ks"] for m in matured], marker="s", label="KS")
        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[2].set_xlabel("application month (cohort)")
        axes[2].set_title("realised AUC / KS of matured cohorts")
        axes[2].legend(fontsize=7)
    else:
        for ax in axes[1:]:
            ax.text(0.5, 0.5, "no matured cohort yet", ha="center", va="center")
            ax.set_axis_off()
    return _png(fig)


def _table(entry: dict[str, Any], side: str) -> str:
    rows = []
    for name, row in sorted(entry[side].items(), key=lambda kv: -kv[1]["psi"]):
        colour = LIGHT_COLOURS[row["light"]]
        ca = row.get("characteristic_points")
        rows.append(f"<tr><td>{html.escape(name)}</td><td class=num>{row['psi']:.3f}</td>"
                    f"<td><span class=dot style='background:{colour}'></span>{row['light']}</td>"
                    f"<td class=num>{'n/a' if ca is None else f'{ca:+.2f}'}</td></tr>")
    return ("<table><tr><th>column</th><th>PSI</th><th>light</th><th>characteristic (points)</th></tr>"
            + "".join(rows) + "</table>")


def write_html(doc: dict[str, Any]) -> str:
    months = sorted(doc["months"], key=int)
    last = doc["months"][months[-1]]
    realised = ""
    if "realised" in last:
        r = last["realised"]
        realised = (f"<p>Matured cohort of month {r['cohort']} ({r['n']} applicants): AUC {r['auc']:.3f}, KS "
                    f"{r['ks']:.3f}, bad rate {r['bad_rate']:.1%} against {r['expected_bad_rate']:.1%} expected.</p>")
    act = [f"{side}.{name}" for side in ("payment", "lender") for name, row in last[side].items()
           if row["light"] == "act"]
    summary = (f"<p class=act>Act: {', '.join(html.escape(a) for a in act)}</p>" if act
               else "<p>No column above 0.25.</p>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedscore monitor: month {months[-1]}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1200px}} table{{border-collapse:collapse;margin:0.5em 1em
0.5em 0;display:inline-table;vertical-align:top}} td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}}
.num{{text-align:right}} .dot{{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:5px}}
.act{{color:#c62828;font-weight:bold}} img{{max-width:100%}}</style></head>
<body><h1>Model monitoring, month {months[-1]}</h1>
<p>Model {html.escape(doc['model'])}; reference: its training data. Thresholds: PSI &lt; 0.1 stable, 0.1-0.25 watch,
&gt; 0.25 act. Months monitored: {', '.join(months)}.</p>
{summary}
<p>Score PSI {last['score']['psi']:.3f} ({last['score']['light']});
mean score {last['score']['mean_points']:.1f} points.</p>{realised}
<h2>PSI per column over the months</h2>
<img alt="payment PSI" src="data:image/png;base64,{_psi_over_months(doc, 'payment')}">
<img alt="lender PSI" src="data:image/png;base64,{_psi_over_months(doc, 'lender')}">
<h2>Score distribution and calibration</h2>
<img alt="scores" src="data:image/png;base64,{_score_and_calibration(doc)}">
<h2>Month {months[-1]}: columns</h2>
<h3>payment holder (from its noisy bin counts)</h3>{_table(last, 'payment')}
<h3>lender</h3>{_table(last, 'lender')}
<h2>Privacy</h2><p>{html.escape(doc['privacy'])}.
Payment guarantee after this month's release:
{last['payment_release']['guarantee']} eps {last['payment_release']['epsilon_after'] or 0:.3f} over the payment
holder's lifetime (noise multiplier {last['payment_release']['noise_multiplier']:g}).</p>
<p>{html.escape(doc['characteristic_analysis'])}.</p>
</body></html>
"""
