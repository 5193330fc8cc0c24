"""Loading the payment holder's data: raw transactions (featurised here, on its side) or a ready feature table."""

from __future__ import annotations

from pathlib import Path

from shared.party_data import PartyTable, table_from_frame
from shared.tables import DataError, find_table, read_table


def load_payment_table(directory: Path) -> PartyTable:
    """DIR/payment/transactions.* is featurised by the payment party; DIR/payment/features.* is used as it is."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: payment data folder not found")
    try:
        path = find_table(directory, "transactions")
    except DataError:
        path = None
    if path is not None:
        from clients.payment.features import TRANSACTION_COLUMNS, features_from_transactions

        tx = read_table(path, TRANSACTION_COLUMNS)
        return table_from_frame(features_from_transactions(tx, source=str(path)), path)
    try:
        path = find_table(directory, "features")
    except DataError as exc:
        raise DataError(f"{directory}: no transactions.parquet/.csv or features.parquet/.csv") from exc
    return table_from_frame(read_table(path, ["id"]), path)
