"""Time and peak RSS of every phase, per party, from 30k to 1M payment users (issue 20).

    FEDSCORE_HOME=$(mktemp -d) nice -n 10 .venv/bin/python scripts/bench_scale.py \\
        --sizes 30000 100000 300000 1000000 --work /tmp/scale-bench --plot docs/scale.png --json BENCH.json

A size N means round(1.43 N) synthetic people: ~1.07 N payment users and ~0.50 N applicants (1M -> 1.07M x 500k).
Data are generated once per size into WORK/data-N (excluded from every time) and reused.

How: the `fedscore train` path (same coordinator, same party classes, privacy defaults), but each party runs in
its own worker process (clients/worker.py, Unix socket), as under `fedscore federate`, so each party's memory is its
own. Inside a worker, the party's functions are wrapped to attribute wall time and resident memory (sampled every
20 ms, plus the kernel's VmHWM for the whole process) to phases: featurise (payment's data loader), setup (the rest
of the setup message), psi (the three PSI steps and the token alignment), baselines (the lender's own lender-only
reference), accounting (DP-SGD noise calibration, the ledger's checks and charges), rounds (embeddings, DP-SGD,
gradients), export (ONNX parts), state save (the per-step checkpoint).
Times are exclusive (a nested phase's time is not counted in its parent). The coordinator's process adds the
operator's baselines (centralized and tuned references, which read both parties' data: local simulation only).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PHASES = ("featurise", "setup", "psi", "accounting", "baselines", "rounds", "export", "state save")
SAMPLE_S = 0.02
PEOPLE_PER_SIZE = 1.43


# -- inside a party worker --------------------------------------------------------------------------------------
def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _hwm() -> int:
    """This process's peak resident set size in bytes (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhaseClock:
    """Exclusive wall time and peak RSS per phase label; the innermost open phase gets the time and the samples."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stack: list[list[Any]] = []  # [label, started, cpu started]
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds of the whole process (all threads): less load-sensitive
        self.peak: dict[str, int] = {}
        threading.Thread(target=self._sample, daemon=True).start()

    def _note(self, label: str) -> None:
        rss = _rss()
        if rss > self.peak.get(label, 0):
            self.peak[label] = rss

    def _sample(self) -> None:
        while True:
            time.sleep(SAMPLE_S)
            with self.lock:
                if self.stack:
                    self._note(self.stack[-1][0])

    def enter(self, label: str) -> None:
        with self.lock:
            now, cpu = time.perf_counter(), time.process_time()
            if self.stack:
                top = self.stack[-1]
                self.seconds[top[0]] = self.seconds.get(top[0], 0.0) + now - top[1]
                self.cpu[top[0]] = self.cpu.get(top[0], 0.0) + cpu - top[2]
                self._note(top[0])
            self.stack.append([label, now, cpu])
            self._note(label)

    def leave(self) -> None:
        with self.lock:
            now, cpu = time.perf_counter(), time.process_time()
            label, started, cpu_started = self.stack.pop()
            self.seconds[label] = self.seconds.get(label, 0.0) + now - started
            self.cpu[label] = self.cpu.get(label, 0.0) + cpu - cpu_started
            self._note(label)
            if self.stack:
                self.stack[-1][1], self.stack[-1][2] = now, cpu

    def wrap(self, label: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.enter(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()

        return timed


def _message_phase(header_json: str) -> str:
    kind = str(json.loads(header_json).get("kind", ""))
    return "setup" if kind == "setup" else "psi" if kind.startswith("align") else "rounds"


def worker_main(socket_path: Path, out: Path) -> None:
    """A party worker (clients/worker.py) with its functions wrapped by a PhaseClock; writes `out` after every
    message (phases, VmHWM)."""
    from fedscore.clients import worker
    from fedscore.clients.base import PartyBase, PartySettings
    from fedscore.clients.lender.party import LenderParty
    from fedscore.clients.payment import party as payment_party
    from fedscore.shared.alignment import psi, tokens

    clock = PhaseClock()
    payment_party.load_payment_table = clock.wrap("featurise", payment_party.load_payment_table)
    for module, names in ((psi, ("lender_request", "payment_respond", "lender_intersection")),
                          (tokens, ("lender_alignment", "rows_for_tokens"))):
        for name in names:
            setattr(module, name, clock.wrap("psi", getattr(module, name)))
    LenderParty._lender_only_baseline = clock.wrap("baselines", LenderParty._lender_only_baseline)
    LenderParty._export = clock.wrap("export", LenderParty._export)
    payment_party.PaymentParty._export = clock.wrap("export", payment_party.PaymentParty._export)
    PartyBase.save_state = clock.wrap("state save", PartyBase.save_state)
    # privacy planning and accounting (noise calibration, ledger checks and charges, randomized response)
    from fedscore.shared.privacy import dp_sgd
    from fedscore.shared.privacy.ledger import Ledger

    dp_sgd.plan_dp_sgd = clock.wrap("accounting", dp_sgd.plan_dp_sgd)
    Ledger.charge = clock.wrap("accounting", Ledger.charge)
    Ledger.check = clock.wrap("accounting", Ledger.check)
    payment_party.PaymentParty._plan_privacy = clock.wrap("accounting", payment_party.PaymentParty._plan_privacy)

    handle = worker.PartyWorker.handle_bytes

    def handle_bytes(self: worker.PartyWorker, header_json: str, payload: bytes) -> tuple[str, bytes]:
        clock.enter(_message_phase(header_json))
        try:
            return handle(self, header_json, payload)
        finally:
            clock.leave()
            out.write_text(json.dumps({"seconds": clock.seconds, "cpu": clock.cpu, "peak_rss": clock.peak,
                                        "vm_hwm": _hwm(), "cpu_total": time.process_time()}))

    worker.PartyWorker.handle_bytes = handle_bytes  # type: ignore[method-assign]
    config = json.loads(sys.stdin.read())
    worker.PartyWorker(PartySettings.model_validate(config["settings"]), socket_path, str(config["token"])
                       ).serve_forever()


# -- the coordinator's side ---------------------------------------------------------------------------------------
class WorkerTransport:
    """Envelopes to each party's worker process; the messages of one exchange go in parallel (as under Flower)."""

    name = "inprocess-workers"

    def __init__(self, sockets: dict[str, Path], token: str) -> None:
        self.sockets, self.token = sockets, token

    def exchange(self, messages: list) -> list:
        from fedscore.clients.worker import forward
        from fedscore.shared.protocol.messages import Envelope, Header

        def one(message: Any) -> Any:
            header, payload = forward(str(self.sockets[message.header.recipient]), self.token,
                                      message.header.model_dump_json(), message.payload, timeout_s=7200.0,
                                      start_wait_s=600.0)
            return Envelope(header=Header.model_validate_json(header), payload=payload)

        with ThreadPoolExecutor(max_workers=len(messages)) as pool:
            return list(pool.map(one, messages))


