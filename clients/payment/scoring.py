"""The payment holder at scoring time: its data -> the features the model was trained on -> embeddings + signals.

Used by both batch scoring and the gRPC service, so the two cannot compute a user's embedding differently. The
features are computed once for all users (featurising transactions is vectorised over the whole table, and the
reference time is the table's latest timestamp, so one user's features never depend on when they are asked for).

Two checks make a silently wrong embedding impossible: if the model was trained on featurised transactions, the
feature definition recorded in the manifest must equal this code's `FEATURE_DEFINITION`; and the columns are fed to
the graph in the manifest's order, by name, never by position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedscore.clients.payment.data import load_payment_table
from fedscore.shared.data.party_data import PartyTable
from fedscore.shared.model.manifest import EMBEDDING, PAYMENT_INPUT
from fedscore.shared.scoring.bundle import BundleError, ScoringBundle, ordered_matrix, ort_session
from fedscore.shared.scoring.payment_signals import PaymentSignals
from fedscore.shared.scoring.scorecard import CoarseSignalRules, coarse_payment_signals

# rows per graph call: bounds memory on very large tables, and keeps the hidden layers' activations (2,048 x 128
# floats = 1 MiB) in a core's L2 cache: 65,536 rows per call took ~1.6x the CPU time (BENCHMARKS.md, "Batch scoring
# (item 8)"); per-call overhead is ~20 us
CHUNK_ROWS = 2_048


def check_feature_definition(bundle: ScoringBundle) -> None:
    """Refuse to score if the payment features would be computed differently from how the model was trained."""
    from fedscore.clients.payment.features import FEATURE_DEFINITION

    trained = bundle.manifest.payment_feature_definition
    if trained is None:
        return  # trained on a ready feature table: the columns are checked by name instead
    current = json.loads(json.dumps(FEATURE_DEFINITION))  # tuples -> lists, as the manifest stores them
    if trained != current:
        changed = sorted(k for k in set(trained) | set(current) if trained.get(k) != current.get(k))
        raise BundleError(f"{bundle.directory / 'manifest.json'}: the payment feature definition changed since "
                          f"training (differs in {changed}); score with the fedscore version the model was trained "
                          "with, or retrain")


def signals_from_table(table: PartyTable, rules: CoarseSignalRules | None = None) -> PaymentSignals:
    """Coarse signals per row of the table, or neutral ones if the table lacks the columns they are computed from."""
    rules = rules or CoarseSignalRules()
    needed = [rules.spend_column, rules.cv_column, rules.recent_column]
    if not set(needed) <= set(table.columns):
        return PaymentSignals.neutral(len(table.ids))
    frame = pd.DataFrame(table.values[:, [table.columns.index(c) for c in needed]], columns=needed)
    frame.insert(0, rules.id_column, table.ids)
    signals = coarse_payment_signals(frame, rules)
    return PaymentSignals(signals["spend_level"].astype(str).to_numpy(dtype=object),
                          signals["stability"].astype(str).to_numpy(dtype=object),
                          signals["recent_spend_anomaly"].to_numpy(dtype=bool))


class PaymentPart:
    """The payment ONNX part: raw payment features (manifest order) -> embeddings, with onnxruntime only."""

    def __init__(self, bundle: ScoringBundle, threads: int = 1) -> None:
        self.session = ort_session(bundle.part_path("payment"), threads)
        self.width = len(bundle.payment_features)
        self.embedding_dim = bundle.embedding_dim

    def embed(self, raw: np.ndarray) -> np.ndarray:
        raw = np.ascontiguousarray(raw, dtype=np.float32)
        if raw.ndim != 2 or raw.shape[1] != self.width:
            raise ValueError(f"payment features of shape {raw.shape}, the payment part takes [N, {self.width}]")
        out = np.empty((len(raw), self.embedding_dim), dtype=np.float32)
        for start in range(0, len(raw), CHUNK_ROWS):
            chunk = raw[start:start + CHUNK_ROWS]
            out[start:start + len(chunk)] = self.session.run([EMBEDDING], {PAYMENT_INPUT: chunk})[0]
        return out


@dataclass
class PaymentUsers:
    """Every payment user's embedding and coarse signals, computed once; looked up by id."""

    ids: list[str]
    embeddings: np.ndarray  # float32 [M, d]
    signals: PaymentSignals
    source: str
    _index: pd.Index = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = pd.Index(self.ids)

    def rows_for(self, ids: list[str] | np.ndarray) -> np.ndarray:
        """Row of each id in this table, -1 where the payment holder has no such user."""
        return self._index.get_indexer(pd.Index(np.asarray(ids, dtype=object)))

    def row(self, user_id: str) -> int:
        """Row of one id, -1 if unknown (a dict-like lookup, for the online service)."""
        try:
            found = self._index.get_loc(user_id)
        except KeyError:
            return -1
        return int(found) if isinstance(found, int | np.integer) else -1


def load_payment_users(bundle: ScoringBundle, data_dir: Path, threads: int = 1) -> PaymentUsers:
    """DIR/payment featurised (or read), checked against the model, embedded: what the payment side serves."""
    check_feature_definition(bundle)
    table = load_payment_table(Path(data_dir) / "payment")
    raw = ordered_matrix(table, bundle.payment_features, "payment")
    embeddings = PaymentPart(bundle, threads).embed(raw)
    return PaymentUsers(ids=table.ids, embeddings=embeddings, signals=signals_from_table(table), source=table.source)
