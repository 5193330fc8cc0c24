#!/usr/bin/env python
"""Scoring speed: batch rows/s on ONE core (onnxruntime vs torch, same weights) and online latency over loopback.

Why these numbers: batch scoring must keep up with a whole book (goal >= 500k rows/s on one core with reasons, issue
20 item 8) and the online path must fit inside an application's request budget (goal p99 <= 20 ms for POST /score
on loopback, payment gRPC call included). Every figure is the median of --repeats runs; the machine may be shared,
so the spread is printed.

Batch (one intra-op thread for onnxruntime and torch, same model, --rows rows made by tiling the real ones):
  probability only     payment part + lender part, raw features in, probability out
  + reasons            the same plus occlusion reasons, points, tier, limit (fedscore.clients.lender.scoring, as batch)
  score_batch          the whole fedscore.scoring.score_batch on the data folder (reading, featurising included)
Online: both services started as separate processes (`serve payment`, `serve lender`), then --requests sequential
POST /score over one keep-alive connection after a warm-up.

    python scripts/bench_scoring.py                        # builds synthetic data + a model in a temp folder
    python scripts/bench_scoring.py --model RUN/model --run RUN --data DIR --json bench.json
    python scripts/bench_scoring.py --model RUN/model --run RUN --data DIR --batch-only --reference 11549d7

--reference REV: the batch "+ reasons" figure for the code at git revision REV and for this tree, measured in
alternating worker processes (REV, this, REV, this, ...) on the same rows, so a shared machine's load hits both
alike; prints each pair and the median ratio.

What "+ reasons" times: `PaymentPart.embed` on the payment rows and `LenderScorer.score` on the lender rows (the
lender part, reasons, points, tier, limit, review), on float32 arrays already in memory: reading the files and
featurising are outside the timed region (they are in the "score_batch end to end" row only). Reasons come from
the linear shortcut when the bundle's lender part says it is linear and passes the load-time check, else by
occlusion; the row's name says which, and a linear bundle also gets the occlusion figure on the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("FEDSCORE_TORCH_THREADS", "1")

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("FEDSCORE_BENCH_REFERENCE"):  # a reference worker imports the old tree from PYTHONPATH
    sys.path.insert(0, str(ROOT))

from fedscore.clients.lender.scoring import LenderScorer, load_applicant_features  # noqa: E402
from fedscore.clients.payment.data import load_payment_table  # noqa: E402
from fedscore.clients.payment.scoring import PaymentPart, load_payment_users  # noqa: E402
from fedscore.scoring import score_batch  # noqa: E402
from fedscore.shared.model.export_onnx import LenderScoring, PaymentScoring  # noqa: E402
from fedscore.shared.scoring.bundle import load_scoring_bundle  # noqa: E402
from fedscore.shared.scoring.payment_signals import PaymentSignals  # noqa: E402
from fedscore.shared.waiting import wait_until  # noqa: E402
from fedscore.torch_parts import load_torch_parts  # noqa: E402


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: session allocations, first-call paths
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def timed_cpu(fn: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds of this process) per run after a warm-up. On a shared machine the wall time
    counts the time other processes held the core; the CPU time does not (cache and memory-bus sharing still
    shows), so --reference reports both."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    return wall, cpu


def rows_per_s(rows: int, seconds: list[float]) -> dict[str, float]:
    rates = [rows / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def prepare(args: argparse.Namespace, scratch: Path) -> tuple[Path, Path, Path]:
    """(model dir, run dir, data dir): the given ones, or synthetic data and a freshly trained model."""
    if args.model and args.run and args.data:
        return args.model, args.run, args.data
    from fedscore.runs import run_inprocess
    from fedscore.shared.config import load_config
    from fedscore.synth import synthesize

    print(f"building synthetic data ({args.users} users) and training a model in {scratch} ...", file=sys.stderr)
    synthesize(args.users, 0, scratch / "data")
    run_inprocess(load_config(None, ["baselines.enabled=false"]), scratch / "data", scratch / "run")
    return scratch / "run" / "model", scratch / "run", scratch / "data"


def bench_batch(model: Path, run: Path, data: Path, rows: int, repeats: int) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    bundle = load_scoring_bundle(model)
    applicants = load_applicant_features(bundle, data)
    users = load_payment_users(bundle, data)
    from fedscore.clients.payment.data import load_payment_table
    from fedscore.shared.scoring.bundle import ordered_matrix

    raw_p_all = ordered_matrix(load_payment_table(data / "payment"), bundle.payment_features, "payment")
    tile = -(-rows // len(applicants.ids))
    raw_l = np.tile(applicants.features, (tile, 1))[:rows]
    raw_p = np.tile(raw_p_all, (-(-rows // len(raw_p_all)), 1))[:rows]
    payment, lender = PaymentPart(bundle, threads=1), LenderScorer(bundle, threads=1)
    signals = PaymentSignals.neutral(rows)
    has_payment = np.ones(rows, dtype=bool)

    parts = load_torch_parts(run)
    torch_p, torch_l = PaymentScoring(parts.model_p, parts.scaler_p).eval(), LenderScoring(parts.model_l,
                                                                                          parts.scaler_l).eval()
    tp, tl = torch.from_numpy(raw_p), torch.from_numpy(raw_l)

    def torch_probability() -> None:
        with torch.inference_mode():
            torch_l(tl, torch_p(tp))

    result = {
        "onnxruntime, probability only": rows_per_s(rows, timed(
            lambda: lender.probability(raw_l, payment.embed(raw_p)), repeats)),
        "torch, probability only": rows_per_s(rows, timed(torch_probability, repeats)),
        f"onnxruntime, + reasons ({lender.reasons_by}), points, tier, limit": rows_per_s(rows, timed(
            lambda: lender.score(raw_l, payment.embed(raw_p), has_payment, signals), repeats)),
    }
    if lender.reasons_by != "occlusion":  # the fallback for a lender part that is not linear, on the same rows
        occluding = LenderScorer(bundle, threads=1, reasons="occlusion")
        result["onnxruntime, + reasons (occlusion), points, tier, limit"] = rows_per_s(rows, timed(
            lambda: occluding.score(raw_l, payment.embed(raw_p), has_payment, signals), repeats))
    n = len(applicants.ids)
    result[f"score_batch end to end ({n} applicants, {len(users.ids)} payment users, reading + featurising)"] = \
        rows_per_s(n, timed(lambda: score_batch(model, data), repeats))
    return result


def record_intersection(home: Path, bundle, data: Path) -> None:
    """What the payment party's export writes into its home (served/S.ids + S.json): here every applicant it has,
    served without noise (the benchmark measures latency, not privacy)."""
    sha = bundle.part_sha256("payment")
    users = set(load_payment_table(Path(data) / "payment").ids)
    ids = sorted(users & set(load_applicant_features(bundle, data).ids))
    (home / "served").mkdir(parents=True, exist_ok=True)
    (home / "served" / f"{sha}.ids").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    (home / "served" / f"{sha}.json").write_text(json.dumps({
        "feature_sigma": None, "embedding_clip": 1.0, "feature_neighbouring": "add_remove", "delta": 1e-6,
        "replayable_noise": False}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def services(model: Path, data: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """Both services as separate processes (as deployed); yields the lender's base URL and the headers (bearer
    token) its callers send, once it answers."""
    grpc_port, http_port = free_port(), free_port()
    cli = [sys.executable, "-m", "fedscore.cli_scoring", "serve"]
    common = ["--model", str(model), "--data", str(data)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    home = Path(tempfile.mkdtemp(prefix="bench-payment-home-"))
    bundle = load_scoring_bundle(model)
    record_intersection(home, bundle, data)
    payment = ["--party-home", str(home), "--insecure-local", "--allow-unprotected", "--disclose-signals"]
    procs = [subprocess.Popen([*cli, "payment", *common, *payment, "--port", str(grpc_port)], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL)]
    token = secrets.token_urlsafe(32)
    token_file = home / "api-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    headers = {"authorization": f"Bearer {token}"}
    procs.append(subprocess.Popen([*cli, "lender", *common, "--port", str(http_port), "--payment-address",
                                   f"127.0.0.1:{grpc_port}", "--insecure-payment", "--api-token-file",
                                   str(token_file)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL))
    url = f"http://127.0.0.1:{http_port}"
    try:

        def ready() -> bool:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a scoring service exited during startup")
            try:
                reply = httpx.get(f"{url}/health", timeout=2, headers=headers)
                return bool(reply.json().get("payment_service") == "ready")
            except (httpx.HTTPError, ValueError):
                return False

        wait_until(ready, 120, 0.2, "services did not become ready", RuntimeError)
        yield url, headers
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(home, ignore_errors=True)


def bench_online(model: Path, data: Path, requests: int, repeats: int) -> dict[str, float]:
    bundle = load_scoring_bundle(model)
    ids = load_applicant_features(bundle, data).ids
    rng = np.random.default_rng(0)
    p50, p99, mean = [], [], []
    with services(model, data) as (url, headers), httpx.Client(base_url=url, timeout=10, headers=headers) as client:
        for applicant in rng.choice(ids, size=200):  # warm-up
            client.post("/score", json={"id": str(applicant)}).raise_for_status()
        for _ in range(repeats):
            latencies = []
            for applicant in rng.choice(ids, size=requests):
                start = time.perf_counter()
                response = client.post("/score", json={"id": str(applicant)})
                latencies.append((time.perf_counter() - start) * 1e3)
                response.raise_for_status()
            p50.append(float(np.percentile(latencies, 50)))
            p99.append(float(np.percentile(latencies, 99)))
            mean.append(float(np.mean(latencies)))
    return {"p50_ms": statistics.median(p50), "p99_ms": statistics.median(p99), "mean_ms": statistics.median(mean),
            "p99_ms_min": min(p99), "p99_ms_max": max(p99), "requests": requests, "repeats": repeats}


def reasons_rate(model: Path, data: Path, rows: int, repeats: int) -> tuple[dict[str, float], dict[str, float], str]:
    """Rows per wall second and per CPU second of the batch path with reasons (payment embed + lender score), the
    figure --reference compares, and how the reasons were computed ("occlusion" for a tree before the shortcut)."""
    torch.set_num_threads(1)
    from fedscore.shared.scoring.bundle import ordered_matrix

    bundle = load_scoring_bundle(model)
    applicants = load_applicant_features(bundle, data)
    raw_p_all = ordered_matrix(load_payment_table(data / "payment"), bundle.payment_features, "payment")
    raw_l = np.tile(applicants.features, (-(-rows // len(applicants.ids)), 1))[:rows]
    raw_p = np.tile(raw_p_all, (-(-rows // len(raw_p_all)), 1))[:rows]
    payment, lender = PaymentPart(bundle, threads=1), LenderScorer(bundle, threads=1)
    signals, has_payment = PaymentSignals.neutral(rows), np.ones(rows, dtype=bool)
    wall, cpu = timed_cpu(lambda: lender.score(raw_l, payment.embed(raw_p), has_payment, signals), repeats)
    return rows_per_s(rows, wall), rows_per_s(rows, cpu), getattr(lender, "reasons_by", "occlusion")


def reference_tree(revision: str, scratch: Path) -> Path:
    """An importable `fedscore` package of the code at `revision` (git archive, laid out as pyproject maps it)."""
    source, package = scratch / "reference-src", scratch / "reference-pkg"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    shutil.copytree(source / "fedscore", package / "fedscore")
    for name in ("server", "clients", "shared", "proto"):
        shutil.copytree(source / name, package / "fedscore" / name)
    return package


def compare_with_reference(revision: str, model: Path, data: Path, rows: int, repeats: int, rounds: int,
                           scratch: Path) -> dict:
    package = reference_tree(revision, scratch)
    pairs = []
    for _ in range(rounds):
        pair = {}
        for name, env in (("reference", {"PYTHONPATH": str(package), "FEDSCORE_BENCH_REFERENCE": "1"}),
                          ("current", {})):
            done = subprocess.run([sys.executable, __file__, "--reasons-worker", "--model", str(model), "--data",
                                   str(data), "--rows", str(rows), "--repeats", str(repeats)],
                                  env={**os.environ, **env}, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if name == "reference" and not result["fedscore"].startswith(str(package)):
                raise SystemExit(f"the reference worker imported {result['fedscore']}, not {package}")
            pair[name] = result["rows_per_s"]["median"]
            pair[f"{name}_cpu"] = result["rows_per_cpu_s"]["median"]
            pair[f"{name}_reasons_by"] = result["reasons_by"]
        pairs.append(pair)
    ratios = [p["current"] / p["reference"] for p in pairs]
    cpu_ratios = [p["current_cpu"] / p["reference_cpu"] for p in pairs]
    return {"revision": revision, "rows": rows, "pairs": pairs, "median_ratio": statistics.median(ratios),
            "reference_median": statistics.median(p["reference"] for p in pairs),
            "current_median": statistics.median(p["current"] for p in pairs),
            "median_cpu_ratio": statistics.median(cpu_ratios),
            "reference_cpu_median": statistics.median(p["reference_cpu"] for p in pairs),
            "current_cpu_median": statistics.median(p["current_cpu"] for p in pairs)}


def markdown(batch: dict[str, dict[str, float]], online: dict[str, float], rows: int) -> str:
    lines = [f"| batch, 1 core, {rows} rows | rows/s (median) | min .. max |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['median']:,.0f} | {r['min']:,.0f} .. {r['max']:,.0f} |" for name, r in batch.items()]
    lines += ["", f"| online POST /score, loopback, {online['requests']} sequential requests | p50 ms | p99 ms "
                  "| mean ms |", "|---|---:|---:|---:|",
              f"| lender HTTP + payment gRPC (median of {online['repeats']}) | {online['p50_ms']:.2f} "
              f"| {online['p99_ms']:.2f} ({online['p99_ms_min']:.2f} .. {online['p99_ms_max']:.2f}) "
              f"| {online['mean_ms']:.2f} |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="RUN_DIR/model (with --run and --data; else built)")
    parser.add_argument("--run", type=Path, help="RUN_DIR (its parties' state has the torch weights)")
    parser.add_argument("--data", type=Path, help="DIR with payment/ and lender/")
    parser.add_argument("--users", type=int, default=20000, help="synthetic users when building")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--batch-only", action="store_true", help="skip the online part")
    parser.add_argument("--reference", help="git revision to compare the batch + reasons rate with, side by side")
    parser.add_argument("--rounds", type=int, default=5, help="alternating worker pairs for --reference")
    parser.add_argument("--reasons-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reasons_worker:
        import fedscore

        rate, cpu_rate, reasons_by = reasons_rate(args.model, args.data, args.rows, args.repeats)
        print(json.dumps({"rows_per_s": rate, "rows_per_cpu_s": cpu_rate, "reasons_by": reasons_by,
                          "fedscore": str(Path(fedscore.__file__).resolve())}))
        return
    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as scratch:
        model, run, data = prepare(args, Path(scratch))
        batch = bench_batch(model, run, data, args.rows, args.repeats)
        online = None if args.batch_only else bench_online(model, data, args.requests, args.repeats)
        compared = None if not args.reference else compare_with_reference(
            args.reference, model, data, args.rows, args.repeats, args.rounds, Path(scratch))
    if online is not None:
        print(markdown(batch, online, args.rows))
    else:
        print("\n".join(f"| {name} | {r['median']:,.0f} | {r['min']:,.0f} .. {r['max']:,.0f} |"
                        for name, r in batch.items()))
    if compared is not None:
        print(f"\nbatch + reasons, {args.rows} rows, 1 core, alternating workers: {compared['revision']} "
              f"{compared['reference_median']:,.0f} rows/s, this tree {compared['current_median']:,.0f} rows/s, "
              f"median ratio {compared['median_ratio']:.2f}x; per CPU second {compared['reference_cpu_median']:,.0f} "
              f"and {compared['current_cpu_median']:,.0f} rows/s, median ratio {compared['median_cpu_ratio']:.2f}x")
        for i, pair in enumerate(compared["pairs"], 1):
            print(f"| pair {i} | {pair['reference']:,.0f} | {pair['current']:,.0f} | "
                  f"{pair['current'] / pair['reference']:.2f} | {pair['reference_cpu']:,.0f} | "
                  f"{pair['current_cpu']:,.0f} | {pair['current_cpu'] / pair['reference_cpu']:.2f} | "
                  f"{pair['current_reasons_by']} |")
    if args.json:
        args.json.write_text(json.dumps({"batch_rows_per_s": batch, "online": online, "rows": args.rows,
                                         "reference": compared, "cpu_count": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