class Sampler:
    """Peak RSS of this (the coordinator's) process, sampled."""

    def __init__(self) -> None:
        self.peak = 0
        self.stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, _rss())
            time.sleep(SAMPLE_S)


def data_for(size: int, work: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    from fedscore.synth import synthesize

    data = work / f"data-{size}"
    summary_file = work / f"data-{size}.json"
    if not summary_file.exists():
        if data.exists():
            import shutil

            shutil.rmtree(data)
        summary = synthesize(round(PEOPLE_PER_SIZE * size), seed, data)
        summary_file.write_text(summary.model_dump_json())
    return data, json.loads(summary_file.read_text())


def run_size(size: int, work: Path, overrides: list[str], seed: int) -> dict[str, Any]:
    from fedscore.budgets import default_budgets
    from fedscore.local_parties import party_settings
    from fedscore.runs import run_coordinator
    from fedscore.server.coordinator import Coordinator, new_run_id
    from fedscore.shared.config import load_config
    from fedscore.shared.run_folder import Launch, RunFolder

    data, summary = data_for(size, work, seed)
    run_dir = work / f"run-{size}-{int(time.time())}"
    config = load_config(None, overrides)
    folder = RunFolder(run_dir)
    secret = folder.create(config)
    budgets = default_budgets(config)
    homes = {p: work / f"homes-{run_dir.name}" / p for p in ("payment", "lender")}
    folder.write_launch(Launch.of(data, "inprocess", budgets, homes))
    settings = party_settings(run_dir, data, secret, budgets, homes)
    token = secrets.token_hex(16)
    sockets = {p: Path(f"/tmp/fedscore-bench-{os.getpid()}-{p}.sock") for p in settings}
    phases_files = {p: run_dir / f"bench-phases-{p}.json" for p in settings}
    workers = {}
    for party, s in settings.items():
        proc = subprocess.Popen([sys.executable, __file__, "--worker", "--socket", str(sockets[party]),
                                 "--phases-out", str(phases_files[party])], stdin=subprocess.PIPE,
                                stdout=(run_dir / f"worker-{party}.log").open("w"), stderr=subprocess.STDOUT)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"settings": json.loads(s.model_dump_json()), "token": token}).encode())
        proc.stdin.close()
        workers[party] = proc
    sampler = Sampler()
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        coordinator = Coordinator(config, WorkerTransport(sockets, token), run_id=new_run_id(run_dir.name),
                                  checkpoint_dir=run_dir)
        with folder.lock():
            metrics = run_coordinator(coordinator, run_dir, data, config, secret, homes)
    finally:
        for proc in workers.values():
            proc.terminate()
        for proc in workers.values():
            proc.wait(timeout=60)
        sampler.stop = True
    end_to_end, coordinator_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    parties = {p: json.loads(f.read_text()) if f.exists() else {} for p, f in phases_files.items()}
    timing = metrics["timing"]
    return {"size": size, "data": summary, "run_dir": str(run_dir), "end_to_end_s": end_to_end,
            "coordinator_timing": timing, "coordinator_peak_rss": sampler.peak, "coordinator_cpu_s": coordinator_cpu,
            "parties": parties,
            "test_auc": metrics["test"]["auc"], "intersection": metrics["alignment"]["intersection"],
            "load_average": os.getloadavg()}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| size (payment x applicants, aligned) | phase | payment s (CPU s) | payment peak GiB | "
             "lender s (CPU s) | lender peak GiB |", "|---|---|---:|---:|---:|---:|"]
    for r in results:
        d = r["data"]
        label = f"{d['payment_users']:,} x {d['lender_rows']:,} ({int(r['intersection']):,})"
        for phase in PHASES:
            cells = []
            for party in ("payment", "lender"):
                p = r["parties"].get(party, {})
                s, m, c = (p.get(k, {}).get(phase) for k in ("seconds", "peak_rss", "cpu"))
                cpu = f" ({c:.1f})" if c is not None else ""
                cells += [f"{s:.1f}{cpu}" if s is not None else "-", gib(m) if m else "-"]
            lines.append(f"| {label} | {phase} | " + " | ".join(cells) + " |")
            label = ""
        hwm = [gib(r["parties"].get(p, {}).get("vm_hwm", 0)) for p in ("payment", "lender")]
        t = r["coordinator_timing"]
        ops = t.get("baselines_s", 0.0) + t.get("references_s", 0.0)
        lines.append(f"| | operator's baselines + references (coordinator process, peak "
                     f"{gib(r['coordinator_peak_rss'])} GiB, CPU {r.get('coordinator_cpu_s', 0):.0f} s) | "
                     f"{ops:.1f} | | | |")
        lines.append(f"| | **process peak (VmHWM)** | | **{hwm[0]}** | | **{hwm[1]}** |")
        cpu = sum(r["parties"].get(p, {}).get("cpu_total", 0.0) for p in ("payment", "lender"))
        cpu += r.get("coordinator_cpu_s", 0.0)
        lines.append(f"| | **end to end** (protocol {t.get('protocol_s', 0):.0f} s; CPU of all three processes "
                     f"{cpu:.0f} s; test AUC {r['test_auc']:.4f}; load avg {r['load_average'][0]:.1f}) | "
                     f"**{r['end_to_end_s']:.0f}** | | | |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["data"]["payment_users"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(sizes, [r["end_to_end_s"] / 60 for r in results], "o-k", label="end to end (wall)")
    cpu = [(sum(r["parties"].get(p, {}).get("cpu_total", 0.0) for p in ("payment", "lender"))
            + r.get("coordinator_cpu_s", 0.0)) / 60 for r in results]
    ax1.plot(sizes, cpu, "s:k", label="CPU of all processes (where recorded)")
    for phase in ("featurise", "psi", "rounds", "baselines"):
        ax1.plot(sizes, [sum(r["parties"].get(p, {}).get("seconds", {}).get(phase, 0.0)
                             for p in ("payment", "lender")) / 60 for r in results], "o--", label=f"{phase} (both)")
    ax1.axhline(20, color="red", lw=0.8, ls=":", label="20 min goal")
    ax1.set(xscale="log", yscale="log", xlabel="payment users", ylabel="minutes", title="time")
    ax1.legend(fontsize=7)
    for party, style in (("payment", "o-"), ("lender", "s-")):
        ax2.plot(sizes, [r["parties"].get(party, {}).get("vm_hwm", 0) / 2**30 for r in results], style, label=party)
    ax2.axhline(4, color="red", lw=0.8, ls=":", label="4 GiB goal")
    ax2.set(xscale="log", xlabel="payment users", ylabel="GiB", title="peak RSS per party (VmHWM)")
    ax2.legend(fontsize=7)
    fig.suptitle("fedscore train path, one worker process per party, 2 shared cores (scripts/bench_scale.py)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[30_000, 100_000, 300_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedscore-scale-bench"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="append results here (one JSON object per line)")
    parser.add_argument("--plot", type=Path, default=None, help="plot the results of --json (all lines) here")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the plot and table from --json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--socket", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--phases-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.socket, args.phases_out)
        return
    results: list[dict[str, Any]] = []
    if not args.plot_only:
        args.work.mkdir(parents=True, exist_ok=True)
        print(f"# bench_scale: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}",
              file=sys.stderr)
        for size in args.sizes:
            result = run_size(size, args.work, args.overrides, args.seed)
            print(f"size {size}: end to end {result['end_to_end_s']:.0f} s", file=sys.stderr, flush=True)
            results.append(result)
            if args.json:
                with args.json.open("a") as handle:
                    handle.write(json.dumps(result) + "\n")
    if args.json and args.json.exists():
        results = [json.loads(line) for line in args.json.read_text().splitlines() if line.strip()]
    results.sort(key=lambda r: r["size"])
    print(markdown(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
