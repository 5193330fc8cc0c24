"""Chunked exchanges at UCI size (issue 20 item 2): peak message and chunk size, per-round wall time, with the
default chunk cap against no chunking, in process and under Flower, side by side in one run.

    FEDSCORE_HOME=$(mktemp -d) nice -n 10 .venv/bin/python scripts/bench_chunks.py --work /tmp/chunk-bench \\
        --csv /work/shared/data/uci-credit-default/UCI_Credit_Card.csv --json chunks.json

Each variant is the privacy defaults (plus `--set` overrides) with `exchange.chunk_bytes` = the default, 0 (no
chunking) and any `--caps` given; every run has fresh party homes. Reported per run: the largest payload one
message carried (`reply_bytes`), the largest chunk (one Flower Array), the chunks of the largest exchange, the
rounds' wall time per round (the coordinator's `rounds_s` / R) and the whole protocol's, and the 1-minute load
average before and after (the machine is shared: compare ratios within one run, not across runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _uci(csv: Path, work: Path) -> Path:
    data = work / "uci-data"
    if not (data / "lender").exists():
        subprocess.run([str(Path(sys.executable).parent / "fedscore"), "data", "uci", "--csv", str(csv), "--split",
                        "scenario", "--out", str(data)], check=True)
    return data


def _one(transport: str, overrides: list[str], data: Path, run_dir: Path) -> dict[str, Any]:
    from fedscore.shared.config import load_config

    config = load_config(None, overrides)
    homes = {party: run_dir.parent / f"{run_dir.name}-homes" / party for party in ("payment", "lender")}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    if transport == "inprocess":
        from fedscore.runs import run_inprocess

        run_inprocess(config, data, run_dir, homes=homes)
    else:
        from fedscore.federation import run_federated

        run_federated(config, data, run_dir, timeout_s=3600, homes=homes)
    wall = time.perf_counter() - started
    outcome = json.loads((run_dir / "outcome.json").read_text())
    if outcome.get("error"):
        raise RuntimeError(f"{run_dir}: {outcome['error']}")
    traffic = outcome["traffic"]
    per_user = [t for t in traffic if t["kind"] in ("embed", "train")]
    timing = outcome["timing"]
    rounds = config.training.rounds
    return {
        "transport": transport, "chunk_bytes": config.exchange.chunk_bytes, "overrides": overrides,
        "peak_message_bytes": max(max(t["sent_bytes"], t["reply_bytes"]) for t in traffic),
        "peak_chunk_bytes": max(t.get("reply_max_chunk_bytes", t["reply_bytes"]) for t in traffic),
        "peak_per_user_message_bytes": max(t["reply_bytes"] for t in per_user),
        "peak_per_user_chunk_bytes": max(t.get("reply_max_chunk_bytes", t["reply_bytes"]) for t in per_user),
        "embed_train_exchange_s": sum(t["seconds"] for t in per_user) / len(per_user),
        "max_chunks": max(t.get("reply_chunks", 0) for t in per_user),
        "chunks_per_run": sum(t.get("reply_chunks", 0) for t in per_user),
        "messages": len(traffic),
        "per_round_s": timing["rounds_s"] / rounds, "protocol_s": timing["protocol_s"], "wall_s": wall,
        "load_before": load_before, "load_after": os.getloadavg()[0],
        "test_auc": outcome["rounds"][-1].get("test_auc"),
    }


def main(argv: list[str] | None = None) -> None:
    from fedscore.shared.config import DEFAULT_CHUNK_BYTES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--transports", nargs="+", default=["inprocess", "flower"])
    parser.add_argument("--caps", nargs="*", type=int, default=[], help="more caps to try besides default and 0")
    parser.add_argument("--only-caps", action="store_true", help="only the --caps given (not the default and 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data = _uci(args.csv, args.work)
    overrides = ["baselines.enabled=false", *args.overrides]
    caps = args.caps if args.only_caps else [DEFAULT_CHUNK_BYTES, 0, *args.caps]
    results = []
    for transport in args.transports:
        for cap in caps:  # side by side: the same transport's variants back to back
            tag = f"{transport}-{cap}-{time.strftime('%H%M%S')}"
            result = _one(transport, [*overrides, f"exchange.chunk_bytes={cap}"], data, args.work / tag)
            results.append(result)
            print(json.dumps(result), flush=True)
    print(f"\n{'transport':<10} {'cap':>9} {'peak msg':>10} {'emb/grad msg':>12} {'emb/grad chunk':>14} "
          f"{'chunks':>6} {'msgs':>4} {'s/round':>8} {'protocol s':>10} {'load':>9}")
    for r in results:
        print(f"{r['transport']:<10} {r['chunk_bytes']:>9} {r['peak_message_bytes']:>10} "
              f"{r['peak_per_user_message_bytes']:>12} {r['peak_per_user_chunk_bytes']:>14} {r['max_chunks']:>6} "
              f"{r['messages']:>4} {r['per_round_s']:>8.2f} {r['protocol_s']:>10.1f} "
              f"{r['load_before']:>4.1f}-{r['load_after']:<4.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
