"""Out-of-core featurisation of a Parquet transaction log: DuckDB (what the payment holder uses) against polars' lazy
streaming engine, and the in-memory pandas path where it fits. Each engine runs in its own process, so its time and
peak RSS (the kernel's VmHWM) are its own.

    nice -n 10 .venv/bin/python scripts/bench_featurise.py DIR/payment/transactions.parquet --engines duckdb polars
    .venv/bin/python scripts/bench_featurise.py PATH --engines duckdb polars pandas --check   # small logs

`--check` also compares each engine's features with the in-memory featurisation (max absolute difference).
polars is not a fedscore dependency: `pip install polars` to measure it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _hwm() -> int:
    """This process's peak resident set size in bytes (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def polars_features(path: Path, threads: int | None = None) -> pd.DataFrame:
    """The same per-user sums as clients/payment/featurise_parquet.py, as one polars lazy GROUP BY (streaming)."""
    import polars as pl

    from fedscore.clients.payment.features import (
        CATEGORIES,
        LARGE_AMOUNT,
        MONTH_DAYS,
        N_MONTHS,
        NIGHT_END_HOUR,
        NIGHT_START_HOUR,
        RECENT_DAYS,
        WINDOW_DAYS,
        UserSums,
        features_from_sums,
    )
    from fedscore.clients.payment.featurise_parquet import parquet_files

    lf = pl.scan_parquet([str(p) for p in parquet_files(path)])
    ts = pl.col("timestamp").dt.epoch("ns")
    ref = int(lf.select(ts.max()).collect(engine="streaming").item())
    age = (pl.lit(ref) - ts).cast(pl.Float64) / 86400e9
    inside = age < WINDOW_DAYS
    month = (age / MONTH_DAYS).floor().cast(pl.Int64).clip(upper_bound=N_MONTHS - 1)
    hour = (ts // 3_600_000_000_000) % 24
    amount = pl.col("amount").cast(pl.Float64)
    category = pl.col("category").cast(pl.String)
    night = (hour >= NIGHT_START_HOUR) | (hour < NIGHT_END_HOUR)
    log_amount = amount.log1p()
    aggregates = [
        ts.max().alias("last_ns"), inside.sum().alias("count"), amount.filter(inside).sum().alias("total"),
        *[amount.filter(inside & (month == m)).sum().alias(f"m{m}") for m in range(N_MONTHS)],
        log_amount.filter(inside).sum().alias("log_sum"), (log_amount**2).filter(inside).sum().alias("log_sq"),
        *[amount.filter(inside & (category == c)).sum().alias(f"c_{c}") for c in CATEGORIES],
        amount.filter(inside).median().fill_null(0.0).alias("median"),
        (inside & night).sum().alias("night"), (inside & (amount > LARGE_AMOUNT)).sum().alias("large"),
        pl.col("device").cast(pl.String).filter(inside).n_unique().alias("n_devices"),
        pl.col("city").cast(pl.String).filter(inside).n_unique().alias("n_cities"),
        (inside & (pl.col("channel").cast(pl.String) == "online")).sum().alias("online"),
        amount.filter(inside & (age < RECENT_DAYS)).sum().alias("recent"),
    ]
    frame = lf.group_by(pl.col("id").cast(pl.String)).agg(aggregates).collect(engine="streaming")
    col = {name: frame[name].to_numpy() for name in frame.columns}
    f = {k: np.asarray(v, dtype=np.float64) for k, v in col.items() if k not in ("id", "last_ns")}
    sums = UserSums(
        ids=np.asarray(col["id"], dtype=object), last_ns=col["last_ns"].astype(np.int64), count=f["count"],
        total=f["total"], monthly=np.stack([f[f"m{m}"] for m in range(N_MONTHS)], axis=1), log_sum=f["log_sum"],
        log_sq_sum=f["log_sq"], by_category=np.stack([f[f"c_{c}"] for c in CATEGORIES], axis=1),
        median=f["median"], night=f["night"], large=f["large"], n_devices=f["n_devices"], n_cities=f["n_cities"],
        online=f["online"], recent_spend=f["recent"])
    return features_from_sums(sums, ref)


def run_engine(engine: str, path: Path, check: bool) -> dict:
    from fedscore.clients.payment.features import features_from_transactions
    from fedscore.clients.payment.featurise_parquet import features_from_parquet

    started, cpu = time.perf_counter(), time.process_time()
    if engine == "duckdb":
        features = features_from_parquet(path)
    elif engine == "polars":
        features = polars_features(path)
    else:
        features = features_from_transactions(pd.read_parquet(path))
    out = {"engine": engine, "seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
           "users": len(features), "peak_rss": _hwm()}
    if check:
        expected = features_from_transactions(pd.read_parquet(path))
        assert (expected["id"].to_numpy() == features["id"].to_numpy()).all()
        out["max_abs_diff"] = float(np.abs(expected.drop(columns="id").to_numpy()
                                           - features.drop(columns="id").to_numpy()).max())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a transactions Parquet file or directory of parts")
    parser.add_argument("--engines", nargs="+", default=["duckdb", "polars"], choices=["duckdb", "polars", "pandas"])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_engine(args.one, args.path, args.check)))
        return
    print(f"# {args.path}: load average at start {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print("| engine | wall s | CPU s | users | peak RSS GiB | max abs diff vs in-memory |")
    print("|---|---:|---:|---:|---:|---:|")
    for engine in args.engines:
        done = subprocess.run([sys.executable, __file__, str(args.path), "--one", engine,
                               *(["--check"] if args.check else [])], capture_output=True, text=True)
        if done.returncode:
            print(f"| {engine} | failed: {done.stderr.strip().splitlines()[-1]} | | | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        print(f"| {engine} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['users']:,} | {r['peak_rss'] / 2**30:.2f} | "
              f"{diff} |", flush=True)


if __name__ == "__main__":
    main()
