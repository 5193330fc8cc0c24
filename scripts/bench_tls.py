"""What TLS + SuperNode authentication and end-to-end encryption cost on a real local federation.

Run (root, for `ip netns`): .venv/bin/python scripts/bench_tls.py --data DIR --secret-file F [--set k=v ...]
[--json out.json]

Two `fedscore federate` runs on the same data, config and secret, fresh party homes each: the default (TLS with a
throwaway CA, SuperNode authentication) and `--insecure` (plaintext, no node authentication), one after the other
(`--insecure-first` swaps the order),
each under `nice -n 10` inside a network namespace of its own, so the namespace's loopback counters count exactly the
bytes that run's processes sent over the network (SuperLink <-> SuperNodes, ServerApp <-> SuperLink, SuperNode <->
its ClientApp processes, the flwr CLI; the Unix socket to each party worker is not network traffic).

End-to-end encryption has no off switch (it is the protocol), so its cost is measured by a microbenchmark of
shared/protocol/e2e.py on this run's real payload sizes: sealing and opening every payload the parties exchanged, and
the bytes the frames add.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedscore.shared.protocol import e2e
from fedscore.shared.protocol.steps import PayloadKind

BIN = Path(sys.executable).parent


def _lo_bytes(ns: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "lo"], capture_output=True, text=True,
                         check=True).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def federate(name: str, data: Path, secret: Path, work: Path, overrides: list[str], insecure: bool) -> dict:
    ns = f"fsbench{os.getpid() % 10000}{name[:3]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        env = {**os.environ, "FEDSCORE_HOME": str(work / f"home-{name}")}
        before = _lo_bytes(ns)
        t0 = time.perf_counter()
        done = subprocess.run(["ip", "netns", "exec", ns, "nice", "-n", "10", str(BIN / "fedscore"), "federate",
                               "--data", str(data), "--out", str(work / name), "--secret-file", str(secret),
                               *(["--insecure"] if insecure else []),
                               *[item for o in overrides for item in ("--set", o)]],
                              capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
        wire = _lo_bytes(ns) - before
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    metrics = json.loads((work / name / "metrics.json").read_text())
    timing = metrics["timing"]
    return {"run": name, "wall_s": wall, "federation_s": timing["federation_s"], "startup_s": timing["startup_s"],
            "protocol_s": timing["protocol_s"], "teardown_s": timing.get("teardown_s", 0.0),
            "loopback_bytes": wire, "payload_bytes": metrics["traffic"]["payload_bytes"],
            "messages": metrics["traffic"]["messages"], "auc": metrics["test"]["auc"]}


def e2e_cost(run_dir: Path, repeats: int = 5) -> dict:
    """Seal and open a random payload of every sealed size the run moved (each reply's payload, the size the
    coordinator relayed), with this run's run id; median over repeats."""
    outcome = json.loads((run_dir / "outcome.json").read_text())
    run_id = outcome.get("run_id", "bench-run")
    sealed_sizes = [t["reply_bytes"] for t in outcome["traffic"] if t["reply_bytes"]]
    frame = len(e2e.MAGIC) + 2 + len(run_id.encode()) + 8 + e2e.NONCE_BYTES + 16
    plain_sizes = [size - frame for size in sealed_sizes]
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    payloads = [os.urandom(size) for size in plain_sizes]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sender = e2e.Channel(a, b.public_key().public_bytes_raw(), "payment", "lender", run_id)
        receiver = e2e.Channel(b, a.public_key().public_bytes_raw(), "lender", "payment", run_id)
        for seq, payload in enumerate(payloads):
            delivery = e2e.Delivery(run_id, "payment", "lender", "train", 0, PayloadKind.EMBEDDINGS, seq)
            assert receiver.open(sender.seal(payload, delivery), delivery) == payload
        times.append(time.perf_counter() - t0)
    return {"payloads": len(payloads), "plaintext_bytes": sum(plain_sizes), "frame_bytes_added": frame * len(payloads),
            "seal_and_open_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--insecure-first", action="store_true", help="run the plaintext federation first")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    order = [("tls", False), ("insecure", True)][::-1 if args.insecure_first else 1]
    rows = [federate(name, args.data, args.secret_file, work, args.overrides, insecure=insecure)
            for name, insecure in order]
    for row in rows:
        print(json.dumps(row), flush=True)
    crypto = e2e_cost(work / "tls")
    print(json.dumps(crypto), flush=True)
    print("\n| run | wall s | start-up s | protocol s | teardown s | loopback bytes | payload bytes | test AUC |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | {r['protocol_s']:.1f} | "
              f"{r['teardown_s']:.1f} | {r['loopback_bytes']:,} | {r['payload_bytes']:,} | {r['auc']:.4f} |")
    print(f"\ne2e: {crypto['payloads']} payloads, {crypto['plaintext_bytes']:,} plaintext bytes, sealed and opened "
          f"in {crypto['seal_and_open_s'] * 1000:.1f} ms; frames add {crypto['frame_bytes_added']:,} bytes")
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "e2e": crypto}, indent=2))


if __name__ == "__main__":
    main()
