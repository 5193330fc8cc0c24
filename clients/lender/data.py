"""Loading the lender's applicants: features plus the default label, which never leaves the lender.

Training needs DIR/lender/schema.toml (public bounds, levels and reference values of each column); scoring reads the
applicants by column name and uses the schema only for its declared impute values, if there is one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedscore.shared.data.party_data import PartyTable, table_from_frame, table_with_schema
from fedscore.shared.data.schema import SCHEMA_FILE, find_schema, impute_frame, load_schema
from fedscore.shared.data.tables import DataError, find_table, read_table


def load_applicants(directory: Path) -> PartyTable:
    """Applicants to score: features only; a label column, if present, is ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: lender data folder not found")
    path = find_table(directory, "applicants")
    frame = read_table(path, ["id"])
    schema = find_schema(directory)
    if schema is not None:
        impute_frame(frame, schema)
    return table_from_frame(frame, path, exclude=("id", "label"))


def load_lender_table(directory: Path) -> tuple[PartyTable, np.ndarray]:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: lender data folder not found")
    schema = load_schema(directory)
    if schema.label is None:
        raise DataError(f"{directory / SCHEMA_FILE}: column label: the lender's schema must declare its label "
                        '(label = { name = "label", levels = [0, 1] })')
    path = find_table(directory, "applicants")
    frame = read_table(path, ["id", "label"])
    labels = frame["label"]
    bad = ~labels.isin([0, 1, "0", "1", 0.0, 1.0])
    if bad.any():
        raise DataError(f"{path}: column label: must be 0 or 1, found {labels[bad].iloc[0]!r}")
    table = table_with_schema(frame, path, schema, directory / SCHEMA_FILE, exclude=("id", "label"))
    return table, labels.astype(float).to_numpy().astype(np.float32)
