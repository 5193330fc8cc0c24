"""The embedded default data: a payment holder's transaction log and a lender's applicant table for one population.

Why it is built this way: the demo must show what vertical federation buys, so the two tables are generated from
shared latent traits. A financial-stability factor `z` drives both sides (the lender sees it through noisy bureau
score, income and debt; the payment holder through regular spend, category mix, night-time and impulsive
purchases), and a "recent distress" factor `d` shows only in the last three months of payment behaviour (rising
spend, cash and travel, night-time, large purchases). Default depends on both, so the lender alone reaches a
modest AUC and the payment features add signal it cannot see. Only part of the population is in both tables, as
in a real partnership. Everything is vectorised numpy driven by one `default_rng(seed)`, so a seed gives
byte-identical files and 100k people take seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from fedscore.clients.payment.features import (
    CATEGORIES,
    CHANNELS,
    MONTH_DAYS,
    N_MONTHS,
    TRANSACTION_COLUMNS,
    feature_schema,
)
from fedscore.shared.data.schema import ColumnSchema, DataSchema, LabelSchema, write_schema

END = np.datetime64("2026-06-30T23:59:59", "ns")  # last moment of the generated year
PAYMENT_SHARE = 0.75  # of the population holding a payment account
APPLICANT_SHARE = 0.35  # of the population that applied to the lender
APPLICANT_PAYMENT_SHARE = 0.82  # of applicants who also hold a payment account (the rest are lender-only)
TARGET_DEFAULT_RATE = 0.075

CITIES = ("Lisbon", "Porto", "Madrid", "Barcelona", "Valencia", "Seville", "Paris", "Lyon", "Marseille", "Toulouse",
          "Berlin", "Hamburg", "Munich", "Cologne", "Frankfurt", "Milan", "Rome", "Turin", "Naples", "Amsterdam",
          "Rotterdam", "Brussels", "Antwerp", "Vienna", "Zurich", "Geneva", "Dublin", "Cork", "Copenhagen",
          "Stockholm", "Oslo", "Helsinki", "Warsaw", "Krakow", "Prague", "Budapest", "Athens", "Bucharest")

# Per category: base logit of its share, loading on stability z, loading on recent distress d (last 3 months),
# log-median amount, log-sd of amount, logit of paying online.
_CAT = np.array([
    # base   z      d     log-median        sd    online
    [1.30, 0.30, -0.30, np.log(38.0), 0.55, -1.6],   # groceries
    [0.20, 0.45, -0.40, np.log(85.0), 0.35, 0.9],    # utilities
    [0.80, 0.05, -0.10, np.log(12.0), 0.60, -0.7],   # transport
    [0.60, -0.10, 0.05, np.log(26.0), 0.60, -1.2],   # dining
    [0.50, -0.20, 0.25, np.log(55.0), 0.80, 0.6],    # shopping
    [0.00, -0.25, 0.40, np.log(35.0), 0.75, 0.5],    # entertainment
    [-1.40, -0.05, 0.60, np.log(220.0), 0.70, 0.8],  # travel
    [-0.60, -0.45, 0.90, np.log(90.0), 0.60, 0.0],   # cash (always ATM)
])
_DAY_HOUR_WEIGHTS = np.array([2, 4, 6, 7, 7, 8, 10, 11, 9, 8, 8, 9, 11, 12, 10, 7], dtype=np.float64)  # 06..21
_NIGHT_HOUR_WEIGHTS = np.array([6, 4, 3, 2, 1, 1, 1, 3], dtype=np.float64)  # 22, 23, 00..05


class SynthSummary(BaseModel):
    users: int
    payment_users: int
    lender_rows: int
    overlap: int
    transactions: int
    default_rate: float
    seconds: float


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _pick(rng: np.random.Generator, probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each entry of `rows`, a column index drawn from that row of `probs` (one vectorised searchsorted)."""
    k = probs.shape[1]
    cum = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
    cum[:, -1] = 1.0
    flat = (cum + np.arange(len(probs))[:, None]).ravel()
    idx = np.searchsorted(flat, rows + rng.random(len(rows)), side="right")
    return np.minimum(idx - rows * k, k - 1)


