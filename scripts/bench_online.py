#!/usr/bin/env python
"""Online scoring under load: fixed-rate (open-loop) POST /score on loopback, mutual TLS and the ledger charged.

What runs (as deployed, each a process of its own, 127.0.0.1 only):
  `fedscore serve payment`  gRPC with mutual TLS (a throwaway `fedscore certs` PKI); every answer is recorded in the
                            party's ledger (privacy-ledger.sqlite: the answer row, and a charge when it raises the
                            worst case) and noised, durably, before it leaves
  `fedscore serve lender`   HTTP with a bearer token, calling the payment service for each applicant
  this script               the load generator: requests are sent at fixed times (rate r: one every 1/r s, whatever
                            the answers do), so a slow server cannot slow the load down and hide its own latency
                            (coordinated omission); a latency is measured from the request's scheduled time to the
                            last byte of its answer. Bounded: at most rate x duration requests per phase.

Phases: each --rates rate for --duration s (after a --warmup s at that rate, not counted), on a fresh copy of the
trained payment home; the same after --prefill answers were written into a copy's ledger (as a long-lived service
would have recorded them); then the kill test: load at --kill-rate, SIGKILL the payment service after
--kill-after s, and check that every answer the client received is in the ledger (per user: the ledger's count >=
the answers the client got), and that the ledger opens cleanly afterwards.

Requested applicants come from the served intersection (every answer is a release; outside it the payment service
answers NOT_FOUND without touching the ledger, which would flatter the figures), as a portfolio: each served
applicant once, in random order, before any applicant a second time. Each time the worst case per user rises the
ledger is charged (composed in the background, ahead of need: `serve payment --charge-ahead/--reserve`); the
number of charges made during a phase is reported.

    python scripts/bench_online.py                              # synth data + a model with feature noise, ~9 min
    python scripts/bench_online.py --duration 20 --prefill 0 --rates 50,200
    python scripts/bench_online.py --model RUN/model --data DIR --payment-home HOME   # an existing model + home
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedscore.clients.lender.scoring import load_applicant_features  # noqa: E402
from fedscore.clients.payment.release_guard import GUARANTEE, _model_id, release_counts  # noqa: E402
from fedscore.clients.payment.served import load_served  # noqa: E402
from fedscore.shared.party_home import PartyHome  # noqa: E402
from fedscore.shared.scoring.bundle import load_scoring_bundle  # noqa: E402

FEDSCORE = [sys.executable, "-m", "fedscore.cli"]
BUDGET = 1e9  # the benchmark measures latency, not privacy: a budget that never refuses
PAYMENT_OPTIONS: tuple[str, ...] = ()  # extra `serve payment` options (--charge-ahead, --reserve)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare(args: argparse.Namespace, scratch: Path) -> tuple[Path, Path, Path]:
    """(model dir, data dir, payment home): given, or synthetic data and a model trained with feature noise."""
    if args.model and args.data and args.payment_home:
        return args.model, args.data, args.payment_home
    env = {**os.environ, "FEDSCORE_HOME": str(scratch / "fedscore-home")}
    print(f"building synthetic data ({args.users} users) and training a model with feature noise in {scratch}",
          file=sys.stderr)
    subprocess.run([*FEDSCORE, "data", "synth", "--users", str(args.users), "--out", str(scratch / "data")],
                   check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    subprocess.run([*FEDSCORE, "train", "--data", str(scratch / "data"), "--out", str(scratch / "run"),
                    "--set", "training.rounds=2", "--set", "training.local_epochs=1",
                    "--set", "baselines.enabled=false", "--set", "baselines.references=false",
                    "--set", "privacy.feature_epsilon=8"], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return scratch / "run" / "model", scratch / "data", scratch / "fedscore-home" / "parties" / "payment"


def prefill(home: Path, model: Path, answers: int, versions: int = 10) -> float:
    """Write `answers` online answers into the home's ledger as a long-lived service would have: under `versions`
    earlier model versions, each answering distinct applicants once, and one charge per version (its worst case
    of one release). The model under test starts from zero answers of its own. Seconds taken."""
    from fedscore.shared.privacy import Ledger, embedding_release
    from fedscore.shared.privacy.ledger_store import open_store

    started = time.perf_counter()
    sha = load_scoring_bundle(model).part_sha256("payment")
    meta = load_served(home, sha).meta
    store = open_store(home / PartyHome.LEDGER, "payment")
    now = time.time()
    per_version = -(-answers // versions)
    ledger = Ledger(home / PartyHome.LEDGER, {GUARANTEE: BUDGET}, meta.delta, party="payment")
    for v in range(versions):
        old = f"{v:02d}" * 32  # an earlier payment part's sha256

        def write(conn, old=old, v=v) -> None:
            model_id = _model_id(conn, old)
            count = min(per_version, answers - v * per_version)
            conn.executemany("INSERT INTO releases (model, user_id, n, released_at) VALUES (?, ?, 1, ?)",
                             ((model_id, f"past-applicant-{v}-{k}", now) for k in range(count)))

        store.submit(write)
        ledger.charge([embedding_release(meta.feature_sigma, meta.embedding_clip, 1, meta.feature_neighbouring)],
                      GUARANTEE, note=f"benchmark pre-fill: model version {old[:12]}, worst case 1")
    return time.perf_counter() - started


@dataclass
class Services:
    payment: subprocess.Popen
    lender: subprocess.Popen
    http_port: int
    token: str
    logs: list[Path] = field(default_factory=list)


@contextmanager
def services(model: Path, data: Path, home: Path, pki: Path, scratch: Path, name: str,
             payment_options: tuple[str, ...] = ()) -> Iterator[Services]:
    """Both services as separate processes, mutual TLS between them, bearer token in front; yields once ready."""
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "FEDSCORE_HOME": str(scratch / f"fedscore-home-{name}"), "OMP_NUM_THREADS": "1"}
    common = ["--model", str(model), "--data", str(data), "--host", "127.0.0.1"]
    logs = [scratch / f"{name}-payment.log", scratch / f"{name}-lender.log"]
    payment = subprocess.Popen(
        [*FEDSCORE, "serve", "payment", *common, "--port", str(grpc_port), "--party-home", str(home),
         "--budget", f"{GUARANTEE}={BUDGET}", "--tls-cert", str(pki / "server.pem"), "--tls-key",
         str(pki / "server.key"), "--client-ca", str(pki / "ca.pem"), *payment_options],
        env=env, cwd=ROOT, stdout=logs[0].open("w"), stderr=subprocess.STDOUT)
    token = secrets.token_urlsafe(32)
    token_file = scratch / f"{name}-api-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    lender = subprocess.Popen(
        [*FEDSCORE, "serve", "lender", *common, "--port", str(http_port), "--payment-address",
         f"localhost:{grpc_port}", "--payment-ca", str(pki / "ca.pem"), "--client-cert", str(pki / "lender.pem"),
         "--client-key", str(pki / "lender.key"), "--api-token-file", str(token_file)],
        env=env, cwd=ROOT, stdout=logs[1].open("w"), stderr=subprocess.STDOUT)
    running = Services(payment, lender, http_port, token, logs)
    try:
        deadline = time.monotonic() + 300
        while not _ready(http_port, token):
            for proc, log in zip((payment, lender), logs, strict=True):
                if proc.poll() is not None:
                    raise RuntimeError(f"a service exited during startup:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("services did not become ready within 300 s")
            time.sleep(0.5)
        yield running
    finally:
        for proc in (lender, payment):
            if proc.poll() is None:
                proc.terminate()
        for proc in (lender, payment):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ready(port: int, token: str) -> bool:
    import httpx

    try:
        reply = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, headers={"authorization": f"Bearer {token}"})
        return bool(reply.json().get("payment_service") == "ready")
    except (httpx.HTTPError, ValueError):
        return False


# -- the load generator ------------------------------------------------------------------------------------------

class Connection:
    """One keep-alive HTTP/1.1 connection: a request, then its whole answer (Content-Length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        return status, body


@dataclass
class PhaseResult:
    rate: float
    duration: float
    latencies_ms: list[float]
    statuses: collections.Counter
    received: collections.Counter  # applicant id -> answers received with status 200
    late_sends_ms: float  # how far behind schedule the generator itself sent its last request
    slow: list[tuple[float, float]] = field(default_factory=list)  # (s into the phase, ms) of answers over 50 ms

    def summary(self) -> dict[str, float | int | dict]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.asarray([np.nan])
        return {"rate": self.rate, "seconds": self.duration, "sent": int(sum(self.statuses.values())),
                "ok": int(self.statuses.get(200, 0)),
                "errors": {str(k): v for k, v in self.statuses.items() if k != 200},
                "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
                "p99_ms": float(np.percentile(lat, 99)), "p999_ms": float(np.percentile(lat, 99.9)),
                "max_ms": float(np.max(lat)), "generator_lag_ms": self.late_sends_ms,
                "slow_answers_by_second": _by_second(self.slow)}


def _by_second(slow: list[tuple[float, float]]) -> dict[str, int]:
    """How many answers took over 50 ms, per second of the phase they were scheduled in (when the tail happens:
    beside a charge, or spread out)."""
    counts = collections.Counter(int(t) for t, _ in slow)
    return {str(second): n for second, n in sorted(counts.items())}


async def _load(port: int, token: str, ids: list[str], rate: float, seconds: float, seed: int,
                connections: int = 64) -> PhaseResult:
    """Send rate x seconds requests at fixed times over a pool of keep-alive connections; a request that finds
    every connection busy waits for one (and that wait counts in its latency)."""
    rng = np.random.default_rng(seed)  # which applicant: load shape only, no guarantee rests on it
    total = int(rate * seconds)
    # a portfolio: every served applicant once (random order) before anyone a second time
    picks = np.concatenate([rng.permutation(len(ids)) for _ in range(-(-total // len(ids)))])[:total]
    pool: asyncio.Queue[Connection | None] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(None)  # opened on first use
    latencies: list[float] = []
    slow: list[tuple[float, float]] = []
    statuses: collections.Counter = collections.Counter()
    received: collections.Counter = collections.Counter()
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    lag = 0.0

    async def one(k: int, scheduled: float) -> None:
        applicant = ids[picks[k]]
        body = json.dumps({"id": applicant}).encode()
        request = (f"POST /score HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n"
                   f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
        conn = await pool.get()
        try:
            if conn is None:
                conn = Connection(*await asyncio.open_connection("127.0.0.1", port))
            status, _ = await asyncio.wait_for(conn.post(request), timeout=30)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            status = -1
            if conn is not None:
                conn.writer.close()
            conn = None
        pool.put_nowait(conn)
        statuses[status] += 1
        if status == 200:
            received[applicant] += 1
            latencies.append((loop.time() - scheduled) * 1e3)
            if latencies[-1] > 50:
                slow.append((scheduled - start, latencies[-1]))

    tasks = []
    for k in range(total):
        scheduled = start + k / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lag = max(lag, (loop.time() - scheduled) * 1e3)
        tasks.append(asyncio.create_task(one(k, scheduled)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        conn = pool.get_nowait()
        if conn is not None:
            conn.writer.close()
    return PhaseResult(rate, seconds, latencies, statuses, received, lag, slow)


def load(port: int, token: str, ids: list[str], rate: float, seconds: float, seed: int) -> PhaseResult:
    return asyncio.run(_load(port, token, ids, rate, seconds, seed))


# -- phases ------------------------------------------------------------------------------------------------------

def served_applicants(model: Path, data: Path, home: Path) -> list[str]:
    sha = load_scoring_bundle(model).part_sha256("payment")
    served = load_served(home, sha).ids
    return sorted(served & set(load_applicant_features(load_scoring_bundle(model), data).ids))


def _online_charges(home: Path) -> int:
    from fedscore.shared.privacy.ledger import ledger_entries

    return sum(e["guarantee"] == GUARANTEE for e in ledger_entries(home / PartyHome.LEDGER, "payment"))


def _charge_times(home: Path, skip: int, started: float) -> list[int]:
    """Seconds into the phase (the ledger records whole seconds) of the charges made after the first `skip`."""
    from datetime import datetime

    from fedscore.shared.privacy.ledger import ledger_entries

    entries = [e for e in ledger_entries(home / PartyHome.LEDGER, "payment") if e["guarantee"] == GUARANTEE]
    return [round(datetime.fromisoformat(e["recorded_at"]).timestamp() - started) for e in entries[skip:]]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process and its live children (the payment service's composing worker) have
    used, threads included: per-request CPU cost is what a shared machine cannot distort, unlike latency."""
    import psutil

    try:
        process = psutil.Process(pid)
        processes = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for each in processes:
        try:
            times = each.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def run_rates(label: str, model: Path, data: Path, home: Path, pki: Path, scratch: Path, rates: list[float],
              duration: float, warmup: float, seed: int) -> list[dict]:
    ids = served_applicants(model, data, home)
    rows = []
    with services(model, data, home, pki, scratch, label, PAYMENT_OPTIONS) as running:
        for k, rate in enumerate(rates):
            if warmup > 0:
                load(running.http_port, running.token, ids, rate, warmup, seed + 1000 + k)
            charges = _online_charges(home)
            cpu = [cpu_seconds(running.payment.pid), cpu_seconds(running.lender.pid)]
            started = time.time()
            result = load(running.http_port, running.token, ids, rate, duration, seed + k)
            sent = max(1, sum(result.statuses.values()))
            cpu_ms = {name: (cpu_seconds(proc.pid) - before) * 1e3 / sent for name, proc, before in
                      (("payment", running.payment, cpu[0]), ("lender", running.lender, cpu[1]))}
            row = {"phase": label, **result.summary(), "cpu_ms_per_request": cpu_ms,
                   "ledger_charges": _online_charges(home) - charges,
                   "charges_at_s": _charge_times(home, charges, started)}
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    return rows


def kill_test(model: Path, data: Path, home: Path, pki: Path, scratch: Path, rate: float, after: float,
              seed: int) -> dict:
    """Load at `rate`; SIGKILL the payment service `after` s in; every answer received must be in the ledger."""
    ids = served_applicants(model, data, home)
    sha = load_scoring_bundle(model).part_sha256("payment")
    before = release_counts(home).get(sha, {})
    with services(model, data, home, pki, scratch, "kill", PAYMENT_OPTIONS) as running:

        async def both() -> PhaseResult:
            async def killer() -> None:
                await asyncio.sleep(after)
                running.payment.send_signal(signal.SIGKILL)

            task = asyncio.create_task(killer())
            result = await _load(running.http_port, running.token, ids, rate, after + 2.0, seed)
            await task
            return result

        result = asyncio.run(both())
        running.payment.wait()
    from fedscore.shared.privacy.ledger_store import LedgerStore

    LedgerStore(home / PartyHome.LEDGER, "payment")  # a new process's open: checks the file after the kill
    after_counts = release_counts(home).get(sha, {})
    missing = {user: n for user, n in result.received.items()
               if after_counts.get(user, 0) - before.get(user, 0) < n}
    recorded = sum(after_counts.values()) - sum(before.values())
    return {"phase": "kill", "rate": rate, "killed_after_s": after, "answers_received": sum(result.received.values()),
            "answers_recorded_in_ledger": recorded, "users_with_an_unrecorded_answer": len(missing),
            "statuses": {str(k): v for k, v in result.statuses.items()}, "ledger_opens_after_kill": True}


def markdown(rows: list[dict], kill: dict | None, prefill_s: float | None, prefill_n: int) -> str:
    lines = ["| phase | rate (req/s) | s | ok / sent | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors "
             "| CPU ms/request payment, lender | ledger charges |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        cpu = r["cpu_ms_per_request"]
        lines.append(f"| {r['phase']} | {r['rate']:g} | {r['seconds']:g} | {r['ok']}/{r['sent']} | {r['p50_ms']:.2f} "
                     f"| {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {r['max_ms']:.1f} "
                     f"| {r['errors'] or '-'} | {cpu['payment']:.2f}, {cpu['lender']:.2f} | {r['ledger_charges']} |")
    if prefill_s is not None:
        lines.append(f"\npre-fill: {prefill_n:,} answers written into the ledger in {prefill_s:.1f} s")
    if kill is not None:
        lines.append(f"\nkill test at {kill['rate']:g} req/s, SIGKILL after {kill['killed_after_s']:g} s: "
                     f"{kill['answers_received']} answers received by the client, {kill['answers_recorded_in_ledger']} "
                     f"recorded in the ledger, {kill['users_with_an_unrecorded_answer']} users with an answer "
                     f"received but not recorded; statuses {kill['statuses']}; the ledger opened cleanly afterwards")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="RUN_DIR/model (with --data and --payment-home; else built)")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--payment-home", type=Path, help="the payment home the run exported to (copied, not used)")
    parser.add_argument("--users", type=int, default=20000, help="synthetic users when building")
    parser.add_argument("--rates", default="50,100,200")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--prefill", type=int, default=1_000_000, help="answers already in the ledger (0: skip)")
    parser.add_argument("--prefill-rates", default="200")
    parser.add_argument("--kill-rate", type=float, default=200.0, help="0: skip the kill test")
    parser.add_argument("--kill-after", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--payment-option", action="append", default=[],
                        help="extra `serve payment` option, e.g. --payment-option=--reserve=8 (repeat)")
    args = parser.parse_args()
    global PAYMENT_OPTIONS
    PAYMENT_OPTIONS = tuple(args.payment_option)
    rates = [float(r) for r in args.rates.split(",") if r]
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
        scratch = Path(tmp)
        model, data, source_home = prepare(args, scratch)
        pki = scratch / "pki"
        subprocess.run([*FEDSCORE, "certs", "--out", str(pki)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)

        def home_copy(name: str) -> Path:
            target = scratch / "homes" / name
            shutil.copytree(source_home, target, ignore=shutil.ignore_patterns("*.lock"))
            return target

        rows = run_rates("fresh ledger", model, data, home_copy("fresh"), pki, scratch, rates, args.duration,
                         args.warmup, args.seed)
        prefill_s = None
        if args.prefill > 0:
            home = home_copy("prefilled")
            prefill_s = prefill(home, model, args.prefill)
            rows += run_rates(f"{args.prefill:,} answers already in the ledger", model, data, home, pki, scratch,
                              [float(r) for r in args.prefill_rates.split(",") if r], args.duration, args.warmup,
                              args.seed + 100)
        kill = None
        if args.kill_rate > 0:
            kill = kill_test(model, data, home_copy("kill"), pki, scratch, args.kill_rate, args.kill_after,
                             args.seed + 200)
            print(json.dumps(kill), file=sys.stderr)
    print(markdown(rows, kill, prefill_s, args.prefill))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "kill": kill, "prefill_seconds": prefill_s,
                                         "cpu_count": os.cpu_count()}, indent=2))
    if kill is not None and kill["users_with_an_unrecorded_answer"]:
        raise SystemExit("an answer the client received is missing from the ledger")


if __name__ == "__main__":
    main()
