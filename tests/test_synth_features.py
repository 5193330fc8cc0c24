"""The embedded data generator and the payment features: shape, determinism, validation and real signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fedscore.clients.payment.features import (
    CATEGORIES,
    FEATURE_DEFINITION,
    FEATURE_NAMES,
    SHARE_FEATURES,
    TRANSACTION_COLUMNS,
    features_from_transactions,
)
from fedscore.shared.data.tables import DataError
from fedscore.synth import SynthSummary, synthesize

LENDER_COLUMNS = ["age", "income_band", "existing_debt", "bureau_score", "requested_amount", "tenure_months"]


def _read(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (pd.read_parquet(out / "payment" / "transactions.parquet"),
            pd.read_parquet(out / "lender" / "applicants.parquet"))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, synthesize(2000, seed=11, out=out)


@pytest.fixture(scope="module")
def small_tx(small: tuple[Path, SynthSummary]) -> pd.DataFrame:
    return _read(small[0])[0]


def test_files_schema_and_summary(small: tuple[Path, SynthSummary]) -> None:
    out, summary = small
    tx, applicants = _read(out)
    assert list(tx.columns) == TRANSACTION_COLUMNS
    assert tx["timestamp"].dtype == "datetime64[ns]"
    assert tx["amount"].dtype == np.float64 and (tx["amount"] >= 0).all()
    assert set(tx["category"].astype(str).unique()) <= set(CATEGORIES)
    assert list(applicants.columns) == ["id", *LENDER_COLUMNS, "label"]
    assert applicants["income_band"].between(1, 6).all()
    assert applicants["bureau_score"].between(300, 850).all()
    assert set(applicants["label"].unique()) <= {0, 1}
    assert applicants["id"].str.fullmatch(r"u\d{7}").all() and applicants["id"].is_unique
    assert summary.transactions == len(tx) and summary.lender_rows == len(applicants)
    assert summary.payment_users == tx["id"].nunique()
    assert 0.04 <= summary.default_rate <= 0.11
    assert applicants["label"].mean() == pytest.approx(summary.default_rate)


def test_overlap_is_partial(small: tuple[Path, SynthSummary]) -> None:
    tx, applicants = _read(small[0])
    payment, lender = set(tx["id"].astype(str)), set(applicants["id"])
    both = payment & lender
    assert len(payment - lender) > len(both) > 0  # most payment users never applied
    assert 0.1 <= len(lender - payment) / len(lender) <= 0.3  # some applicants are unknown to the payment holder
    assert len(both) == small[1].overlap


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        synthesize(300, seed=seed, out=tmp_path / name, chunk_users=100)
    parts = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet") if p.is_file())
    assert len([p for p in parts if p.parent.name == "transactions.parquet"]) >= 2  # written in chunks
    for part in parts:
        assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes()
    for part in [parts[0], Path("lender/applicants.parquet")]:
        assert (tmp_path / "a" / part).read_bytes() != (tmp_path / "c" / part).read_bytes()


def test_chunks_hold_disjoint_users_and_devices(tmp_path: Path) -> None:
    """Each part is one chunk of users (the log never sits whole in the generator's memory); a device belongs to one
    user's chunk only, and the parts together are the whole log the summary counts."""
    summary = synthesize(1200, seed=2, out=tmp_path / "d", chunk_users=250)
    parts = sorted((tmp_path / "d" / "payment" / "transactions.parquet").iterdir())
    frames = [pd.read_parquet(p) for p in parts]
    assert len(parts) == -(-summary.payment_users // 250)
    assert sum(len(f) for f in frames) == summary.transactions
    for column in ["id", "device"]:
        seen = [set(f[column].astype(str)) for f in frames]
        assert sum(len(s) for s in seen) == len(set().union(*seen)), column
    assert all(f["timestamp"].is_monotonic_increasing for f in frames)


def test_out_of_core_features_equal_in_memory(tmp_path: Path) -> None:
    """The DuckDB path over a directory of parts, and over today's single file, gives the features the in-memory
    featurisation gives (up to float summation order), and the loader takes both layouts."""
    from fedscore.clients.payment.data import load_payment_table
    from fedscore.clients.payment.featurise_parquet import features_from_parquet, fits_out_of_core

    out = tmp_path / "d"
    synthesize(1200, seed=5, out=out, chunk_users=200)  # six parts: the layout, not the size, is tested
    folder = out / "payment" / "transactions.parquet"
    tx = pd.read_parquet(folder)
    expected = features_from_transactions(tx)
    assert fits_out_of_core(folder)
    pd.testing.assert_frame_equal(features_from_parquet(folder), expected, rtol=1e-9, atol=1e-12)
    # users cut into buckets, one GROUP BY each (what bounds DuckDB's memory on a large log): groups of parts here
    pd.testing.assert_frame_equal(features_from_parquet(folder, rows_per_pass=len(tx) // 3), expected,
                                  rtol=1e-9, atol=1e-12)
    loaded = load_payment_table(out / "payment")
    np.testing.assert_allclose(loaded.values, expected[loaded.columns].to_numpy(), rtol=1e-9, atol=1e-12)
    assert loaded.ids == expected["id"].tolist()

    single = tmp_path / "single" / "payment"  # today's layout: one transactions.parquet file
    single.mkdir(parents=True)
    tx.to_parquet(single / "transactions.parquet", index=False)
    pd.testing.assert_frame_equal(features_from_parquet(single / "transactions.parquet"), expected,
                                  rtol=1e-9, atol=1e-12)
    assert load_payment_table(single).ids == expected["id"].tolist()
    spanning = tmp_path / "spanning.parquet"  # parts cut by row, so users span parts: hash buckets of users
    spanning.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(len(tx)), 3)):
        tx.iloc[rows].to_parquet(spanning / f"part-{i}.parquet", index=False)
    for path in (single / "transactions.parquet", spanning):
        pd.testing.assert_frame_equal(features_from_parquet(path, rows_per_pass=len(tx) // 3), expected,
                                      rtol=1e-9, atol=1e-12)
    as_text = single.parent / "text.parquet"  # timestamps as ISO text: read whole, in memory, same features
    tx.assign(timestamp=tx["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S")).to_parquet(as_text, index=False)
    assert not fits_out_of_core(as_text)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("amount", -5.0, "1 negative value"),
        ("amount", np.nan, "missing or infinite"),
        ("timestamp", pd.Timestamp("1850-01-01"), "outside the accepted range"),
        ("category", "gambling", r"unknown value\(s\) \['gambling'\]"),
        ("device", None, "1 missing value"),
    ],
)
def test_out_of_core_bad_values_name_the_column(tmp_path: Path, small_tx: pd.DataFrame, column: str,
                                                value: object, message: str) -> None:
    from fedscore.clients.payment.featurise_parquet import features_from_parquet

    bad = small_tx.head(50).copy()
    if column in ("category", "device"):
        bad[column] = bad[column].astype(str)
    bad.loc[7, column] = value
    path = tmp_path / "tx.parquet"
    bad.to_parquet(path, index=False)
    with pytest.raises(DataError, match=rf"bank\.parquet: column {column}: .*{message}"):
        features_from_parquet(path, source="bank.parquet")


