"""The centralized reference: all columns in one place, no privacy. The upper bound a federation aims at.

The best of logistic regression, GBDT and an MLP on validation (shared/model/reference_models.py).

This is the local operator's evaluation harness, not part of the protocol: it reads both parties' folders, which
only someone holding both (a demo, a backtest) can do. It uses the same aligned users and the same keyed split as
the federation, and the same preprocessing (each party's schema-derived scaler; clipped raw values for the GBDT), so
the numbers compare like for like on identical test users.

Where the references live (never in RUN_DIR's top-level files, which hold only what the lender shares with the
coordinator, nor in model/): the centralized reference in RUN_DIR/parties/CENTRALIZED_FILE (simulation only: it
needs both parties' data), the lender-only baseline, training loss and default rate in the lender's own evaluation
file (RUN_DIR/parties/lender/evaluation.json, clients/lender/party.py). `local_evaluation` reads both, for the CLI's
table and `fedscore experiment` in local runs, where one operator holds everything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedscore.clients.lender.data import load_lender_table
from fedscore.clients.payment.data import load_payment_table
from fedscore.shared.config import FedConfig
from fedscore.shared.data.party_data import PartyTable
from fedscore.shared.model.parts import configure_torch
from fedscore.shared.model.preprocessing import Scaler
from fedscore.shared.model.reference_models import best_reference
from fedscore.shared.protocol.splits import assign_splits, keyed_tokens
from fedscore.shared.run_folder import RunFolder


def _preprocessed(table: PartyTable) -> tuple[np.ndarray, np.ndarray]:
    """(scaled features, clipped raw values), both from the party's declared schema, as in training."""
    assert table.schema is not None  # the loaders refuse a training table without one
    scaler = Scaler.from_schema(table.schema)
    return scaler.transform(table.values), scaler.clip(table.values)


@dataclass(frozen=True)
class AlignedTables:
    """Both parties' tables with the users they share, aligned and split exactly as the federation does (keyed
    tokens, keyed split): what every operator-side reference is fitted on."""

    lender: PartyTable
    payment: PartyTable
    labels: np.ndarray  # the aligned users' labels
    lender_rows: np.ndarray
    payment_rows: np.ndarray
    split: np.ndarray


def aligned_tables(data_dir: Path, config: FedConfig, secret: bytes) -> AlignedTables:
    payment = load_payment_table(Path(data_dir) / "payment")
    lender, labels = load_lender_table(Path(data_dir) / "lender")
    common, l_rows, p_rows = np.intersect1d(keyed_tokens(lender.ids, secret), keyed_tokens(payment.ids, secret),
                                            return_indices=True)
    split = assign_splits(common, config.split.test_fraction, config.split.val_fraction, secret)
    return AlignedTables(lender, payment, np.asarray(labels)[l_rows], l_rows, p_rows, np.asarray(split))


# The centralized MLP candidate's hidden layers: the width the payment part had before it became linear (issue 18,
# sixth session). The payment part is sized for one round of DP-SGD; a reference on pooled clean data is not.
CENTRALIZED_MLP_HIDDEN = (128, 64)


def centralized_baselines(data_dir, config: FedConfig, secret: bytes) -> dict[str, dict[str, float]]:
    configure_torch()
    aligned = aligned_tables(data_dir, config, secret)
    l_rows, p_rows, split = aligned.lender_rows, aligned.payment_rows, aligned.split
    (l_scaled, l_raw), (p_scaled, p_raw) = _preprocessed(aligned.lender), _preprocessed(aligned.payment)
    scaled = np.hstack([l_scaled[l_rows], p_scaled[p_rows]])
    raw = np.hstack([l_raw[l_rows], p_raw[p_rows]])
    hidden = list(CENTRALIZED_MLP_HIDDEN)
    best = best_reference(scaled, raw, aligned.labels, split, hidden=hidden, epochs=config.baselines.epochs,
                          lr=config.training.lr, batch_size=config.training.batch_size, seed=config.seed)
    return {"centralized": best}


CENTRALIZED_FILE = "centralized.json"  # in RUN_DIR/parties/: the local operator's, beside both parties' folders
CENTRALIZED_NOTE = ("the local operator's centralized reference: both parties' data pooled, clean labels, no privacy; "
                    "a simulation-only figure that no deployment can compute")


def write_centralized(run_dir: Path, reference: dict[str, Any]) -> Path:
    """The centralized reference, beside the parties' own folders (RUN_DIR/parties/), never at RUN_DIR's top level."""
    from fedscore.shared.atomic import write_json_atomic

    path = RunFolder(run_dir).parties / CENTRALIZED_FILE
    write_json_atomic(path, {"note": CENTRALIZED_NOTE, **reference})
    return path


def local_evaluation(run_dir: Path) -> dict[str, Any]:
    """What one operator holding both parties' folders can show beside the run's shared metrics: `lender_only`,
    `default_rate` and the per-round `train_loss` from the lender's own evaluation, `centralized` from the operator's
    reference; each key absent when its file or figure is (a deployment's coordinator has neither). The files are
    named in the error when they are not JSON."""
    from fedscore.clients.lender.party import EVALUATION_FILE

    out: dict[str, Any] = {}
    folder = RunFolder(run_dir)
    lender = folder.party_state("lender") / EVALUATION_FILE
    centralized = folder.parties / CENTRALIZED_FILE
    for path in (lender, centralized):
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if path == centralized:
            out["centralized"] = data.get("centralized")
            continue
        for key in ("lender_only", "default_rate"):
            if data.get(key) is not None:
                out[key] = data[key]
        out["train_loss"] = [r.get("train_loss") for r in data.get("rounds", [])]
    return out
