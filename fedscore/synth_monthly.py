"""Monthly synthetic snapshots with an optional shock: the data the dynamic model (issue 21) is watched and
retrained on.

Why this shape: a credit model in production is watched month by month, and its labels arrive late. Each month
`month-KK/` is one folder in the layout `fedscore data synth` writes (DIR/payment/transactions.parquet with the
trailing twelve months of the payment holder's log as of that month's end, DIR/lender/applicants.parquet with that
month's applicants), so today's `fedscore train` reads any month as it is. A label is the outcome over the performance
window (`performance_window` months, 6 by default): the file holds it, but `months.json` says from which month it
has matured, and the monitor and the training window use only matured months (`assemble_window`).

People: every month brings new applicants (each person applies once); 82% of them hold a payment account, and a
fifth as many payment-only customers fill the payment holder's side. The first month's applicants with a payment
account are the lender's book (`book.parquet`): they stay, so each later month's payment snapshot carries their
latest twelve months too, with their recent distress drifting month to month (limit management, `score --book`).

The shock from month S (`--shock S`) changes part of the population; the rest stays as it was:
- income falls in some cities (SHOCK_CITIES, 47% of people by the generator's city weights): their spending after S
  is cut (amounts x SPEND_FACTOR in the months after the shock, so the 12-month features move as the months pass)
  and their declared income drops by INCOME_DROP standardised units (monthly income x0.35 through the generator's
  0.35 loading). The income band follows directly; the requested amount (loading 0.35) and the existing debt
  (loading 0.55) follow through the generator's own loadings. The bands are cut at fixed pre-shock quantiles, so
  the fall shows as a fall. Sized so that income_band and requested_amount land well above PSI 0.25 against a
  pre-shock reference (BENCHMARKS.md "Issue 21": 2.5 units on 37% of people sat on the 0.25 line);
- a new spending category appears: buy-now-pay-later instalments. The payment holder's feature definition has a
  fixed category list (clients/payment/features.py refuses unknown values), so instalments are booked as online
  "shopping" and show as share_shopping, online_share, tx_per_month and the ticket sizes;
- the default rate rises: extra defaults among the shocked cities' people and heavy instalment users (the model
  never saw this), on top of the generator's calibrated 7.5%.
Unchanged by construction: age, bureau score, tenure, night-time and large-purchase behaviour, devices.

The helpers of fedscore/synth.py (`_people`, `_lender`, `_transactions`, `_write`) make each month's tables; this
module only chooses who is in a month and applies the shock. One `default_rng((seed, month))` per month: a seed gives
the same folders whatever months are regenerated.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from fedscore.clients.payment.features import CATEGORIES, CHANNELS, MONTH_DAYS, N_MONTHS, feature_schema
from fedscore.shared.data.schema import write_schema
from fedscore.synth import (
    CITIES,
    END,
    LENDER_SCHEMA,
    SCHEMA_HEADER,
    _lender,
    _people,
    _transactions,
    _umask,
    _write,
)

META_FILE = "months.json"
BOOK_FILE = "book.parquet"
PERFORMANCE_WINDOW = 6  # months until an applicant's outcome is known
APPLICANT_PAYMENT_SHARE = 0.82
PAYMENT_ONLY_SHARE = 0.2  # payment-only customers per applicant in a month's snapshot
BOOK_LIMIT = 1500  # borrowers kept in the book (month 1's applicants with a payment account)
# cities whose people see their income fall (47% of the population by the generator's city weights)
SHOCK_CITIES = ("Porto", "Madrid", "Valencia", "Paris", "Marseille", "Berlin", "Munich", "Frankfurt", "Rome",
                "Naples", "Brussels", "Vienna", "Geneva", "Copenhagen", "Oslo", "Warsaw", "Prague", "Athens")
SPEND_FACTOR = 0.25  # spending of the shocked cities' people in the months after the shock
INCOME_DROP = 3.0  # in the generator's standardised income units (sd ~1): monthly income x exp(-0.35 * 3) = x0.35
BNPL_ADOPTION = 0.6  # share of people using instalments after the shock
BNPL_PER_MONTH = 5.0  # instalments a month for an adopter (Poisson mean)
INCOME_BAND_QUANTILES = [0.15, 0.35, 0.6, 0.8, 0.93]  # synth._lender's band cut-offs
EXTRA_DEFAULT_SHOCKED = 0.08  # extra default probability for a shocked city's applicant
EXTRA_DEFAULT_BNPL = 0.08  # extra default probability, scaled by the share of instalments in the spend
# columns the shock writes directly: the instalments (online shopping, small tickets) on the payment side, which
# cross PSI 0.25 as the twelve-month window fills with post-shock months; on the lender side the income band and the
# two columns the generator draws from the income at application (requested amount, existing debt), from month S.
# Moved indirectly, not listed: tx_per_month, log_total_spend, active_months, days_since_last, the other shares
# (diluted by the instalments) and the monthly spend trend columns. The rest must stay stable.
SHOCKED_COLUMNS = {"payment": ["online_share", "share_shopping", "median_ticket", "mean_ticket"],
                   "lender": ["income_band", "requested_amount", "existing_debt"]}
# columns the shock never touches, not even through another column (the monitor must call these stable)
# (every share of amounts or of transactions is diluted by the instalments: not on this list)
UNTOUCHED_COLUMNS = {"payment": ["n_devices", "n_cities"],
                     "lender": ["age", "bureau_score", "tenure_months"]}


class MonthInfo(BaseModel):
    month: int
    folder: str
    applicants: int
    payment_users: int
    transactions: int
    default_rate: float
    matures_at: int = Field(description="first month whose snapshot may use this month's outcomes")
    shocked: bool


class MonthlyMeta(BaseModel):
    """ROOT/months.json: what the generator made and when each month's outcomes mature."""

    months: int
    shock: int | None
    performance_window: int
    users_per_month: int
    seed: int
    shock_columns: dict[str, list[str]]
    untouched_columns: dict[str, list[str]] = Field(default_factory=dict)
    book: int
    info: list[MonthInfo]
    seconds: float = 0.0

    def month(self, k: int) -> MonthInfo:
        if not 1 <= k <= self.months:
            raise ValueError(f"month {k} is outside 1..{self.months}")
        return self.info[k - 1]


