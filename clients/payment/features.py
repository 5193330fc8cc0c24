"""The payment holder's raw transactions -> one row of behavioural features per user.

Why this shape: the payment holder never shares transactions, only an embedding computed from these features, so
the features must be (a) reproducible from the data alone, hence every time window is measured back from the
latest timestamp in the table rather than from "now", and (b) documented exactly, hence `FEATURE_DEFINITION`,
which an exported model carries so that scoring computes the same numbers. Everything is vectorised (integer user
codes + `np.bincount`), so 10M transactions featurise in seconds without per-user Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedscore.shared.data.tables import DataError

TRANSACTION_COLUMNS = ["id", "timestamp", "amount", "category", "city", "device", "channel"]
CATEGORIES = ("groceries", "utilities", "transport", "dining", "shopping", "entertainment", "travel", "cash")
CHANNELS = ("in_store", "online", "atm")

MONTH_DAYS = 30.4375  # 365.25 / 12: months are fixed-length buckets counted back from the reference time
N_MONTHS = 12
WINDOW_DAYS = MONTH_DAYS * N_MONTHS
RECENT_DAYS = 30.0
RECENT_MONTHS = 3  # the spend trend compares the latest 3 month buckets with the 9 before them
LARGE_AMOUNT = 500.0  # fixed (not per-user) so the definition is the same for every user and at scoring time
NIGHT_START_HOUR, NIGHT_END_HOUR = 22, 6
# payment records outside these are typos (epoch milliseconds read as seconds, a year 1850): refused, never clipped
EARLIEST_TIMESTAMP, LATEST_TIMESTAMP = pd.Timestamp("1990-01-01"), pd.Timestamp("2100-01-01")

_SHARE_NAMES = [f"share_{c}" for c in CATEGORIES]

_FORMULAS: dict[str, str] = {
    "log_total_spend": "log1p(sum of amount)",
    "mean_ticket": "mean of amount",
    "median_ticket": "median of amount",
    "tx_per_month": "number of transactions / 12",
    "active_months": "number of the 12 month buckets with at least one transaction",
    "monthly_spend_cv": "std / mean of the 12 monthly spend totals (population std, empty months count as 0)",
    **{f"share_{c}": f"sum of amount with category == '{c}' / sum of amount" for c in CATEGORIES},
    "night_share": f"share of transactions whose hour is >= {NIGHT_START_HOUR} or < {NIGHT_END_HOUR}",
    "large_purchase_share": f"share of transactions with amount > {LARGE_AMOUNT:g}",
    "spend_trend_log_ratio": (f"log1p(mean monthly spend of month buckets 0..{RECENT_MONTHS - 1}) - "
                              f"log1p(mean monthly spend of month buckets {RECENT_MONTHS}..{N_MONTHS - 1})"),
    "monthly_spend_slope": ("least-squares slope of the 12 monthly spend totals against time (oldest to newest, "
                            "per month) / mean monthly spend"),
    "amount_log_std": "population std of log1p(amount)",
    "n_devices": "number of distinct device values",
    "n_cities": "number of distinct city values",
    "online_share": "share of transactions with channel == 'online'",
    "recent_30d_spend_ratio": f"sum of amount in the last {RECENT_DAYS:g} days / (sum of amount / 12)",
    "days_since_last": "days from the user's latest transaction (any age) to the reference time",
}

FEATURE_NAMES: list[str] = list(_FORMULAS)
SHARE_FEATURES: list[str] = [*_SHARE_NAMES, "night_share", "large_purchase_share", "online_share"]

FEATURE_DEFINITION: dict = {
    "version": 1,
    "input_columns": TRANSACTION_COLUMNS,
    "reference_time": "the maximum timestamp in the whole transaction table (not the wall clock)",
    "window": (f"only transactions with reference_time - timestamp < {WINDOW_DAYS:g} days enter the features; "
               "days_since_last uses all of a user's transactions"),
    "month_bucket": f"floor((reference_time - timestamp) in days / {MONTH_DAYS}); bucket 0 is the most recent",
    "hour": "hour of the timestamp as recorded (local wall time; a timezone-aware timestamp keeps its own zone)",
    "timestamp_input": "datetime, ISO-8601 string or integer/float epoch seconds",
    "categories": list(CATEGORIES),
    "channels": list(CHANNELS),
    "large_amount": LARGE_AMOUNT,
    "empty_window": "a user with no transaction in the window gets 0 for every feature except days_since_last",
    "ratios": "a ratio whose denominator is 0 is 0",
    "features": _FORMULAS,
}


# Public bounds of each derived feature, from its definition (shares lie in [0, 1], at most 12 active months, a
# mean-normalised slope of 12 monthly totals lies within +-6/13) or from caps chosen for card payments (a ticket
# above 10,000 or more than 300 transactions a month is clipped). They are declarations, not fitted to any data:
# this is the built-in schema of featurised transactions (a DIR/payment/schema.toml, if present, replaces it).
# name: (lower, upper, transform)
FEATURE_BOUNDS: dict[str, tuple[float, float, str]] = {
    "log_total_spend": (0.0, 16.0, "none"),
    "mean_ticket": (0.0, 10_000.0, "log"),
    "median_ticket": (0.0, 10_000.0, "log"),
    "tx_per_month": (0.0, 300.0, "log"),
    "active_months": (0.0, float(N_MONTHS), "none"),
    "monthly_spend_cv": (0.0, 3.5, "none"),  # population cv of 12 values is at most sqrt(11) = 3.32
    **{name: (0.0, 1.0, "none") for name in _SHARE_NAMES},
    "night_share": (0.0, 1.0, "none"),
    "large_purchase_share": (0.0, 1.0, "none"),
    "spend_trend_log_ratio": (-10.0, 10.0, "none"),
    "monthly_spend_slope": (-0.5, 0.5, "none"),
    "amount_log_std": (0.0, 5.0, "none"),
    "n_devices": (0.0, 20.0, "log"),
    "n_cities": (0.0, 50.0, "log"),
    "online_share": (0.0, 1.0, "none"),
    "recent_30d_spend_ratio": (0.0, 12.0, "none"),  # the last 30 days hold at most all of a year's spend
    "days_since_last": (0.0, 3650.0, "log"),
}


def feature_schema():
    """The built-in public schema of the features computed here (fedscore.shared.data.schema.DataSchema)."""
    from fedscore.shared.data.schema import ColumnSchema, DataSchema

    if list(FEATURE_BOUNDS) != FEATURE_NAMES:
        raise RuntimeError("FEATURE_BOUNDS and FEATURE_NAMES are out of step")
    return DataSchema(columns=[ColumnSchema(name=name, type="numeric", lower=lo, upper=hi, transform=transform)
                               for name, (lo, hi, transform) in FEATURE_BOUNDS.items()])


def _fail(source: str, column: str, message: str) -> DataError:
    return DataError(f"{source}: column {column}: {message}")


def _no_missing(tx: pd.DataFrame, column: str, source: str) -> None:
    missing = tx[column].isna()
    if missing.any():
        row = int(missing.to_numpy().nonzero()[0][0])
        raise _fail(source, column, f"{int(missing.sum())} missing value(s), first at row {row}")


def _amounts(tx: pd.DataFrame, source: str) -> np.ndarray:
    raw = tx["amount"]
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna() & raw.notna()
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise _fail(source, "amount", f"non-numeric value {raw.iloc[row]!r} at row {row}")
    amount = values.to_numpy(dtype=np.float64, na_value=np.nan)
    invalid = ~np.isfinite(amount)
    if invalid.any():
        raise _fail(source, "amount", f"{int(invalid.sum())} missing or infinite value(s), "
                                      f"first at row {int(invalid.nonzero()[0][0])}")
    if (amount < 0).any():
        row = int((amount < 0).nonzero()[0][0])
        raise _fail(source, "amount", f"negative value {amount[row]!r} at row {row} (net refunds out first)")
    return amount


def _timestamps_ns(tx: pd.DataFrame, source: str) -> np.ndarray:
    """Wall-clock nanoseconds since the epoch (int64), from datetimes, ISO strings or epoch seconds."""
    raw = tx["timestamp"]
    _no_missing(tx, "timestamp", source)
    try:
        if pd.api.types.is_datetime64_any_dtype(raw):
            parsed = raw
        elif pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
            parsed = pd.to_datetime(raw, unit="s", errors="coerce")
        else:
            parsed = pd.to_datetime(raw, errors="coerce", format="ISO8601")
    except (ValueError, TypeError, OverflowError) as exc:
        raise _fail(source, "timestamp", f"cannot parse as datetime: {exc}") from exc
    bad = parsed.isna()
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise _fail(source, "timestamp", f"unparseable value {raw.iloc[row]!r} at row {row}")
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_localize(None)
    outside = (parsed < EARLIEST_TIMESTAMP) | (parsed >= LATEST_TIMESTAMP)
    if outside.any():
        row = int(outside.to_numpy().nonzero()[0][0])
        raise _fail(source, "timestamp", f"value {raw.iloc[row]!r} at row {row} is outside the accepted range "
                    f"[{EARLIEST_TIMESTAMP.date()}, {LATEST_TIMESTAMP.date()}) (a unit or year typo?)")
    return parsed.to_numpy(dtype="datetime64[ns]").view(np.int64)


def _codes(tx: pd.DataFrame, column: str, source: str) -> tuple[np.ndarray, pd.Index]:
    _no_missing(tx, column, source)
    codes, uniques = pd.factorize(tx[column])
    return codes.astype(np.int64), pd.Index(uniques)


def _distinct_per_user(user: np.ndarray, codes: np.ndarray, n_values: int, n_users: int) -> np.ndarray:
    pairs = pd.unique(user * np.int64(max(n_values, 1)) + codes)
    return np.bincount(pairs // max(n_values, 1), minlength=n_users).astype(np.float64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def features_from_transactions(tx: pd.DataFrame, source: str = "transactions") -> pd.DataFrame:
    """One row per user in `tx`: column `id` (str) then FEATURE_NAMES (float64), sorted by id.

    Raises DataError naming `source` and the column for missing columns, empty input, missing/non-numeric/negative
    amounts, unparseable timestamps, missing values and categories outside CATEGORIES.
    """
    missing = [c for c in TRANSACTION_COLUMNS if c not in tx.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)}")
    if len(tx) == 0:
        raise DataError(f"{source}: no transactions")

    user, ids = _codes(tx, "id", source)
    amount = _amounts(tx, source)
    ts = _timestamps_ns(tx, source)
    cat_codes, cat_values = _codes(tx, "category", source)
    known = {c: i for i, c in enumerate(CATEGORIES)}
    unknown = [str(v) for v in cat_values if str(v) not in known]
    if unknown:
        raise _fail(source, "category", f"unknown value(s) {unknown[:5]} (expected one of {list(CATEGORIES)})")
    category = np.array([known[str(v)] for v in cat_values], dtype=np.int64)[cat_codes]
    channel_codes, channel_values = _codes(tx, "channel", source)
    online = np.array([str(v) == "online" for v in channel_values], dtype=bool)[channel_codes]
    city, city_values = _codes(tx, "city", source)
    device, device_values = _codes(tx, "device", source)

    n = len(ids)
    ref = int(ts.max())
    age_days = (ref - ts) / 86_400e9
    last = pd.Series(ts).groupby(user).max().reindex(range(n)).to_numpy()

    inside = age_days < WINDOW_DAYS
    u, amt, age = user[inside], amount[inside], age_days[inside]
    month = np.minimum((age // MONTH_DAYS).astype(np.int64), N_MONTHS - 1)
    hour = (ts[inside] // 3_600_000_000_000) % 24
    night = (hour >= NIGHT_START_HOUR) | (hour < NIGHT_END_HOUR)
    log_amt = np.log1p(amt)
    sums = UserSums(
        ids=np.asarray(pd.Index(ids).astype(str), dtype=object), last_ns=last.astype(np.int64),
        count=np.bincount(u, minlength=n).astype(np.float64),
        total=np.bincount(u, weights=amt, minlength=n),
        monthly=np.bincount(u * N_MONTHS + month, weights=amt, minlength=n * N_MONTHS).reshape(n, N_MONTHS),
        log_sum=np.bincount(u, weights=log_amt, minlength=n),
        log_sq_sum=np.bincount(u, weights=log_amt**2, minlength=n),
        by_category=np.bincount(u * len(CATEGORIES) + category[inside], weights=amt,
                                minlength=n * len(CATEGORIES)).reshape(n, len(CATEGORIES)),
        median=pd.Series(amt).groupby(u).median().reindex(range(n), fill_value=0.0).to_numpy(),
        night=np.bincount(u, weights=night, minlength=n),
        large=np.bincount(u, weights=amt > LARGE_AMOUNT, minlength=n),
        n_devices=_distinct_per_user(u, device[inside], len(device_values), n),
        n_cities=_distinct_per_user(u, city[inside], len(city_values), n),
        online=np.bincount(u, weights=online[inside], minlength=n),
        recent_spend=np.bincount(u, weights=amt * (age < RECENT_DAYS), minlength=n))
    return features_from_sums(sums, ref)


@dataclass
class UserSums:
    """Per user, the sums over the window that every feature is a function of (one row per user, any order).

    Why a separate step: these are what an out-of-core engine can compute in one GROUP BY over a partitioned log
    (clients/payment/featurise_parquet.py); `features_from_sums` turns them into the features, the same way
    whichever engine computed them. All but `ids` and `last_ns` count only transactions inside the window."""

    ids: np.ndarray  # str (object)
    last_ns: np.ndarray  # int64: the user's latest timestamp, any age
    count: np.ndarray
    total: np.ndarray
    monthly: np.ndarray  # (n, N_MONTHS): spend per month bucket, bucket 0 the most recent
    log_sum: np.ndarray  # sum of log1p(amount)
    log_sq_sum: np.ndarray  # sum of log1p(amount)**2
    by_category: np.ndarray  # (n, len(CATEGORIES)): spend per category
    median: np.ndarray  # median amount (0 without a transaction in the window)
    night: np.ndarray  # transactions at night
    large: np.ndarray  # transactions above LARGE_AMOUNT
    n_devices: np.ndarray
    n_cities: np.ndarray
    online: np.ndarray  # transactions with channel online
    recent_spend: np.ndarray  # spend in the last RECENT_DAYS


def features_from_sums(sums: UserSums, ref: int) -> pd.DataFrame:
    """The features (column `id`, then FEATURE_NAMES, sorted by id) from per-user sums; `ref` is the reference time
    in epoch nanoseconds (the maximum timestamp of the whole table)."""
    count, total, monthly = sums.count, sums.total, sums.monthly
    days_since_last = (ref - sums.last_ns) / 86_400e9
    mean_month = total / N_MONTHS
    log_mean = _ratio(sums.log_sum, count)
    log_sq = _ratio(sums.log_sq_sum, count)
    by_cat = sums.by_category
    time_axis = np.arange(N_MONTHS - 1, -1, -1, dtype=np.float64)  # bucket 0 (latest) is time 11
    centred = time_axis - time_axis.mean()
    slope = monthly @ centred / float(centred @ centred)
    recent_mean = monthly[:, :RECENT_MONTHS].mean(axis=1)
    earlier_mean = monthly[:, RECENT_MONTHS:].mean(axis=1)

    columns: dict[str, np.ndarray] = {
        "log_total_spend": np.log1p(total),
        "mean_ticket": _ratio(total, count),
        "median_ticket": sums.median,
        "tx_per_month": count / N_MONTHS,
        "active_months": (monthly > 0).sum(axis=1).astype(np.float64),
        "monthly_spend_cv": _ratio(monthly.std(axis=1), mean_month),
        **{name: _ratio(by_cat[:, j], total) for j, name in enumerate(_SHARE_NAMES)},
        "night_share": _ratio(sums.night, count),
        "large_purchase_share": _ratio(sums.large, count),
        "spend_trend_log_ratio": np.where(count > 0, np.log1p(recent_mean) - np.log1p(earlier_mean), 0.0),
        "monthly_spend_slope": _ratio(slope, mean_month),
        "amount_log_std": np.sqrt(np.maximum(log_sq - log_mean**2, 0.0)),
        "n_devices": sums.n_devices,
        "n_cities": sums.n_cities,
        "online_share": _ratio(sums.online, count),
        "recent_30d_spend_ratio": _ratio(sums.recent_spend, mean_month),
        "days_since_last": days_since_last.astype(np.float64),
    }
    frame = pd.DataFrame({"id": sums.ids, **{k: columns[k].astype(np.float64) for k in FEATURE_NAMES}})
    return frame.sort_values("id", kind="stable").reset_index(drop=True)
