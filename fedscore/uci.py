"""The real UCI Taiwan credit-default data, cut vertically into the two parties' folders.

Splits (../shared/data/uci-credit-default/README.md):
- scenario: lender = LIMIT_BAL, SEX, EDUCATION, MARRIAGE, AGE + label; payment = PAY_*, BILL_AMT*, PAY_AMT*.
- fate: label holder = PAY_6, BILL_AMT1..6, PAY_AMT1..6 + label; other party = LIMIT_BAL..AGE, PAY_0, PAY_2..PAY_5.

Each party's folder also gets a schema.toml: bounds, levels and references written by hand from the dataset's
documentation (NT$ amounts, the documented codes of SEX, EDUCATION, MARRIAGE and the repayment status), never from
the data's own minima or maxima. Values outside them (a few large bills and payments) are clipped in training.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

import pandas as pd

from fedscore.shared.data.schema import ColumnSchema, DataSchema, LabelSchema, write_schema
from fedscore.shared.data.tables import DataError

LABEL = "default.payment.next.month"
PAY = ["PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6"]
BILL = [f"BILL_AMT{i}" for i in range(1, 7)]
PAID = [f"PAY_AMT{i}" for i in range(1, 7)]
DEMOGRAPHIC = ["LIMIT_BAL", "SEX", "EDUCATION", "MARRIAGE", "AGE"]

_STATUS = [float(v) for v in range(-2, 10)]  # -2, -1 paid duly / no use, 0 revolving, 1..9 months late
# Public declarations per column (UCI documentation, README of the data folder); references: a typical applicant.
COLUMNS: dict[str, ColumnSchema] = {
    "LIMIT_BAL": ColumnSchema(name="LIMIT_BAL", type="numeric", lower=0, upper=1_000_000, transform="log",
                              reference=100_000),
    "SEX": ColumnSchema(name="SEX", type="category", levels=[1, 2], reference=2),
    "EDUCATION": ColumnSchema(name="EDUCATION", type="category", levels=[0, 1, 2, 3, 4, 5, 6], transform="onehot",
                              reference=2),
    "MARRIAGE": ColumnSchema(name="MARRIAGE", type="category", levels=[0, 1, 2, 3], transform="onehot", reference=2),
    "AGE": ColumnSchema(name="AGE", type="integer", lower=18, upper=100, reference=35),
    **{c: ColumnSchema(name=c, type="category", levels=_STATUS, transform="onehot", reference=0) for c in PAY},
    **{c: ColumnSchema(name=c, type="numeric", lower=-200_000, upper=1_000_000, transform="log", reference=0)
       for c in BILL},
    **{c: ColumnSchema(name=c, type="numeric", lower=0, upper=1_000_000, transform="log", reference=0) for c in PAID},
}
SCHEMA_HEADER = ("Public declarations for the UCI Taiwan credit-default columns, written by hand from the dataset's\n"
                 "documentation (not computed from the data). Values outside [lower, upper] are clipped.")

SPLITS: dict[str, tuple[list[str], list[str]]] = {
    # split: (lender columns, payment columns)
    "scenario": (DEMOGRAPHIC, PAY + BILL + PAID),
    "fate": (["PAY_6", *BILL, *PAID], [*DEMOGRAPHIC, "PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5"]),
}


def convert_uci(csv: Path, split: Literal["scenario", "fate"], out: Path) -> dict[str, int]:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose {' or '.join(SPLITS)}")
    try:
        frame = pd.read_csv(csv)
    except FileNotFoundError as exc:
        raise DataError(f"{csv}: file not found") from exc
    lender_cols, payment_cols = SPLITS[split]
    missing = [c for c in ["ID", LABEL, *lender_cols, *payment_cols] if c not in frame.columns]
    if missing:
        raise DataError(f"{csv}: missing column(s) {', '.join(missing)}")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not empty; choose a new folder")
    ids = frame["ID"].astype(str)
    lender = pd.concat([ids.rename("id"), frame[lender_cols], frame[LABEL].rename("label")], axis=1)
    payment = pd.concat([ids.rename("id"), frame[payment_cols]], axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        (staging / "lender").mkdir()
        (staging / "payment").mkdir()
        lender.to_parquet(staging / "lender" / "applicants.parquet", index=False)
        payment.to_parquet(staging / "payment" / "features.parquet", index=False)
        write_schema(staging / "lender" / "schema.toml", DataSchema(
            label=LabelSchema(), columns=[COLUMNS[c] for c in lender_cols]), SCHEMA_HEADER)
        write_schema(staging / "payment" / "schema.toml", DataSchema(columns=[COLUMNS[c] for c in payment_cols]),
                     SCHEMA_HEADER)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"rows": len(frame), "lender_columns": len(lender_cols), "payment_columns": len(payment_cols)}