def month_folder(root: Path, k: int) -> Path:
    return Path(root) / f"month-{k:02d}"


def read_meta(root: Path) -> MonthlyMeta:
    path = Path(root) / META_FILE
    if not path.exists():
        raise ValueError(f"{root}: no {META_FILE} (not a folder made by `fedscore data synth --months`)")
    return MonthlyMeta.model_validate_json(path.read_text())


def _month_end(k: int, months: int) -> np.datetime64:
    """The last moment of month k: the last generated month ends at synth.END. Whole days back, so that moving a
    month's log to another month's end keeps every transaction's hour (night-time features)."""
    return END - np.timedelta64(round((months - k) * MONTH_DAYS), "D").astype("timedelta64[ns]")


def _home_cities(tx: dict, n: int, rng: np.random.Generator, home: np.ndarray) -> None:
    """Move each user's at-home transactions to `home` (the generator draws a home per call; a person's home must
    stay the same from month to month for the shock to hit the same people)."""
    k = len(CITIES)
    counts = np.bincount(tx["user"] * k + tx["city"], minlength=n * k).reshape(n, k)
    drawn = counts.argmax(axis=1)
    at_home = tx["city"] == drawn[tx["user"]]
    tx["city"] = np.where(at_home, home[tx["user"]], tx["city"])


def _append(tx: dict, extra: dict) -> dict:
    return {key: (np.concatenate([tx[key], extra[key]]) if key != "n_devices" else tx[key]) for key in tx}


