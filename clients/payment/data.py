"""Loading the payment holder's data: raw transactions (featurised here, on its side) or a ready feature table.

Either way the table comes with its public schema (shared/data/schema.py), the only source of the preprocessing
constants: DIR/payment/schema.toml, which a features table must have; for featurised transactions the built-in
schema of the derived features (clients/payment/features.py FEATURE_BOUNDS) unless a schema.toml replaces it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedscore.shared.data.party_data import PartyTable, table_with_schema
from fedscore.shared.data.schema import SCHEMA_FILE, find_schema, load_schema
from fedscore.shared.data.tables import DataError, find_table, read_table


def featurise(path: Path) -> pd.DataFrame:
    """The features of the transaction log at `path`: out of core (DuckDB over the Parquet file or directory of
    parts) when its columns have the expected types, else read whole and featurised in memory (CSV, timestamps as
    text or numbers), with the same result either way."""
    from fedscore.clients.payment.features import TRANSACTION_COLUMNS, features_from_transactions

    if path.suffix == ".parquet":
        from fedscore.clients.payment.featurise_parquet import features_from_parquet, fits_out_of_core

        if fits_out_of_core(path):
            return features_from_parquet(path, source=str(path))
    return features_from_transactions(read_table(path, TRANSACTION_COLUMNS), source=str(path))


def load_payment_table(directory: Path) -> PartyTable:
    """DIR/payment/transactions.* (a file, or a Parquet directory of parts) is featurised by the payment party;
    DIR/payment/features.* is used as it is."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: payment data folder not found")
    try:
        path = find_table(directory, "transactions")
    except DataError:
        path = None
    if path is not None:
        from fedscore.clients.payment.features import feature_schema

        declared = find_schema(directory)
        schema, source = (declared, directory / SCHEMA_FILE) if declared else (feature_schema(), "built-in schema "
                                                                               "of clients/payment/features.py")
        return table_with_schema(featurise(path), path, schema, source)
    try:
        path = find_table(directory, "features")
    except DataError as exc:
        raise DataError(f"{directory}: no transactions.parquet/.csv or features.parquet/.csv") from exc
    schema = load_schema(directory)
    return table_with_schema(read_table(path, ["id"]), path, schema, directory / SCHEMA_FILE)