def test_refuses_non_empty_out_and_leaves_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        synthesize(200, seed=1, out=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    synthesize(200, seed=1, out=empty)  # an empty directory is fine
    assert (empty / "lender" / "applicants.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty"]


def test_features_one_row_per_payment_user(small_tx: pd.DataFrame) -> None:
    features = features_from_transactions(small_tx)
    assert list(features.columns) == ["id", *FEATURE_NAMES]
    assert len(features) == small_tx["id"].nunique() and features["id"].is_unique
    assert set(features["id"]) == set(small_tx["id"].astype(str))
    assert all(features[c].dtype == np.float64 for c in FEATURE_NAMES)
    assert not features[FEATURE_NAMES].isna().any().any()
    assert np.isfinite(features[FEATURE_NAMES].to_numpy()).all()
    for column in SHARE_FEATURES:
        assert features[column].between(0, 1).all(), column
    shares = features[[f"share_{c}" for c in CATEGORIES]].sum(axis=1)
    assert np.allclose(shares, 1.0)
    assert features["active_months"].between(0, 12).all() and (features["n_devices"] >= 1).all()


def test_feature_definition_documents_every_feature() -> None:
    assert set(FEATURE_DEFINITION["features"]) == set(FEATURE_NAMES)
    assert "maximum timestamp" in FEATURE_DEFINITION["reference_time"]
    json.dumps(FEATURE_DEFINITION)


def test_timestamp_formats_give_same_features(small_tx: pd.DataFrame) -> None:
    sample = small_tx[small_tx["id"].isin(small_tx["id"].unique()[:50])].reset_index(drop=True)
    expected = features_from_transactions(sample)
    as_iso = sample.assign(timestamp=sample["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S"))
    as_epoch = sample.assign(timestamp=sample["timestamp"].astype("int64") // 1_000_000_000)
    as_text = sample.astype({c: str for c in ["id", "category", "city", "device", "channel"]})
    for variant in [as_iso, as_epoch, as_text]:
        pd.testing.assert_frame_equal(features_from_transactions(variant), expected)


def test_features_by_hand() -> None:
    tx = pd.DataFrame({
        "id": ["a", "a", "a", "b"],
        "timestamp": ["2026-06-30T23:00:00", "2026-06-30T12:00:00", "2026-03-01T10:00:00", "2026-06-01T03:00:00"],
        "amount": [100.0, 600.0, 300.0, 50.0],
        "category": ["groceries", "travel", "groceries", "cash"],
        "city": ["Porto", "Lisbon", "Porto", "Porto"],
        "device": ["d1", "d1", "d2", "d3"],
        "channel": ["in_store", "online", "online", "atm"],
    })
    f = features_from_transactions(tx).set_index("id")
    assert f.loc["a", "log_total_spend"] == pytest.approx(np.log1p(1000.0))
    assert f.loc["a", "share_groceries"] == pytest.approx(0.4)
    assert f.loc["a", "night_share"] == pytest.approx(1 / 3)
    assert f.loc["a", "large_purchase_share"] == pytest.approx(1 / 3)
    assert f.loc["a", "online_share"] == pytest.approx(2 / 3)
    assert f.loc["a", "n_devices"] == 2 and f.loc["a", "n_cities"] == 2
    assert f.loc["a", "active_months"] == 2 and f.loc["a", "days_since_last"] == 0
    assert f.loc["a", "recent_30d_spend_ratio"] == pytest.approx(700 / (1000 / 12))
    assert f.loc["b", "night_share"] == 1.0 and f.loc["b", "days_since_last"] == pytest.approx(29 + 20 / 24)


@pytest.mark.parametrize("column", TRANSACTION_COLUMNS)
def test_missing_column_raises_naming_it(small_tx: pd.DataFrame, column: str) -> None:
    with pytest.raises(DataError, match=rf"bank\.parquet: missing column\(s\) {column}"):
        features_from_transactions(small_tx.head(20).drop(columns=[column]), source="bank.parquet")


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("amount", "12,50", "non-numeric value '12,50'"),
        ("amount", None, "missing"),
        ("amount", -5.0, "negative"),
        ("timestamp", "yesterday", "unparseable value 'yesterday'"),
        ("category", "gambling", "unknown value"),
        ("id", None, "missing"),
    ],
)
def test_bad_values_raise_naming_column(small_tx: pd.DataFrame, column: str, value: object, message: str) -> None:
    bad = small_tx.head(20).astype({column: object})
    bad.loc[5, column] = value
    with pytest.raises(DataError, match=rf"bank\.parquet: column {column}: .*{message}"):
        features_from_transactions(bad, source="bank.parquet")


def test_payment_features_add_signal(tmp_path: Path) -> None:
    """Fails if the payment side stops carrying default signal the lender cannot see."""
    out = tmp_path / "data"
    synthesize(8000, seed=0, out=out)
    tx, applicants = _read(out)
    data = applicants.merge(features_from_transactions(tx), on="id")  # the rows both parties hold
    for column in ["existing_debt", "requested_amount"]:
        data[column] = np.log1p(data[column])
    train, test = train_test_split(data, test_size=0.3, stratify=data["label"], random_state=0)

    def auc(columns: list[str]) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(train[columns], train["label"])
        return float(roc_auc_score(test["label"], model.predict_proba(test[columns])[:, 1]))

    lender_only, joint = auc(LENDER_COLUMNS), auc(LENDER_COLUMNS + FEATURE_NAMES)
    assert 0.6 <= lender_only <= 0.8
    assert joint - lender_only >= 0.05, (lender_only, joint)
