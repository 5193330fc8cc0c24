"""Federated (real local Flower: SuperLink + 2 SuperNodes + 2 party workers + ServerApp) vs in-process, same data,
config and secret, one repeat after the other.

Run: .venv/bin/python scripts/bench_federation.py --data DIR --repeats 3 [--set key=value ...] [--json out.json]
(without --data it generates synthetic data with --users). Each path gets fresh party homes every repeat (lifetime
ledgers would otherwise refuse a second run on the same people). Prints a markdown table: median wall time of each
path and of their per-repeat ratio, the sequential exchanges, the median per-exchange overhead (Flower exchange
minus the same in-process exchange), the Flower start-up time, and where the Flower run's time goes.

--cold runs both paths as the user does, each a `fedscore train` / `fedscore federate` command in a fresh process
(with FEDSCORE_HOME pointing at fresh homes): without it the in-process path runs inside this script's own process,
warm after its first repeat (imports, the accountant's in-memory caches), while the Flower path always starts cold
worker processes, which flatters in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedscore.federation import run_federated
from fedscore.runs import run_inprocess
from fedscore.shared.config import load_config
from fedscore.synth import synthesize


def _exchanges(run_dir: Path) -> list[tuple[str, int, float]]:
    """(kind, round, seconds) per sequential exchange (parallel messages of one exchange counted once)."""
    traffic = json.loads((run_dir / "outcome.json").read_text())["traffic"]
    seen, out = set(), []
    for item in traffic:
        key = (item["kind"], item["round"])
        if key not in seen:
            seen.add(key)
            out.append((item["kind"], item["round"], item["seconds"]))
    return out


def _homes(root: Path) -> dict[str, Path]:
    return {party: root / party for party in ("payment", "lender")}


def _cli(command: str, data: Path, out: Path, home: Path, secret_file: Path, overrides: list[str]) -> dict[str, Any]:
    """`fedscore COMMAND` in a fresh process, as a user runs it; its metrics.json."""
    fedscore = str(Path(sys.executable).parent / "fedscore")
    args = [fedscore, command, "--data", str(data), "--out", str(out), "--secret-file", str(secret_file),
            *[item for override in overrides for item in ("--set", override)]]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "FEDSCORE_HOME": str(home)})
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cold", action="store_true", help="each path as its own `fedscore` command (see above)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-federation-"))
    data = args.data or work / "data"
    if args.data is None:
        synthesize(args.users, 0, data)
    config = load_config(None, args.overrides)
    secret = secrets.token_hex(16)
    rows = []
    for repeat in range(args.repeats):
        t0 = time.perf_counter()
        if args.cold:
            secret_file = work / "secret.hex"
            secret_file.write_text(secret)
            inproc = _cli("train", data, work / f"inproc-{repeat}", work / f"home-inproc-{repeat}", secret_file,
                          args.overrides)
        else:
            inproc = run_inprocess(config, data, work / f"inproc-{repeat}", secret=secret,
                                   homes=_homes(work / f"homes-inproc-{repeat}"))
        t1 = time.perf_counter()
        if args.cold:
            flower = _cli("federate", data, work / f"flower-{repeat}", work / f"home-flower-{repeat}", secret_file,
                          args.overrides)
        else:
            flower = run_federated(config, data, work / f"flower-{repeat}", secret=secret,
                                   homes=_homes(work / f"homes-flower-{repeat}"))
        t2 = time.perf_counter()
        local, remote = _exchanges(work / f"inproc-{repeat}"), _exchanges(work / f"flower-{repeat}")
        overheads = [r[2] - lo[2] for lo, r in zip(local, remote, strict=True)]
        timing = flower["timing"]
        rows.append({"inprocess_s": t1 - t0, "flower_s": t2 - t1, "ratio": (t2 - t1) / (t1 - t0),
                     "exchanges": len(remote), "overhead_per_exchange_s": statistics.median(overheads),
                     "startup_s": timing["startup_s"], "flower_protocol_s": timing["protocol_s"],
                     "inprocess_protocol_s": inproc["timing"]["protocol_s"],
                     "baselines_s": timing["baselines_s"], "teardown_s": timing.get("teardown_s", 0.0),
                     "auc_inprocess": inproc["test"]["auc"], "auc_flower": flower["test"]["auc"]})
        print(json.dumps(rows[-1]), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    rest = med["flower_s"] - med["startup_s"] - med["flower_protocol_s"] - med["baselines_s"] - med["teardown_s"]
    mode = "cold: each path a fresh `fedscore` command" if args.cold else "in-process path inside this process"
    print(f"\n{args.repeats} repeats, medians; settings: {' '.join(args.overrides) or 'defaults'}; {mode}\n")
    print("| path | wall s | ratio | exchanges | overhead per exchange s | start-up s | test AUC |")
    print("|---|---|---|---|---|---|---|")
    print(f"| in-process | {med['inprocess_s']:.1f} | 1.0 | {int(med['exchanges'])} | - | - | "
          f"{med['auc_inprocess']:.4f} |")
    print(f"| Flower (local) | {med['flower_s']:.1f} | {med['ratio']:.2f} | {int(med['exchanges'])} | "
          f"{med['overhead_per_exchange_s']:.2f} | {med['startup_s']:.1f} | {med['auc_flower']:.4f} |")
    print(f"\nwhere the Flower run goes: start-up {med['startup_s']:.1f} s, protocol {med['flower_protocol_s']:.1f} s "
          f"(in-process {med['inprocess_protocol_s']:.1f} s), baselines {med['baselines_s']:.1f} s, "
          f"teardown {med['teardown_s']:.1f} s, the rest (ServerApp start, report, bundle) {rest:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "median": med, "overrides": args.overrides, "cold": args.cold},
                                        indent=2))


if __name__ == "__main__":
    main()
