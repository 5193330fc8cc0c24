"""Loading the lender's applicants: features plus the default label, which never leaves the lender."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.party_data import PartyTable, table_from_frame
from shared.tables import DataError, find_table, read_table


def load_applicants(directory: Path) -> PartyTable:
    """Applicants to score: features only; a label column, if present, is ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: lender data folder not found")
    path = find_table(directory, "applicants")
    return table_from_frame(read_table(path, ["id"]), path, exclude=("id", "label"))


def load_lender_table(directory: Path) -> tuple[PartyTable, np.ndarray]:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: lender data folder not found")
    path = find_table(directory, "applicants")
    frame = read_table(path, ["id", "label"])
    labels = frame["label"]
    bad = ~labels.isin([0, 1, "0", "1", 0.0, 1.0])
    if bad.any():
        raise DataError(f"{path}: column label: must be 0 or 1, found {labels[bad].iloc[0]!r}")
    table = table_from_frame(frame, path, exclude=("id", "label"))
    return table, labels.astype(float).to_numpy().astype(np.float32)
