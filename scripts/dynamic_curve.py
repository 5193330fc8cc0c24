"""The monthly curve of issue 21 (BENCHMARKS.md "Issue 21"): PSI of the shocked and untouched columns, score PSI,
the champion's realised AUC per matured cohort, and the retrain points, from the files the commands wrote.

usage: python scripts/dynamic_curve.py MONITOR_JSON DATA_ROOT OUT_PNG [--point LABEL=MONTH:AUC ...]
Prints a markdown table (one row per month) and writes OUT_PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from fedscore.synth_monthly import SHOCKED_COLUMNS, UNTOUCHED_COLUMNS, read_meta


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("monitor")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--point", action="append", default=[], help="LABEL=COHORT:AUC, a retrain point")
    args = parser.parse_args()
    doc = json.loads(Path(args.monitor).read_text())
    meta = read_meta(Path(args.data))
    months = sorted(doc["months"], key=int)
    shocked = [(side, c) for side, cols in SHOCKED_COLUMNS.items() for c in cols]
    untouched = [(side, c) for side, cols in UNTOUCHED_COLUMNS.items() for c in cols]
    print("| month | shocked columns > 0.25 | min PSI shocked | max PSI untouched | max PSI any other | score PSI "
          "| cohort | realised AUC | KS | bad rate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in months:
        e = doc["months"][m]
        flagged = [c for side, c in shocked if e[side][c]["psi"] > 0.25]
        low = min(e[side][c]["psi"] for side, c in shocked)
        high = max(e[side][c]["psi"] for side, c in untouched)
        other = max(r["psi"] for side in ("payment", "lender") for c, r in e[side].items()
                    if (side, c) not in shocked and (side, c) not in untouched)
        r = e.get("realised")
        real = (f"{r['cohort']} | {r['auc']:.3f} | {r['ks']:.3f} | {r['bad_rate']:.1%}" if r else "- | - | - | -")
        print(f"| {m} | {len(flagged)}/{len(shocked)} | {low:.3f} | {high:.3f} | {other:.3f} | "
              f"{e['score']['psi']:.3f} | {real} |")

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    x = [int(m) for m in months]
    for side, c in shocked:
        top.plot(x, [doc["months"][m][side][c]["psi"] for m in months], linewidth=2, label=f"{c} (shocked)")
    for side, c in untouched:
        top.plot(x, [doc["months"][m][side][c]["psi"] for m in months], linewidth=0.8, linestyle="--",
                 label=f"{c} (untouched)")
    top.plot(x, [doc["months"][m]["score"]["psi"] for m in months], color="black", linewidth=2.5, label="score")
    top.axhline(0.1, color="#f9a825")
    top.axhline(0.25, color="#c62828")
    if meta.shock:
        for ax in (top, bottom):
            ax.axvline(meta.shock - 0.5, color="grey", linestyle=":")
    top.set_ylabel("PSI vs training reference")
    top.set_ylim(0, 1.2)
    top.legend(fontsize=6, ncol=3)
    top.set_title(f"champion trained on months 1..4; shock from month {meta.shock}")
    cohorts = [(doc["months"][m]["realised"]["cohort"], doc["months"][m]["realised"]["auc"]) for m in months
               if "realised" in doc["months"][m]]
    bottom.plot([c for c, _ in cohorts], [a for _, a in cohorts], marker="o", label="champion: realised AUC by "
                "application month")
    for item in args.point:
        label, _, rest = item.partition("=")
        cohort, _, auc = rest.partition(":")
        bottom.scatter([int(cohort)], [float(auc)], s=70, marker="*", zorder=5, label=label)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole months
    bottom.set_xlabel("month (PSI: snapshot month; AUC: application month of the matured cohort)")
    bottom.set_ylabel("AUC")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)


if __name__ == "__main__":
    main()
