"""Time the PSI alignment (shared/alignment/psi.py) step by step at a given size, as the two parties would run it.

    .venv/bin/python scripts/bench_psi.py --sizes 100000 1000000 --overlap 0.3 --repeats 3 [--json PATH]
    .venv/bin/python scripts/bench_psi.py --sizes 1000000 --lender 500000 --overlap 0.82 --ds gcs raw --repeats 1
    .venv/bin/python scripts/bench_psi.py --sizes 100000 --lender 50000 --overlap 0.82 --protocol x25519 openmined

The payment holder holds N IDs and the lender N (or --lender M), of which overlap*M are shared. Each step runs as the
protocol runs it (the payloads are bytes between steps); the figures are medians over the repeats. Both parties share
this machine's CPUs here, while in a deployment each runs on its own, so the wall-clock of a real run is lower
than the total printed. `--protocol` picks the implementation (fedscore.shared.alignment.psi: x25519 or openmined;
`--ds` applies to openmined only). For x25519 the payment holder's C (its own IDs masked) is a step of its own,
`payment_prepare`, as the party runs it at setup. CPU seconds include the worker processes x25519 starts (they are
waited for, so os.times() counts them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from fedscore.shared.alignment import psi
from fedscore.shared.alignment import tokens as alignment_tokens

SECRET = bytes.fromhex("00112233445566778899aabbccddeeff")
STEPS = ("lender_request_s", "payment_prepare_s", "payment_respond_s", "lender_intersection_s", "tokens_s",
         "total_s")
SIZES = ("request_bytes", "response_bytes", "tokens_bytes")


def make_ids(n: int, overlap: float, seed: int, n_lender: int | None = None) -> tuple[list[str], list[str], int]:
    """Payment IDs (n) and lender IDs (n_lender, default n), `overlap * n_lender` in common, in a random order."""
    m = n_lender or n
    common = round(overlap * m)
    rng = np.random.default_rng(seed)
    numbers = rng.choice(10**12, size=n + m - common, replace=False)
    ids = [f"U{x:012d}" for x in numbers.tolist()]
    payment = ids[:n]
    lender = ids[n - common:]
    lender = [lender[i] for i in rng.permutation(m).tolist()]
    return payment, lender, common


def cpu_seconds() -> float:
    """CPU of this process (all threads) and of its waited-for children (x25519's worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_once(payment: list[str], lender: list[str], expected: int, data_structure: psi.DataStructureName,
             workers: int | None, protocol: psi.ProtocolName = psi.DEFAULT_PROTOCOL) -> dict[str, float]:
    """One alignment; wall seconds per step, and CPU seconds (all threads of this process and its worker
    processes: less sensitive to whatever else runs on the machine, and the figure to divide by a deployment's
    core count)."""
    marks = [(time.perf_counter(), cpu_seconds(), time.process_time())]
    request, state = psi.lender_request(lender, protocol=protocol, workers=workers)
    marks.append((time.perf_counter(), cpu_seconds(), time.process_time()))
    prepared = psi.payment_prepare(payment, protocol=protocol, workers=workers)
    marks.append((time.perf_counter(), cpu_seconds(), time.process_time()))
    response = psi.payment_respond(request, payment, data_structure=data_structure, prepared=prepared,
                                   protocol=protocol, workers=workers)
    marks.append((time.perf_counter(), cpu_seconds(), time.process_time()))
    rows = psi.lender_intersection(state, lender, response, workers=workers)
    marks.append((time.perf_counter(), cpu_seconds(), time.process_time()))
    tokens, lender_rows = alignment_tokens.lender_alignment(lender, psi.require_intersection(rows), SECRET)
    token_bytes = alignment_tokens.tokens_payload(tokens)
    received = alignment_tokens.tokens_from_payload(token_bytes)
    payment_rows = alignment_tokens.rows_for_tokens(payment, received, SECRET)
    marks.append((time.perf_counter(), cpu_seconds(), time.process_time()))
    if len(rows) != expected or len(payment_rows) != expected:
        raise SystemExit(f"wrong intersection: {len(rows)} found, {expected} expected")
    if any(payment[i] != lender[j] for i, j in zip(payment_rows[:1000].tolist(), lender_rows[:1000].tolist(),
                                                    strict=True)):
        raise SystemExit("the two parties' orders differ")
    out: dict[str, float] = {}
    for step, (start, end) in zip(STEPS[:-1], itertools.pairwise(marks), strict=True):
        out[step] = end[0] - start[0]
        out[step.replace("_s", "_cpu_s")] = end[1] - start[1]
        out[step.replace("_s", "_self_cpu_s")] = end[2] - start[2]  # this process alone: the serial part (x25519)
    out["total_s"] = marks[-1][0] - marks[0][0]
    out["total_cpu_s"] = marks[-1][1] - marks[0][1]
    if protocol == "x25519":  # on `workers` idle cores: the worker processes' CPU spread over them, the rest serial
        n = workers or psi.default_workers()
        out["projected_idle_s"] = sum(out[f"{s.replace('_s', '_self_cpu_s')}"]
                                      + (out[s.replace("_s", "_cpu_s")] - out[s.replace("_s", "_self_cpu_s")]) / n
                                      for s in STEPS[:-1])
    out.update({"request_bytes": len(request), "response_bytes": len(response), "tokens_bytes": len(token_bytes),
                "intersection": len(rows)})
    return out


