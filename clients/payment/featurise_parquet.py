"""The payment holder's features from a transaction log too large for one DataFrame: DuckDB over Parquet.

Why: a pilot's log is 100M+ transactions (1M payment users hold ~137M in the synthetic data, ~15 GB as pandas
columns). DuckDB scans the Parquet file, or a directory of parts, in a streaming GROUP BY, so the party holds one
row of sums per user (`features.UserSums`), never the log; `features.features_from_sums` then computes the very
features `features_from_transactions` computes in memory (tests/test_synth_features.py checks the two agree).
DuckDB rather than polars' lazy engine: at 1M payment users it was faster and its memory is capped by a setting
(BENCHMARKS.md "Scale", scripts/bench_featurise.py).

Only a log whose columns already have the expected types takes this path (timestamp a naive timestamp, amount a
number, the others strings or dictionary strings); anything else (CSV, ISO strings or epoch numbers as timestamps, a
time zone) is read whole and featurised in memory as before, with its detailed checks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from fedscore.clients.payment.features import (
    CATEGORIES,
    EARLIEST_TIMESTAMP,
    LARGE_AMOUNT,
    LATEST_TIMESTAMP,
    MONTH_DAYS,
    N_MONTHS,
    NIGHT_END_HOUR,
    NIGHT_START_HOUR,
    RECENT_DAYS,
    TRANSACTION_COLUMNS,
    WINDOW_DAYS,
    UserSums,
    features_from_sums,
)
from fedscore.shared.data.tables import DataError

# DuckDB's cap for the GROUP BY. The median and the distinct counts hold each user's values until the group is done
# and do not spill: at 1M payment users (137M transactions) one pass ran out of memory under a 1 GB cap. So the users
# are cut into buckets of at most ROWS_PER_PASS transactions' worth, one GROUP BY per bucket, which holds only its
# bucket's values: groups of parts when no user spans two parts (each part read once), else hash buckets of users
# (each pass scans the whole log again).
MEMORY_LIMIT = os.environ.get("FEDSCORE_DUCKDB_MEMORY", "1500MB")
ROWS_PER_PASS = 10_000_000  # DuckDB needed > 1.3 GiB for one group of ~26M rows at 1M users


def parquet_files(path: Path) -> list[Path]:
    """The Parquet file, or the parts of a directory (sorted), that hold the log."""
    if path.is_dir():
        parts = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not parts:
            raise DataError(f"{path}: a directory without .parquet parts")
        return parts
    return [path]


def fits_out_of_core(path: Path) -> bool:
    """Whether the log's Parquet schema has the types the out-of-core path reads as they are."""
    try:
        schema = ds.dataset([str(p) for p in parquet_files(path)], format="parquet").schema
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{path}: cannot read table: {exc}") from exc
    names = set(schema.names)
    if not set(TRANSACTION_COLUMNS) <= names:
        return False  # the in-memory reader names the missing columns

    def text(t: pa.DataType) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t) or (
            pa.types.is_dictionary(t) and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)))

    stamp = schema.field("timestamp").type
    return (pa.types.is_timestamp(stamp) and stamp.tz is None
            and (pa.types.is_floating(schema.field("amount").type) or pa.types.is_integer(schema.field("amount").type))
            and all(text(schema.field(c).type) or (c == "id" and pa.types.is_integer(schema.field(c).type))
                    for c in ("id", "category", "city", "device", "channel")))


def _connect(threads: int | None):
    import duckdb

    con = duckdb.connect(config={"memory_limit": MEMORY_LIMIT, "threads": threads or os.cpu_count() or 1,
                                 "preserve_insertion_order": False})
    return con