def _shock_transactions(rng: np.random.Generator, tx: dict, shocked: np.ndarray, adopter: np.ndarray,
                        months_since: int, end: np.datetime64) -> None:
    """After the shock (buckets 0..months_since-1 back from the end): shocked people spend less, adopters pay
    instalments (online shopping, small tickets)."""
    if months_since <= 0:
        return
    bucket = np.floor((end - tx["timestamp"]).astype(np.int64) / 1e9 / 86_400 / MONTH_DAYS)
    after = bucket < months_since
    cut = after & shocked[tx["user"]]
    tx["amount"] = np.where(cut, np.round(tx["amount"] * SPEND_FACTOR, 2), tx["amount"])
    users = np.flatnonzero(adopter)
    if not len(users):
        return
    per_user = rng.poisson(BNPL_PER_MONTH * min(months_since, N_MONTHS), len(users))
    user = np.repeat(users, per_user)
    m = len(user)
    day_back = rng.random(m) * min(months_since, N_MONTHS) * MONTH_DAYS
    # debited in daytime hours (09..20), spread over the months since the shock
    seconds = (np.floor(day_back) * 86_400 + 86_399 - (9 + rng.integers(0, 12, m)) * 3600).astype(np.int64)
    first = np.searchsorted(tx["user"], user, side="left").clip(0, len(tx["user"]) - 1)  # users are sorted here
    extra = {"user": user, "timestamp": end - seconds * np.int64(1_000_000_000),
             "amount": np.round(np.exp(np.log(28.0) + 0.35 * rng.standard_normal(m)), 2),
             "category": np.full(m, CATEGORIES.index("shopping")), "city": tx["city"][first],
             "device": tx["device"][first], "channel": np.full(m, CHANNELS.index("online"))}
    tx.update(_append(tx, extra))


