"""CPU seconds a SuperLink and two idle SuperNodes (no run) burn in 30 s: TLS + SuperNode authentication vs
plaintext. Isolates what TLS adds to Flower's constant polling from the training's own compute.

Run: .venv/bin/python scripts/bench_idle_cpu.py tls insecure tls insecure
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fedscore.flower.launch import Federation, local_superlink_tls
from fedscore.shared.tls import node_auth_key


def cpu_seconds(groups: set[int]) -> float:
    """user + system CPU seconds (with reaped children's) of every process in these process groups."""
    total = 0.0
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) in groups:
                times = proc.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
        except (psutil.Error, ProcessLookupError):
            continue
    return total


def measure(mode: str, settle_s: float = 20.0, window_s: float = 30.0) -> float:
    root = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    with Federation(root / "flower") as fed:
        tls = local_superlink_tls(root / "pki") if mode == "tls" else None
        fed.start_superlink(tls)
        fed.wait_healthy(tls)
        fed.write_connection(fed.address, tls.ca if tls else None)
        keys = {party: node_auth_key(root / party) for party in ("payment", "lender")}
        if tls:
            fed.register_nodes({party: pair[1] for party, pair in keys.items()})
        for party, (private, _) in keys.items():
            fed.start_supernode(party, {"party": party}, root_cert=tls.ca if tls else None,
                                auth_key=private if tls else None)
        time.sleep(settle_s)
        groups = {proc.pid for _, proc in fed.processes}
        before = cpu_seconds(groups)
        time.sleep(window_s)
        return cpu_seconds(groups) - before


if __name__ == "__main__":
    for mode in sys.argv[1:] or ["tls", "insecure"]:
        print(f"{mode}: {measure(mode):.1f} CPU s in 30 s idle", flush=True)
