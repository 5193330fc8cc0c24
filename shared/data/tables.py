"""Reading a party's table (Parquet or CSV) with errors that name the file and the column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and, where it applies, the column."""


TABLE_SUFFIXES = (".parquet", ".csv")


def find_table(directory: Path, stem: str) -> Path:
    for suffix in TABLE_SUFFIXES:
        candidate = directory / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    raise DataError(f"{directory}: no {stem}.parquet or {stem}.csv")


def read_table(path: Path, required: list[str]) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype={"id": str})
    except Exception as exc:  # pandas/pyarrow raise many types; the user needs the file name
        raise DataError(f"{path}: cannot read table: {exc}") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def numeric_matrix(frame: pd.DataFrame, columns: list[str], path: Path) -> pd.DataFrame:
    out = {}
    for column in columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{path}: column {column}: non-numeric value {frame[column].iloc[row]!r} at row {row}")
        if values.isna().any():
            raise DataError(f"{path}: column {column}: {int(values.isna().sum())} missing value(s)")
        infinite = np.isinf(values.to_numpy(dtype="float64"))
        if infinite.any():
            row = int(infinite.nonzero()[0][0])
            raise DataError(f"{path}: column {column}: {int(infinite.sum())} infinite value(s), e.g. "
                            f"{values.iloc[row]} at row {row}; use a finite value or leave it missing")
        out[column] = values.astype("float64")
    return pd.DataFrame(out)