def _make_month(k: int, meta: MonthlyMeta, book_people: dict[str, np.ndarray] | None,
                book_ids: np.ndarray | None, out: Path) -> tuple[MonthInfo, dict[str, np.ndarray] | None, np.ndarray]:
    """Write month k's folder; returns its info, the book's people (month 1 creates them) and the book's ids."""
    rng = np.random.default_rng((meta.seed, k))
    n = meta.users_per_month
    n_extra = round(n * PAYMENT_ONLY_SHARE)
    people = _people(rng, n + n_extra)
    city_weights = 1.0 / np.arange(1, len(CITIES) + 1) ** 0.8
    city_weights /= city_weights.sum()
    people["home"] = rng.choice(len(CITIES), n + n_extra, p=city_weights)
    people["bnpl"] = rng.random(n + n_extra) < BNPL_ADOPTION
    ids = np.array([f"m{k:02d}-{i:06d}" for i in range(n + n_extra)])
    if book_people is not None and book_ids is not None:  # the book's borrowers: same traits, distress drifts
        book_people = {**book_people, "d": 0.85 * book_people["d"] + 0.53 * rng.standard_normal(len(book_ids))}
        people = {key: np.concatenate([people[key], book_people[key]]) for key in people}
        ids = np.concatenate([ids, book_ids])
    total = len(ids)
    applicant_rows = np.arange(n)
    holds = rng.random(n) < APPLICANT_PAYMENT_SHARE
    payment_rows = np.concatenate([applicant_rows[holds], np.arange(n, total)])
    months_since = 0 if meta.shock is None else k - meta.shock + 1
    shocked_city = np.isin(np.array(CITIES)[people["home"]], SHOCK_CITIES)
    shocked = shocked_city & (months_since > 0)

    end = _month_end(k, meta.months)
    tx = _transactions(rng, people, payment_rows)  # the history before the shock: the old income
    if months_since > 0:  # what the lender sees at application: the income now
        people = {**people, "income": np.where(shocked, people["income"] - INCOME_DROP, people["income"])}
    _home_cities(tx, len(payment_rows), rng, people["home"][payment_rows])
    tx["timestamp"] = tx["timestamp"] - (END - end)
    _shock_transactions(rng, tx, shocked[payment_rows], people["bnpl"][payment_rows] & (months_since > 0),
                        months_since, end)
    order = np.lexsort((tx["user"], tx["timestamp"]))

    # income bands are cut at the quantiles of the people passed in (synth._lender): a fixed block of unshocked
    # people drawn from the month-0 stream keeps the cut-offs where they were, so a fall in income moves the bands
    reference = _people(np.random.default_rng((meta.seed, 0)), 20_000)
    pool = {key: np.concatenate([people[key], reference[key]]) for key in ("z", "d", "age", "income")}
    lender, label = _lender(rng, pool, applicant_rows)
    # synth._lender cuts the bands at quantiles of the pool, which holds this month's (shocked) people too and so
    # moves the cut-offs down with the fall; cut again at the unshocked reference's quantiles alone
    cuts = np.quantile(reference["income"], INCOME_BAND_QUANTILES)
    lender["income_band"] = (np.searchsorted(cuts, people["income"][applicant_rows]) + 1).astype(np.int64)
    if months_since > 0:
        spend = np.bincount(tx["user"], weights=tx["amount"], minlength=len(payment_rows))
        bnpl_spend = np.bincount(tx["user"], weights=tx["amount"] * (tx["channel"] == CHANNELS.index("online"))
                                 * (tx["category"] == CATEGORIES.index("shopping")), minlength=len(payment_rows))
        share = np.zeros(total)
        share[payment_rows] = np.divide(bnpl_spend, spend, out=np.zeros_like(spend), where=spend > 0)
        extra = (EXTRA_DEFAULT_SHOCKED * shocked[applicant_rows]
                 + EXTRA_DEFAULT_BNPL * 4 * share[applicant_rows] * people["bnpl"][applicant_rows])
        label = np.maximum(label, (rng.random(n) < extra).astype(np.int8))
        lender["label"] = label
    folder = month_folder(out, k)
    _write(folder, ids, applicant_rows, lender, payment_rows, tx, order)
    write_schema(folder / "lender" / "schema.toml", LENDER_SCHEMA, SCHEMA_HEADER)
    write_schema(folder / "payment" / "schema.toml", feature_schema(),
                 "The derived payment features (clients/payment/features.py FEATURE_BOUNDS), declared public.")
    if book_people is None:  # month 1: its applicants with a payment account become the book
        rows = applicant_rows[holds][:BOOK_LIMIT]
        book_people = {key: people[key][rows] for key in people}
        book_ids = ids[rows]
    info = MonthInfo(month=k, folder=folder.name, applicants=n, payment_users=len(payment_rows),
                     transactions=len(tx["user"]), default_rate=float(np.mean(label)),
                     matures_at=k + meta.performance_window, shocked=months_since > 0)
    assert book_ids is not None
    return info, book_people, book_ids



