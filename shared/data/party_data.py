"""A party's table as arrays: ids, feature names and raw values, with the checks both parties need.

A table loaded for training carries its party's public schema (shared/data/schema.py): the columns are put in the
schema's order, declared impute values fill missing cells, and `report` counts what was imputed and what lies outside
the declared bounds (to be clipped) for the owner's own log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fedscore.shared.data.tables import DataError, numeric_matrix

if TYPE_CHECKING:
    from fedscore.shared.data.schema import DataSchema


@dataclass
class PartyTable:
    ids: list[str]
    columns: list[str]
    values: np.ndarray  # raw, float64, rows in file order
    source: str
    schema: DataSchema | None = None  # the party's declared columns; training needs it, scoring does not
    report: dict[str, Any] = field(default_factory=dict)  # imputed / out-of-bounds counts: the owner's log only


def table_from_frame(frame: pd.DataFrame, source: Path | str, exclude: tuple[str, ...] = ("id",)) -> PartyTable:
    from fedscore.shared.alignment.ids import check_ids

    if frame.empty:
        raise DataError(f"{source}: no rows")
    ids = check_ids(frame["id"].tolist(), f"{source}: column id")  # all str or all int, no blanks, no duplicates
    columns = [c for c in frame.columns if c not in exclude]
    if not columns:
        raise DataError(f"{source}: no feature columns besides {', '.join(exclude)}")
    values = numeric_matrix(frame, columns, Path(str(source))).to_numpy()
    return PartyTable(ids=ids, columns=columns, values=values, source=str(source))


def table_with_schema(frame: pd.DataFrame, source: Path | str, schema: DataSchema, schema_source: Path | str,
                      exclude: tuple[str, ...] = ("id",)) -> PartyTable:
    """A table whose feature columns are exactly the declared ones, in the schema's order, with declared impute
    values filled in. The values stay raw (clipping happens in the preprocessing, which the graph also carries)."""
    from fedscore.shared.data.schema import check_columns, clip_report, impute_frame

    columns = [c for c in frame.columns if c not in exclude]
    check_columns(schema, columns, source, schema_source)
    frame = frame.copy()
    imputed = impute_frame(frame, schema)
    table = table_from_frame(frame[[*(c for c in frame.columns if c in exclude), *schema.names]], source, exclude)
    report: dict[str, Any] = {"rows": len(table.ids), "out_of_bounds": clip_report(schema, table.values)}
    if imputed:
        report["imputed"] = imputed
    table.schema, table.report = schema, report
    return table


def batches(n: int, batch_size: int, generator) -> list[np.ndarray]:
    """A seeded shuffle cut into minibatches (the last one may be short, never empty)."""
    import torch

    order = torch.randperm(n, generator=generator).numpy()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
