"""`fedscore data schema`: a first draft of a party's schema.toml, for the data owner to review.

Why a draft may look at the data: it runs on the owner's machine, on the owner's own table, and its output is a
proposal the owner edits before anything is trained. What training uses are the reviewed declarations, which must be
public knowledge (the domain's documented range, not this table's min and max); the command says so when it writes.
Bounds are rounded outward to one significant digit, so the draft does not pin the table's exact extremes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedscore.shared.data.schema import ColumnSchema, DataSchema, LabelSchema, write_schema
from fedscore.shared.data.tables import DataError, numeric_matrix, read_table
from fedscore.shared.model.preprocessing import heavy_tailed_columns

REVIEW_NOTE = ("DRAFT from the data: review every bound, level and reference before training. They ship in the model,\n"
               "so they must be public knowledge (the domain's documented range), not this table's own extremes.")
MAX_LEVELS = 12


def _outward(value: float, up: bool) -> float:
    """Round away from the data to one significant digit (0 stays 0)."""
    if value == 0 or not math.isfinite(value):
        return 0.0
    step = 10.0 ** math.floor(math.log10(abs(value)))
    return float((math.ceil if up else math.floor)(value / step) * step)


def draft_column(name: str, values: np.ndarray, log: bool) -> ColumnSchema:
    integer = bool(np.all(values == np.round(values)))
    distinct = np.unique(values)
    if integer and 2 <= len(distinct) <= MAX_LEVELS:
        levels = [float(v) for v in distinct]
        return ColumnSchema(name=name, type="category", levels=levels,
                            transform="onehot" if len(levels) >= 3 else "none", reference=levels[0])
    lower, upper = _outward(float(values.min()), up=False), _outward(float(values.max()), up=True)
    if lower >= upper:
        upper = lower + 1.0
    return ColumnSchema(name=name, type="integer" if integer else "numeric", lower=lower, upper=upper,
                        transform="log" if log else "none")


def draft_schema(table: Path) -> DataSchema:
    frame = read_table(table, ["id"])
    columns = [c for c in frame.columns if c not in ("id", "label")]
    if not columns:
        raise DataError(f"{table}: no feature columns besides id and label")
    values = numeric_matrix(frame, columns, table).to_numpy()
    logged = set(heavy_tailed_columns(columns, values))
    return DataSchema(label=LabelSchema() if "label" in frame.columns else None,
                      columns=[draft_column(c, values[:, j], c in logged) for j, c in enumerate(columns)])


def write_draft(table: Path, out: Path) -> DataSchema:
    if out.exists():
        raise DataError(f"{out}: exists; a draft never overwrites a reviewed schema")
    schema = draft_schema(table)
    write_schema(out, schema, REVIEW_NOTE)
    return schema