def markdown(results: list[dict]) -> str:
    head = ("| payment x lender | protocol | ds | workers | repeats | lender request s | payment prepare s | "
            "payment respond s | lender intersection s | tokens s | total s | total CPU s | request CPU s | "
            "prepare CPU s | respond CPU s | intersection CPU s | serial CPU s | projected idle s | request MB | "
            "response MB | tokens MB | intersection |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        m = r["median"]
        ds = r["data_structure"] if r["protocol"] == "openmined" else "-"
        lines.append(f"| {r['n']:,} x {r['n_lender']:,} | {r['protocol']} | {ds} | {r['workers']} | {r['repeats']} | "
                     + " | ".join(f"{m[k]:.2f}" for k in STEPS)
                     + f" | {m['total_cpu_s']:.1f} | "
                     + " | ".join(f"{m[k]:.1f}" for k in ("lender_request_cpu_s", "payment_prepare_cpu_s",
                                                          "payment_respond_cpu_s", "lender_intersection_cpu_s"))
                     + (f" | {sum(m[s.replace('_s', '_self_cpu_s')] for s in STEPS[:-1]):.1f} | "
                        f"{m['projected_idle_s']:.1f} | " if "projected_idle_s" in m else " | - | - | ")
                     + " | ".join(f"{m[k] / 1e6:.2f}" for k in SIZES) + f" | {int(m['intersection']):,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--overlap", type=float, default=0.3, help="share of the lender's IDs the payment holder has")
    parser.add_argument("--lender", type=int, default=None,
                        help="the lender's set size (default: the same as the payment holder's, each --sizes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ds", nargs="+", default=[psi.DEFAULT_DATA_STRUCTURE], choices=["gcs", "bloom", "raw"])
    parser.add_argument("--protocol", nargs="+", default=[psi.DEFAULT_PROTOCOL], choices=list(psi.PROTOCOLS))
    parser.add_argument("--workers", type=int, default=None,
                        help="threads (openmined) or processes (x25519) per step (default: all usable CPUs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not 0.0 < args.overlap <= 1.0:
        parser.error("--overlap must be in (0, 1]")
    workers = args.workers or psi.default_workers()
    print(f"# PSI benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{workers} thread(s) per step, load average at start {os.getloadavg()[0]:.2f}", file=sys.stderr)
    results = []
    for n in args.sizes:
        payment, lender, common = make_ids(n, args.overlap, seed=n, n_lender=args.lender)
        variants = [(p, ds) for p in args.protocol for ds in (args.ds if p == "openmined" else args.ds[:1])]
        runs_of: dict[tuple[str, str], list[dict[str, float]]] = {v: [] for v in variants}
        for repeat in range(args.repeats):  # variants interleaved, so load changes hit each alike
            for protocol, ds in variants:
                run = run_once(payment, lender, common, ds, workers, protocol)
                run["load_average"] = os.getloadavg()[0]
                runs_of[(protocol, ds)].append(run)
                print(f"  N={n:,} {protocol} {ds} run {repeat + 1}/{args.repeats}: total {run['total_s']:.1f} s, "
                      f"CPU {run['total_cpu_s']:.1f} s, load {run['load_average']:.2f}", file=sys.stderr, flush=True)
        for (protocol, ds), runs in runs_of.items():
            median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            results.append({"n": n, "n_lender": len(lender), "overlap": args.overlap, "protocol": protocol,
                            "data_structure": ds, "workers": workers, "repeats": args.repeats, "median": median,
                            "runs": runs, "load_average_end": os.getloadavg()[0]})
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
