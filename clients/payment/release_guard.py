"""The payment holder's guard for online scoring: every answer is a release of one user's embedding to the lender.

It goes through the same ledger (the party's own state directory, its own budget) and the same noise as training.
Accounting is per user, worst case over users: the ledger is charged when some user's count of online releases
passes the previous maximum (another user's first query adds nothing to the worst case). Training already released
each aligned user `rounds` times; those records are in the ledger, so the composition covers both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from clients.base import LEDGER_FILE
from clients.payment.service import ReleaseRefused
from shared.atomic import write_json_atomic
from shared.config import PrivacyConfig

GUARANTEE = "payment.features@lender"


class LedgerGuard:
    def __init__(self, state_dir: Path, privacy: PrivacyConfig, budgets: dict[str, float],
                 sigma: float | None) -> None:
        from shared.privacy import Ledger

        self.privacy = privacy
        self.sigma = sigma
        self.budgets = budgets
        self.ledger = Ledger(state_dir / LEDGER_FILE, budgets, privacy.delta, party="payment")
        self.counts_file = state_dir / "online-releases.json"
        self.counts: dict[str, int] = (json.loads(self.counts_file.read_text())
                                       if self.counts_file.exists() else {})
        # noise for live answers must not be reproducible by anyone: a CSPRNG keyed from the OS
        from shared.privacy import NoiseSource

        self.source = NoiseSource()

    @classmethod
    def from_run(cls, state_dir: Path, privacy: PrivacyConfig, budgets: dict[str, float]) -> LedgerGuard:
        """Sigma as calibrated at training time (the payment party's state), so online answers look like what the
        lender's model was trained on."""
        state = torch.load(state_dir / "state.pt", weights_only=True)
        sigma = state.get("feature_sigma")
        return cls(state_dir, privacy, budgets, None if sigma is None else float(sigma))

    def before_release(self, user_id: str) -> None:
        if self.sigma is None:
            if GUARANTEE in self.budgets:
                raise ReleaseRefused("embeddings would leave without noise (feature protection was off in "
                                     f"training), but this payment holder holds a budget for {GUARANTEE}")
            return
        from shared.privacy import BudgetExceeded, embedding_release

        count = self.counts.get(user_id, 0) + 1
        if count > max(self.counts.values(), default=0):
            record = embedding_release(self.sigma, self.privacy.embedding_clip, 1, self.privacy.feature_neighbouring)
            try:
                self.ledger.charge([record], GUARANTEE, note=f"online scoring: a user's {count}th online release")
            except BudgetExceeded as exc:
                raise ReleaseRefused(str(exc)) from exc
        self.counts[user_id] = count
        write_json_atomic(self.counts_file, self.counts)

    def noise(self, embedding: np.ndarray) -> np.ndarray:
        if self.sigma is None:
            return embedding
        from shared.privacy import gaussian_release

        row = torch.from_numpy(np.asarray(embedding, dtype=np.float32))[None]
        return gaussian_release(row, self.privacy.embedding_clip, self.sigma, self.source)[0].numpy()