def _sql_list(values: tuple[str, ...]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def _check(con, scan: str, source: str) -> tuple[int, int]:
    """The checks the in-memory path makes, as counts over the whole log (messages name the column, a count and an
    example value; a row number means little across parts). Returns (rows, the reference time: max timestamp ns)."""
    lo, hi = int(EARLIEST_TIMESTAMP.value), int(LATEST_TIMESTAMP.value)
    row = con.execute(f"""
        SELECT count(*),
               count(*) FILTER (id IS NULL), count(*) FILTER (timestamp IS NULL),
               count(*) FILTER (amount IS NULL OR isnan(amount::DOUBLE) OR isinf(amount::DOUBLE)),
               count(*) FILTER (amount < 0), min(amount),
               count(*) FILTER (epoch_ns(timestamp) < {lo} OR epoch_ns(timestamp) >= {hi}),
               min(timestamp)::VARCHAR, max(timestamp)::VARCHAR,
               count(*) FILTER (category IS NULL), count(*) FILTER (city IS NULL),
               count(*) FILTER (device IS NULL), count(*) FILTER (channel IS NULL),
               max(epoch_ns(timestamp))
        FROM {scan}""").fetchall()[0]
    (n, no_id, no_ts, bad_amount, negative, lowest, outside, first, last, no_cat, no_city, no_device, no_channel,
     ref) = row
    if n == 0:
        raise DataError(f"{source}: no transactions")
    for column, count in (("id", no_id), ("timestamp", no_ts), ("category", no_cat), ("city", no_city),
                          ("device", no_device), ("channel", no_channel)):
        if count:
            raise DataError(f"{source}: column {column}: {count} missing value(s)")
    if bad_amount:
        raise DataError(f"{source}: column amount: {bad_amount} missing or infinite value(s)")
    if negative:
        raise DataError(f"{source}: column amount: {negative} negative value(s), e.g. {lowest!r} "
                        "(net refunds out first)")
    if outside:
        raise DataError(f"{source}: column timestamp: {outside} value(s) outside the accepted range "
                        f"[{EARLIEST_TIMESTAMP.date()}, {LATEST_TIMESTAMP.date()}) (earliest {first}, latest "
                        f"{last}; a unit or year typo?)")
    unknown = [r[0] for r in con.execute(
        f"SELECT DISTINCT category::VARCHAR FROM {scan} WHERE category::VARCHAR NOT IN ({_sql_list(CATEGORIES)}) "
        "LIMIT 5").fetchall()]
    if unknown:
        raise DataError(f"{source}: column category: unknown value(s) {unknown} (expected one of {list(CATEGORIES)})")
    return int(n), int(ref)


def _disjoint_file_groups(con, files: list[str], rows_per_pass: int) -> list[list[str]] | None:
    """When no user's transactions span two parts (as `fedscore data synth` writes them: one part per chunk of
    users), consecutive parts grouped up to ~`rows_per_pass` rows: each group is a bucket of its own, read once,
    instead of every hash bucket scanning every part. None when some user spans parts (or there is one file)."""
    if len(files) < 2:
        return None
    import pyarrow.parquet as pq

    con.register("tagged", con.read_parquet(files, filename=True))
    ((spanning,),) = con.execute("SELECT count(*) FROM (SELECT id FROM tagged GROUP BY id "
                                 "HAVING min(filename) <> max(filename))").fetchall()
    if spanning:
        return None
    groups: list[list[str]] = [[]]
    rows = 0
    for name in files:
        n = pq.ParquetFile(name).metadata.num_rows
        if groups[-1] and rows + n > rows_per_pass:
            groups.append([])
            rows = 0
        groups[-1].append(name)
        rows += n
    return groups


def user_sums_duckdb(path: Path, source: str | None = None, threads: int | None = None,
                     rows_per_pass: int = ROWS_PER_PASS) -> tuple[UserSums, int]:
    """GROUP BY user over the Parquet log at `path` (a file or a directory of parts), in hash buckets of users of at
    most ~`rows_per_pass` transactions each: the per-user sums and the reference time. Raises DataError naming
    `source` and the column for the checks `_check` makes."""
    source = source or str(path)
    files = [str(p) for p in parquet_files(path)]
    con = _connect(threads)
    try:
        con.register("tx", con.read_parquet(files))
        rows, ref = _check(con, "tx", source)
        buckets = max(1, math.ceil(rows / rows_per_pass))
        age = f"(({ref} - epoch_ns(timestamp))::DOUBLE / 86400e9)"
        inside = f"{age} < {WINDOW_DAYS!r}"
        month = f"least(floor({age} / {MONTH_DAYS!r})::BIGINT, {N_MONTHS - 1})"
        hour = "((epoch_ns(timestamp) // 3600000000000) % 24)"
        monthly = ", ".join(f"coalesce(sum(amount) FILTER (month = {m}), 0)" for m in range(N_MONTHS))
        by_cat = ", ".join(f"coalesce(sum(amount) FILTER (category = '{c}'), 0)" for c in CATEGORIES)
        query = f"""
            WITH t AS (
                SELECT id::VARCHAR AS id, epoch_ns(timestamp) AS ts, amount::DOUBLE AS amount,
                       category::VARCHAR AS category, city::VARCHAR AS city, device::VARCHAR AS device,
                       channel::VARCHAR = 'online' AS online, {inside} AS inside, {month} AS month,
                       {age} < {RECENT_DAYS!r} AS recent,
                       ({hour} >= {NIGHT_START_HOUR} OR {hour} < {NIGHT_END_HOUR}) AS night
                FROM {{source}} WHERE {{bucket}})
            SELECT id, max(ts) AS last_ns,
                   count(*) FILTER (inside) AS count,
                   coalesce(sum(amount) FILTER (inside), 0) AS total,
                   {monthly.replace("FILTER (", "FILTER (inside AND ")},
                   coalesce(sum(ln(1 + amount)) FILTER (inside), 0) AS log_sum,
                   coalesce(sum(ln(1 + amount) * ln(1 + amount)) FILTER (inside), 0) AS log_sq_sum,
                   {by_cat.replace("FILTER (", "FILTER (inside AND ")},
                   coalesce(median(amount) FILTER (inside), 0) AS median,
                   count(*) FILTER (inside AND night) AS night,
                   count(*) FILTER (inside AND amount > {LARGE_AMOUNT!r}) AS large,
                   count(DISTINCT device) FILTER (inside) AS n_devices,
                   count(DISTINCT city) FILTER (inside) AS n_cities,
                   count(*) FILTER (inside AND online) AS online,
                   coalesce(sum(amount) FILTER (inside AND recent), 0) AS recent_spend
            FROM t GROUP BY id"""
        groups = _disjoint_file_groups(con, files, rows_per_pass) if buckets > 1 else None
        if groups is not None:  # each user's rows lie in one part: aggregate groups of parts, each read once
            parts = []
            for group in groups:
                con.register("part", con.read_parquet(group))
                parts.append(con.sql(query.format(source="part", bucket="true")).to_arrow_table())
        else:
            parts = [con.sql(query.format(source="tx", bucket=f"hash(id::VARCHAR) % {buckets} = {k}"
                                          if buckets > 1 else "true")).to_arrow_table() for k in range(buckets)]
        table = pa.concat_tables(parts)
        del parts
    finally:
        con.close()
    columns = [np.asarray(c.to_numpy(zero_copy_only=False)) for c in table.columns]
    floats = [c.astype(np.float64) for c in columns[2:]]
    k = N_MONTHS
    c = len(CATEGORIES)
    sums = UserSums(
        ids=columns[0].astype(object), last_ns=columns[1].astype(np.int64), count=floats[0], total=floats[1],
        monthly=np.stack(floats[2:2 + k], axis=1), log_sum=floats[2 + k], log_sq_sum=floats[3 + k],
        by_category=np.stack(floats[4 + k:4 + k + c], axis=1), median=floats[4 + k + c], night=floats[5 + k + c],
        large=floats[6 + k + c], n_devices=floats[7 + k + c], n_cities=floats[8 + k + c], online=floats[9 + k + c],
        recent_spend=floats[10 + k + c])
    return sums, ref


def features_from_parquet(path: Path, source: str | None = None, threads: int | None = None,
                          rows_per_pass: int = ROWS_PER_PASS) -> pd.DataFrame:
    """The same table as `features_from_transactions(pd.read_parquet(path))`, without reading the log whole.
    `path` must pass `fits_out_of_core`."""
    sums, ref = user_sums_duckdb(path, source, threads, rows_per_pass)
    return features_from_sums(sums, ref)
