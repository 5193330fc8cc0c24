"""A party's table as arrays: ids, feature names and raw values, with the checks both parties need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared.tables import DataError, numeric_matrix


@dataclass
class PartyTable:
    ids: list[str]
    columns: list[str]
    values: np.ndarray  # raw, float64, rows in file order
    source: str


def table_from_frame(frame: pd.DataFrame, source: Path | str, exclude: tuple[str, ...] = ("id",)) -> PartyTable:
    from shared.psi import check_ids

    if frame.empty:
        raise DataError(f"{source}: no rows")
    ids = check_ids(frame["id"].tolist(), f"{source}: column id")  # all str or all int, no blanks, no duplicates
    columns = [c for c in frame.columns if c not in exclude]
    if not columns:
        raise DataError(f"{source}: no feature columns besides {', '.join(exclude)}")
    values = numeric_matrix(frame, columns, Path(str(source))).to_numpy()
    return PartyTable(ids=ids, columns=columns, values=values, source=str(source))


def batches(n: int, batch_size: int, generator) -> list[np.ndarray]:
    """A seeded shuffle cut into minibatches (the last one may be short, never empty)."""
    import torch

    order = torch.randperm(n, generator=generator).numpy()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