def _people(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    z = rng.standard_normal(n)
    distress = rng.standard_normal(n)
    age = np.clip(np.rint(41 + 12.5 * rng.standard_normal(n) + 2.0 * z), 19, 80)
    income = 0.45 * z + 0.3 * (age - 41) / 12.5 + 0.84 * rng.standard_normal(n)
    return {"z": z, "d": distress, "age": age, "income": income}


def _lender(rng: np.random.Generator, p: dict[str, np.ndarray], rows: np.ndarray) -> tuple[dict, np.ndarray]:
    z, d, age, income = p["z"][rows], p["d"][rows], p["age"][rows], p["income"][rows]
    n = len(rows)
    cuts = np.quantile(p["income"], [0.15, 0.35, 0.6, 0.8, 0.93])
    band = np.searchsorted(cuts, income) + 1
    debt = np.exp(8.6 + 0.55 * income - 0.35 * z + 0.9 * rng.standard_normal(n))
    debt = np.where(rng.random(n) < _sigmoid(-1.2 + 0.6 * z), 0.0, np.round(debt, -1))
    bureau = np.clip(np.rint(690 + 62 * (0.6 * z + 0.8 * rng.standard_normal(n))), 300, 850)
    requested = np.round(np.exp(8.7 + 0.35 * income + 0.15 * d + 0.55 * rng.standard_normal(n)), -2)
    tenure = np.clip(np.rint(np.exp(3.2 + 0.25 * z + 0.025 * (age - 41) + 0.75 * rng.standard_normal(n))), 0, 480)
    monthly_income = 1400.0 * np.exp(0.35 * income)
    burden = np.log1p(debt / (12 * monthly_income)) + 0.5 * np.log(requested / (12 * monthly_income))
    risk = -1.15 * z + 1.35 * d + 0.6 * burden - 0.010 * (age - 41)
    intercept = _intercept(risk, TARGET_DEFAULT_RATE)
    label = (rng.random(n) < _sigmoid(intercept + risk)).astype(np.int8)
    columns = {"age": age.astype(np.int64), "income_band": band.astype(np.int64), "existing_debt": debt,
               "bureau_score": bureau.astype(np.int64), "requested_amount": requested,
               "tenure_months": tenure.astype(np.int64), "label": label}
    return columns, label


def _intercept(risk: np.ndarray, rate: float) -> float:
    """Intercept giving the expected default rate `rate` (bisection: the mean of sigmoids is monotone)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _sigmoid(mid + risk).mean() < rate else (lo, mid)
    return (lo + hi) / 2


def _transactions(rng: np.random.Generator, p: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Arrays of the transaction log; `user` indexes `rows` (the payment holder's customers)."""
    z, d, age, income = p["z"][rows], p["d"][rows], p["age"][rows], p["income"][rows]
    n = len(rows)
    activity = rng.standard_normal(n)
    recent = np.zeros((n, N_MONTHS))
    recent[:, :3] = [1.0, 0.67, 0.33]  # month buckets back from the end: distress builds up towards now
    shape = np.exp(1.0 + 0.8 * z)  # stable people spread spending evenly over the months
    weights = rng.gamma(shape[:, None], 1.0 / shape[:, None], size=(n, N_MONTHS))
    weights *= np.exp(0.8 * d[:, None] * recent)
    rate = np.clip(110.0 * np.exp(0.45 * activity - 0.1 * z), 20, 400) / N_MONTHS
    counts = rng.poisson(rate[:, None] * weights)
    month_of_row = np.repeat(np.tile(np.arange(N_MONTHS), n), counts.ravel())
    user = np.repeat(np.arange(n), counts.sum(axis=1))
    is_recent = month_of_row < 3

    taste = _CAT[:, 0] + 0.35 * rng.standard_normal((n, len(CATEGORIES)))
    base = taste + z[:, None] * _CAT[:, 1]
    logits = np.stack([base, base + np.maximum(d, 0)[:, None] * _CAT[:, 2]], axis=1).reshape(2 * n, -1)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    category = _pick(rng, probs, user * 2 + is_recent)

    impulsive = -3.3 - 0.6 * z[user] + 1.0 * np.maximum(d[user], 0) * is_recent
    sigma = _CAT[category, 4] * (1.0 + 0.15 * np.maximum(-z[user], 0))
    amount = np.exp(_CAT[category, 3] + 0.3 * income[user] + sigma * rng.standard_normal(len(user)))
    large = rng.random(len(user)) < _sigmoid(impulsive)
    amount = np.round(amount * np.where(large, np.exp(rng.normal(1.9, 0.4, len(user))), 1.0), 2)

    night_logit = -2.7 - 0.45 * z[user] - 0.02 * (age[user] - 41) + 1.3 * np.maximum(d[user], 0) * is_recent
    night = rng.random(len(user)) < _sigmoid(night_logit)
    hour = np.where(night,
                    (22 + rng.choice(8, len(user), p=_NIGHT_HOUR_WEIGHTS / _NIGHT_HOUR_WEIGHTS.sum())) % 24,
                    6 + rng.choice(16, len(user), p=_DAY_HOUR_WEIGHTS / _DAY_HOUR_WEIGHTS.sum()))
    day_back = np.floor((month_of_row + rng.random(len(user))) * MONTH_DAYS)
    seconds = hour * 3600 + rng.integers(0, 3600, len(user))
    stamp = END - (day_back.astype(np.int64) * 86_400 + 86_399 - seconds) * np.int64(1_000_000_000)

    online_logit = _CAT[category, 5] - 0.03 * (age[user] - 41) + 0.3 * activity[user]
    channel = np.where(rng.random(len(user)) < _sigmoid(online_logit), 1, 0)
    channel[category == CATEGORIES.index("cash")] = CHANNELS.index("atm")

    n_devices = 1 + np.minimum(rng.poisson(np.exp(-1.0 - 0.35 * z + 0.3 * np.maximum(d, 0))), 5)
    device_offset = np.concatenate([[0], np.cumsum(n_devices)[:-1]])
    device = device_offset[user] + np.floor(n_devices[user] * rng.random(len(user)) ** 2.5).astype(np.int64)

    city_weights = 1.0 / np.arange(1, len(CITIES) + 1) ** 0.8
    city_weights /= city_weights.sum()
    home = rng.choice(len(CITIES), n, p=city_weights)
    away_p = np.where(category == CATEGORIES.index("travel"), 0.85, 0.03 + 0.05 * _sigmoid(activity[user]))
    city = np.where(rng.random(len(user)) < away_p, rng.choice(len(CITIES), len(user), p=city_weights), home[user])
    return {"user": user, "timestamp": stamp, "amount": amount, "category": category, "city": city,
            "device": device, "n_devices": int(n_devices.sum()), "channel": channel}


def _dictionary(codes: np.ndarray, values: list[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(values, pa.string()))


def _transaction_table(user_ids: np.ndarray, tx: dict, order: np.ndarray, device_base: int = 0) -> pa.Table:
    """The transaction log of `user_ids` (tx["user"] indexes them) as an Arrow table in `order`; device names are
    numbered from `device_base`, so chunks written one after another never share a device."""
    device_names = [f"dev-{i:07x}" for i in range(device_base, device_base + tx["n_devices"])]
    table = pa.table({
        "id": _dictionary(tx["user"][order], list(user_ids)).dictionary_decode(),
        "timestamp": pa.array(tx["timestamp"][order].view(np.int64), pa.int64()).cast(pa.timestamp("ns")),
        "amount": pa.array(tx["amount"][order], pa.float64()),
        "category": _dictionary(tx["category"][order], list(CATEGORIES)),
        "city": _dictionary(tx["city"][order], list(CITIES)),
        "device": _dictionary(tx["device"][order], device_names),
        "channel": _dictionary(tx["channel"][order], list(CHANNELS)),
    })
    if table.column_names != TRANSACTION_COLUMNS:  # the features module defines the schema; keep them in step
        raise RuntimeError(f"transaction columns {table.column_names} != {TRANSACTION_COLUMNS}")
    return table


def _applicant_table(ids: np.ndarray, lender_rows: np.ndarray, lender: dict) -> pa.Table:
    return pa.table({"id": pa.array(list(ids[lender_rows]), pa.string()),
                     **{k: pa.array(v) for k, v in lender.items()}})


def _write(out: Path, ids: np.ndarray, lender_rows: np.ndarray, lender: dict, payment_rows: np.ndarray,
           tx: dict, order: np.ndarray) -> None:
    """Both tables at once, the transactions as ONE file (out/payment/transactions.parquet): for a log that fits
    in memory. `synthesize` writes the log in chunks instead (`_write_transactions_in_chunks`)."""
    (out / "payment").mkdir(parents=True)
    (out / "lender").mkdir(parents=True)
    table = _transaction_table(ids[payment_rows], tx, order)
    pq.write_table(table, out / "payment" / "transactions.parquet", compression="zstd")
    pq.write_table(_applicant_table(ids, lender_rows, lender), out / "lender" / "applicants.parquet",
                   compression="zstd")


# Payment users per transaction chunk: ~13M transactions, ~2 GB at the generator's peak. The demo's 75k payment
# users fit in one chunk, so its data are the same rows as when the log was generated whole.
CHUNK_PAYMENT_USERS = 100_000
TRANSACTIONS_DIR = "transactions.parquet"  # a directory of part-NNNNN.parquet files (one per chunk of users)


def _write_transactions_in_chunks(rng: np.random.Generator, people: dict[str, np.ndarray], ids: np.ndarray,
                                  payment_rows: np.ndarray, folder: Path, chunk_users: int) -> int:
    """Generate and write the transaction log chunk by chunk of payment users, one Parquet part per chunk (each
    sorted by time, users disjoint between parts), so no more than one chunk is ever in memory. Returns the number
    of transactions. Draws from `rng` in chunk order: with one chunk, exactly the draws of the whole-log generator."""
    folder.mkdir(parents=True)
    transactions, device_base = 0, 0
    for part, start in enumerate(range(0, len(payment_rows), chunk_users)):
        rows = payment_rows[start:start + chunk_users]
        tx = _transactions(rng, people, rows)
        order = np.lexsort((tx["user"], tx["timestamp"]))
        table = _transaction_table(ids[rows], tx, order, device_base)
        pq.write_table(table, folder / f"part-{part:05d}.parquet", compression="zstd")
        transactions += len(tx["user"])
        device_base += tx["n_devices"]
        del tx, order, table
    return transactions


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The lender's public declarations (the generator's own domain: bureau scores run 300..850, six income bands, tenure
# capped at 50 years), with a typical applicant as the reason-code reference. Not computed from the generated rows.
LENDER_SCHEMA = DataSchema(label=LabelSchema(), columns=[
    ColumnSchema(name="age", type="integer", lower=18, upper=100, reference=40),
    ColumnSchema(name="income_band", type="category", levels=[1, 2, 3, 4, 5, 6], transform="onehot", reference=3),
    ColumnSchema(name="existing_debt", type="numeric", lower=0, upper=1_000_000, transform="log", reference=5_000),
    ColumnSchema(name="bureau_score", type="integer", lower=300, upper=850, reference=690),
    ColumnSchema(name="requested_amount", type="numeric", lower=0, upper=1_000_000, transform="log", reference=6_000),
    ColumnSchema(name="tenure_months", type="integer", lower=0, upper=600, transform="log", reference=24),
])
SCHEMA_HEADER = "Public declarations (domain bounds, not computed from the data). Values outside are clipped."

# the payment holder's fraud list (for the private blacklist check): this share of its users
FRAUD_SHARE = 0.01


def synthesize(users: int, seed: int, out: Path, *, chunk_users: int = CHUNK_PAYMENT_USERS) -> SynthSummary:
    """Generate `users` people and write out/payment/transactions.parquet/ (a directory of Parquet parts, written
    chunk by chunk of `chunk_users` payment users) and out/lender/applicants.parquet, each with its party's
    schema.toml.

    Refuses (ValueError) if `out` exists and is not an empty directory. Files are built in a temporary directory
    beside `out` and renamed into place, so a failure leaves nothing half-written.
    """
    start = time.perf_counter()
    out = Path(out)
    if users < 10:
        raise ValueError(f"users must be at least 10, got {users}")
    if chunk_users < 1:
        raise ValueError(f"chunk_users must be at least 1, got {chunk_users}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty; choose a new directory or remove it")
    rng = np.random.default_rng(seed)
    width = max(7, len(str(users - 1)))
    ids = np.array([f"u{i:0{width}d}" for i in rng.permutation(users)])
    people = _people(rng, users)
    applicant = rng.random(users) < APPLICANT_SHARE
    other_payment = (PAYMENT_SHARE - APPLICANT_SHARE * APPLICANT_PAYMENT_SHARE) / (1 - APPLICANT_SHARE)
    payment = rng.random(users) < np.where(applicant, APPLICANT_PAYMENT_SHARE, other_payment)
    lender_rows = rng.permutation(np.flatnonzero(applicant))
    payment_rows = np.flatnonzero(payment)
    lender, label = _lender(rng, people, lender_rows)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should be an ordinary directory
        (tmp / "lender").mkdir()
        transactions = _write_transactions_in_chunks(rng, people, ids, payment_rows,
                                                     tmp / "payment" / TRANSACTIONS_DIR, chunk_users)
        fraud_rows = payment_rows[rng.random(len(payment_rows)) < FRAUD_SHARE]  # drawn last: earlier draws unchanged
        pq.write_table(_applicant_table(ids, lender_rows, lender), tmp / "lender" / "applicants.parquet",
                       compression="zstd")
        pq.write_table(pa.table({"id": pa.array(list(ids[fraud_rows]), pa.string())}),
                       tmp / "payment" / "fraud_list.parquet")
        write_schema(tmp / "lender" / "schema.toml", LENDER_SCHEMA, SCHEMA_HEADER)
        write_schema(tmp / "payment" / "schema.toml", feature_schema(),
                     "The derived payment features (clients/payment/features.py FEATURE_BOUNDS), declared public.")
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SynthSummary(users=users, payment_users=len(payment_rows), lender_rows=len(lender_rows),
                        overlap=int((applicant & payment).sum()), transactions=transactions,
                        default_rate=float(label.mean()), seconds=round(time.perf_counter() - start, 3))
