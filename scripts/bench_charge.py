#!/usr/bin/env python
"""What one online charge costs the payment holder: CPU seconds and peak memory of composing its feature guarantee.

The online guard (clients/payment/release_guard.py) charges `payment.features@lender` each time the worst case per
user rises: the ledger's records (the training run's scaler statistics, DP-SGD rounds and embedding releases, then
the online answers) are composed again with one more Gaussian release. This measures that composition, as the
guard's composing worker runs it (`ledger.compose_records`, the accountant's disk cache off), at a given number of
answers per user already in the ledger:

  cold  the first charge in a fresh process (nothing remembered: what a restarted service pays once)
  warm  the next charge in the same process (one more answer: what every later raise pays)

each case in its own process (peak RSS is per process). The records default to those of the model
`scripts/bench_online.py` trains (20k synthetic users, 2 rounds, privacy.feature_epsilon=8); --ledger reads them from
a payment home's ledger instead. `--entries N` spreads the answers over at most N ledger entries (the guard at
`--reserve 1` writes one entry per raise; a pre-filled ledger may hold fewer, larger ones).

    python scripts/bench_charge.py --answers 1,10,55,1000,1000000
    python scripts/bench_charge.py --answers 1000 --ledger HOME/parties/payment/privacy-ledger.sqlite
    python scripts/bench_charge.py --refusals
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GUARANTEE = "payment.features@lender"
DELTA = 1e-5
# payment.features@lender as the bench_online model's training charged it (read from its ledger, 2026-12-06)
TRAINING: list[dict[str, Any]] = [
    {"protects": "payment.features", "seen_by": "outsider", "kind": "gaussian", "noise_multiplier": 30.0,
     "sensitivity": 2.0, "clip": 6.928203230275509, "count": 1, "sampling": "none", "sample_rate": 1.0,
     "neighbouring": "replace_one", "computed_from": ""},
    {"protects": "payment.features", "seen_by": "outsider", "kind": "dp_sgd", "noise_multiplier": 5.352512589803811,
     "sample_rate": 0.993933511283669, "steps": 4, "neighbouring": "replace_one", "clip": 3.0,
     "sampling_hidden": False, "computed_from": ""},
    {"protects": "payment.features", "seen_by": "lender", "kind": "gaussian", "noise_multiplier": 1.4958215783921702,
     "sensitivity": 2.0, "clip": 1.0, "count": 1, "sampling": "none", "sample_rate": 1.0,
     "neighbouring": "replace_one", "computed_from": ""},
]


def online(sigma: float, clip: float, count: int) -> dict[str, Any]:
    return {"protects": "payment.features", "seen_by": "lender", "kind": "gaussian", "noise_multiplier": sigma,
            "sensitivity": 2.0, "clip": clip, "count": count, "sampling": "none", "sample_rate": 1.0,
            "neighbouring": "replace_one", "computed_from": ""}


def records_for(training: list[dict[str, Any]], answers: int, entries: int) -> list[dict[str, Any]]:
    """The training records, then `answers` online releases per user in at most `entries` entries."""
    last = [r for r in training if r["kind"] == "gaussian" and r["seen_by"] == "lender"][-1]
    n = max(1, min(entries, answers))
    sizes = [answers // n + (1 if k < answers % n else 0) for k in range(n)]
    return [*training, *(online(last["noise_multiplier"], last["clip"], size) for size in sizes if size)]


def one_case(training: list[dict[str, Any]], answers: int, entries: int) -> dict[str, Any]:
    """In this process: the cold charge (to `answers`), then the warm one (to `answers` + 1)."""
    from fedscore.shared.privacy.ledger import compose_records

    records = records_for(training, answers, entries)
    out: dict[str, Any] = {"answers_per_user": answers, "entries": len(records) - len(training)}
    for name, planned in (("cold", records), ("warm", [*records, online(records[-1]["noise_multiplier"],
                                                                           records[-1]["clip"], 1)])):
        started, wall = time.process_time(), time.perf_counter()
        epsilon, accountant = compose_records(planned, DELTA)
        out[name] = {"cpu_s": round(time.process_time() - started, 3),
                     "wall_s": round(time.perf_counter() - wall, 3), "epsilon": epsilon, "accountant": accountant}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return out


def refusals(training: list[dict[str, Any]]) -> dict[str, Any]:
    """In this process: what a refused online charge costs, with the guarantee at 1 answer per user and a budget
    just above it: the next raise refused by the Gaussians' exact epsilon alone (no composition), then by a full
    composition (a budget between that bound and the composed epsilon)."""
    import tempfile

    from fedscore.shared.privacy import BudgetExceeded, Ledger, mechanisms_from_dicts
    from fedscore.shared.privacy.accounting import account, epsilon_lower_bound

    out: dict[str, Any] = {}
    records = records_for(training, 1, 1)
    extra = mechanisms_from_dicts([online(records[-1]["noise_multiplier"], records[-1]["clip"], 1)])
    spent = account(mechanisms_from_dicts(records), DELTA)[0]
    planned = [*mechanisms_from_dicts(records), *extra]
    bound, full = epsilon_lower_bound(planned, DELTA), account(planned, DELTA)[0]
    for name, budget in (("by_the_gaussian_bound", (spent + bound) / 2 if bound > spent else spent),
                         ("by_composing", (bound + full) / 2)):
        with tempfile.TemporaryDirectory() as tmp:
            ledger = Ledger(Path(tmp) / "privacy-ledger.sqlite", {GUARANTEE: budget}, DELTA, party="payment")
            ledger.charge(mechanisms_from_dicts(records), GUARANTEE)
            from fedscore.shared.privacy import accounting

            accounting._account.cache_clear()  # as a fresh refusal: nothing of this list remembered in-process
            started = time.process_time()
            try:
                ledger.charge(extra, GUARANTEE)
                out[name] = "not refused"
            except BudgetExceeded as exc:
                out[name] = {"cpu_s": round(time.process_time() - started, 4), "message": str(exc)[:160]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", default="1,10,55,1000,1000000", help="online answers per user (worst case)")
    parser.add_argument("--entries", type=int, default=1000, help="at most this many online ledger entries")
    parser.add_argument("--ledger", type=Path, help="a payment ledger whose training records to use")
    parser.add_argument("--memory-mb", type=int, default=4096, help="address-space limit of each case's process")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    parser.add_argument("--refusals", action="store_true", help="what a refused charge costs, instead")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    training = TRAINING
    if args.ledger:
        from fedscore.shared.privacy.ledger import ledger_entries

        training = [m for e in ledger_entries(args.ledger, "payment") if e["guarantee"] == GUARANTEE
                    and not e.get("note", "").startswith("online") for m in e["mechanisms"]]
    if args.case:
        print(json.dumps(one_case(training, int(args.case), args.entries)))
        return
    if args.refusals:
        os.environ["FEDSCORE_ACCOUNTING_CACHE"] = "off"
        print(json.dumps(refusals(training)))
        return
    env = {**os.environ, "FEDSCORE_ACCOUNTING_CACHE": "off", "OMP_NUM_THREADS": "1"}
    for answers in [int(a) for a in args.answers.split(",") if a]:
        limit = args.memory_mb * 2**20

        def cap(limit: int = limit) -> None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--case", str(answers), "--entries", str(args.entries),
                 *(["--ledger", str(args.ledger)] if args.ledger else [])], env=env, capture_output=True, text=True,
                timeout=args.timeout, preexec_fn=cap)
        except subprocess.TimeoutExpired:
            print(json.dumps({"answers_per_user": answers, "failed": f"over {args.timeout:g} s"}))
            continue
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(json.dumps({"answers_per_user": answers, "failed": tail[:200]}))
        else:
            print(proc.stdout.strip())


if __name__ == "__main__":
    main()