@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` when the block finishes and removed if it fails: nothing
    half-written is ever left at `out` (an empty `out` given by the caller is replaced)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def synthesize_months(months: int, users: int, seed: int, out: Path, shock: int | None = None,
                      performance_window: int = PERFORMANCE_WINDOW) -> MonthlyMeta:
    """Write out/month-01 .. out/month-MM (each a `fedscore data synth` folder), out/book.parquet and out/months.json.

    Refuses (ValueError) a non-empty `out`, fewer than 2 months, a shock outside 2..months; built in a temporary
    folder beside `out` and renamed into place, so a failure leaves nothing half-written.
    """
    start = time.perf_counter()
    out = Path(out)
    if months < 2:
        raise ValueError(f"--months must be at least 2, got {months}")
    if shock is not None and not 2 <= shock <= months:
        raise ValueError(f"--shock {shock}: must be a month in 2..{months} (month 1 is the reference)")
    if users < 200:
        raise ValueError(f"--users must be at least 200 a month, got {users}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty; choose a new directory or remove it")
    meta = MonthlyMeta(months=months, shock=shock, performance_window=performance_window, users_per_month=users,
                       seed=seed, shock_columns=SHOCKED_COLUMNS if shock else {},
                       untouched_columns=UNTOUCHED_COLUMNS if shock else {}, book=0, info=[])
    with _staged(out) as tmp:
        book_people, book_ids = None, None
        for k in range(1, months + 1):
            info, book_people, book_ids = _make_month(k, meta, book_people, book_ids, tmp)
            meta.info.append(info)
        assert book_ids is not None
        pq.write_table(pa.table({"id": pa.array(list(book_ids), pa.string()),
                                 "since_month": pa.array(np.ones(len(book_ids), np.int64))}), tmp / BOOK_FILE)
        meta.book = len(book_ids)
        meta.seconds = round(time.perf_counter() - start, 3)
        (tmp / META_FILE).write_text(meta.model_dump_json(indent=1))
    return meta


def parse_months(text: str) -> tuple[int, int]:
    """'13..18' -> (13, 18); '7' -> (7, 7)."""
    first, sep, last = text.partition("..")
    try:
        a, b = int(first), int(last) if sep else int(first)
    except ValueError:
        raise ValueError(f"--months {text!r}: expected A..B, e.g. 13..18") from None
    if a < 1 or b < a:
        raise ValueError(f"--months {text!r}: need 1 <= A <= B")
    return a, b


def assemble_window(root: Path, first: int, last: int, out: Path, as_of: int | None = None) -> Path:
    """One `fedscore train` folder from months first..last: their applicants (outcomes must have matured by `as_of`,
    default the last generated month) and, for each, the payment holder's twelve months as of the application,
    shifted to a common end so the features are computed as of each application (features.py measures every
    window back from the table's latest timestamp).

    Refuses a window with unmatured outcomes or outside the generated months; written whole or not at all.
    """
    root, out = Path(root), Path(out)
    meta = read_meta(root)
    as_of = meta.months if as_of is None else as_of
    for k in (first, last):
        meta.month(k)
    late = [k for k in range(first, last + 1) if meta.month(k).matures_at > as_of]
    if late:
        raise ValueError(f"months {late[0]}..{late[-1]}: outcomes mature at month {meta.month(late[0]).matures_at}"
                         f" (performance window {meta.performance_window}), after month {as_of}: train on matured "
                         f"months only, e.g. --months {first}..{min(late) - 1}" if min(late) > first else
                         f"month {first}: no matured outcomes by month {as_of}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty; choose a new directory or remove it")
    end = _month_end(last, meta.months)
    applicants, payments = [], []
    for k in range(first, last + 1):
        folder = month_folder(root, k)
        lender = pq.read_table(folder / "lender" / "applicants.parquet")
        applicants.append(lender)
        tx = pq.read_table(folder / "payment" / "transactions.parquet")
        tx = tx.filter(pa.compute.is_in(tx["id"], value_set=lender["id"]))
        shift = pa.scalar(int((end - _month_end(k, meta.months)).astype(np.int64)), pa.duration("ns"))
        stamps = pa.compute.add(tx["timestamp"], shift)
        payments.append(tx.set_column(tx.column_names.index("timestamp"), "timestamp", stamps))
    with _staged(out) as tmp:
        (tmp / "payment").mkdir()
        (tmp / "lender").mkdir()
        pq.write_table(pa.concat_tables(payments, promote_options="permissive").combine_chunks(),
                       tmp / "payment" / "transactions.parquet", compression="zstd")
        pq.write_table(pa.concat_tables(applicants), tmp / "lender" / "applicants.parquet", compression="zstd")
        for party in ("payment", "lender"):
            shutil.copy(month_folder(root, first) / party / "schema.toml", tmp / party / "schema.toml")
        (tmp / "window.json").write_text(json.dumps({"root": str(root.resolve()), "months": [first, last],
                                                     "as_of": as_of}))
    return out
