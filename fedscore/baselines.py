"""The centralized reference: all columns in one place, no privacy. The upper bound a federation aims at.

The best of logistic regression, GBDT and an MLP on validation (shared/model/reference_models.py).

This is the local operator's evaluation harness, not part of the protocol: it reads both parties' folders, which
only someone holding both (a demo, a backtest) can do. It uses the same aligned users and the same keyed split as
the federation, and the same preprocessing (each party's schema-derived scaler; clipped raw values for the GBDT), so
the numbers compare like for like on identical test users. Its figures go to metrics.json only, never into model/.
"""

from __future__ import annotations

import numpy as np

from fedscore.clients.lender.data import load_lender_table
from fedscore.clients.payment.data import load_payment_table
from fedscore.shared.config import FedConfig
from fedscore.shared.data.party_data import PartyTable
from fedscore.shared.model.parts import configure_torch
from fedscore.shared.model.preprocessing import Scaler
from fedscore.shared.model.reference_models import best_reference
from fedscore.shared.protocol.splits import assign_splits, keyed_tokens


def _preprocessed(table: PartyTable) -> tuple[np.ndarray, np.ndarray]:
    """(scaled features, clipped raw values), both from the party's declared schema, as in training."""
    assert table.schema is not None  # the loaders refuse a training table without one
    scaler = Scaler.from_schema(table.schema)
    return scaler.transform(table.values), scaler.clip(table.values)


def centralized_baselines(data_dir, config: FedConfig, secret: bytes) -> dict[str, dict[str, float]]:
    configure_torch()
    payment = load_payment_table(data_dir / "payment")
    lender, labels = load_lender_table(data_dir / "lender")
    p_tokens = keyed_tokens(payment.ids, secret)
    l_tokens = keyed_tokens(lender.ids, secret)
    common, l_rows, p_rows = np.intersect1d(l_tokens, p_tokens, return_indices=True)
    split = assign_splits(common, config.split.test_fraction, config.split.val_fraction, secret)
    (l_scaled, l_raw), (p_scaled, p_raw) = _preprocessed(lender), _preprocessed(payment)
    scaled = np.hstack([l_scaled[l_rows], p_scaled[p_rows]])
    raw = np.hstack([l_raw[l_rows], p_raw[p_rows]])
    hidden = [*config.model.payment_hidden, *config.model.lender_hidden]
    best = best_reference(scaled, raw, labels[l_rows], split, hidden=hidden, epochs=config.baselines.epochs,
                          lr=config.training.lr, batch_size=config.training.batch_size, seed=config.seed)
    return {"centralized": best}
