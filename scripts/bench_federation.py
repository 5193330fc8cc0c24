"""Federated (real local Flower: SuperLink + 2 SuperNodes + ServerApp) vs in-process, same data, config, secret.

Run: .venv/bin/python scripts/bench_federation.py --data DIR --repeats 3 [--set key=value ...] [--json out.json]
(without --data it generates synthetic data with --users). Prints a markdown table: median wall time of each path,
their ratio, the number of protocol messages and the median overhead per message; checks both give the same AUC.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from fedscore.federation import run_federated
from fedscore.runs import run_inprocess
from fedscore.shared.config import load_config
from fedscore.synth import synthesize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-federation-"))
    data = args.data or work / "data"
    if args.data is None:
        synthesize(args.users, 0, data)
    config = load_config(None, ["baselines.enabled=false", *args.overrides])
    secret = secrets.token_hex(16)
    rows = []
    for repeat in range(args.repeats):
        t0 = time.perf_counter()
        inproc = run_inprocess(config, data, work / f"inproc-{repeat}", secret=secret)
        t1 = time.perf_counter()
        flower = run_federated(config, data, work / f"flower-{repeat}", secret=secret)
        t2 = time.perf_counter()
        rows.append({"inprocess_s": t1 - t0, "flower_s": t2 - t1, "messages": flower["traffic"]["messages"],
                     "auc_inprocess": inproc["test"]["auc"], "auc_flower": flower["test"]["auc"],
                     "flower_protocol_s": flower["timing"]["protocol_s"]})
        print(json.dumps(rows[-1]), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    per_message = (med["flower_s"] - med["inprocess_s"]) / med["messages"]
    print("\n| path | median wall s | ratio | messages | overhead per message s | test AUC |")
    print("|---|---|---|---|---|---|")
    print(f"| in-process | {med['inprocess_s']:.1f} | 1.0 | {int(med['messages'])} | - | {med['auc_inprocess']:.4f} |")
    print(f"| Flower (local, 3 processes + ServerApp) | {med['flower_s']:.1f} | "
          f"{med['flower_s'] / med['inprocess_s']:.1f} | {int(med['messages'])} | {per_message:.2f} | "
          f"{med['auc_flower']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "median": med, "overrides": args.overrides}, indent=2))


if __name__ == "__main__":
    main()
