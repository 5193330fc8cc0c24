"""The payment holder's guard for online scoring: every answer is a release of one user's embedding to the lender.

It charges the party's lifetime ledger (`home/privacy-ledger.json`, the same one training charges) and adds the
same noise training assumed (`served/S.json`: sigma, clip, neighbouring), drawn from a `NoiseSource` keyed from the
OS, so no seed, bundle or counterparty can replay it.

Accounting is per user, worst case over users, per model version: `home/online-releases.json` counts each user's
online releases under each payment part sha256, and the ledger is charged one release when some user's count for
that version passes the version's previous maximum (another user's first answer adds nothing to the worst case).
Per version, because versions may differ in sigma: a user's lifetime total is the sum of its per-version counts,
each bounded by that version's charged maximum. Both files are written before the answer leaves (write-ahead). A
service holds `home/online-releases.lock` for its lifetime: the counts live in its memory, so two services on one
home would undercount.

When training ran without feature protection (`feature_sigma` null) there is no feature guarantee to charge. The
guard then refuses to be built unless the operator passes `allow_unprotected` (`--allow-unprotected`), which records
the clean embeddings as unprotected in `home/disclosures.json`; and it refuses even then if this party holds a
budget for payment.features@lender, since that budget would promise a protection that does not exist.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedscore.clients.payment.served import ServedVersion
from fedscore.clients.payment.service import ReleaseRefused
from fedscore.shared.atomic import write_json_atomic
from fedscore.shared.party_home import LEDGER_FILE
from fedscore.shared.privacy.secure_random import NoiseSource

GUARANTEE = "payment.features@lender"
COUNTS_FILE = "online-releases.json"
COUNTS_LOCK = "online-releases.lock"
DISCLOSURES_FILE = "disclosures.json"
SIGNALS_DISCLOSURE = "coarse spend signals (spend_level, stability, recent_spend_anomaly) to the lender, exact"
EMBEDDINGS_DISCLOSURE = ("payment embeddings of the served intersection to the lender, without noise (feature "
                         "protection was off in training)")


class GuardRefused(ValueError):
    """The service must not start with this record and these options; the message says what to change."""


def record_disclosure(home: Path, protects: str, what: str) -> dict[str, Any]:
    """Append an unprotected release to `home/disclosures.json` (once per kind; `since` is the first time)."""
    path = Path(home) / DISCLOSURES_FILE
    data: dict[str, list[dict[str, Any]]] = json.loads(path.read_text()) if path.exists() else {"unprotected": []}
    for item in data["unprotected"]:
        if item.get("what") == what and item.get("against") == "lender":
            return item
    item = {"protects": protects, "against": "lender", "what": what,
            "since": datetime.now(UTC).isoformat(timespec="seconds")}
    data["unprotected"].append(item)
    write_json_atomic(path, data)
    return item


def check_not_replayable(served: ServedVersion, training_config: Mapping[str, Any]) -> None:
    """Refuse a bundle whose noise was drawn from a public seed: none of its guarantees hold."""
    privacy = training_config.get("privacy") or {}
    if served.meta.replayable_noise or bool(privacy.get("replayable_noise")):
        raise GuardRefused(f"model version {served.sha256[:12]}... was trained with replayable noise "
                           "(privacy.replayable_noise=true, a test mode): every guarantee it claims is VOID; "
                           "refusing to serve it")


class _LifetimeLock:
    """An exclusive lock (filelock) on `home/online-releases.lock`, held while the service runs."""

    def __init__(self, path: Path) -> None:
        from filelock import FileLock, Timeout

        self.lock: FileLock | None = FileLock(path)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            self.lock = None
            raise GuardRefused(f"{path}: another payment service is serving from this party home") from None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class LedgerGuard:
    """Charges the party's ledger per release (worst case over users) and noises what leaves."""

    def __init__(self, home: Path, served: ServedVersion, budgets: Mapping[str, float], *,
                 allow_unprotected: bool = False, source: NoiseSource | None = None) -> None:
        from fedscore.shared.privacy import Ledger

        meta = served.meta
        self.sigma, self.clip, self.neighbouring = meta.feature_sigma, meta.embedding_clip, meta.feature_neighbouring
        self.served = served
        self.budgets = dict(budgets)
        self._check_protection(home, allow_unprotected)
        self.source = source if source is not None else NoiseSource()
        if self.source.replayable:
            raise GuardRefused("online noise must come from an OS-keyed NoiseSource, not a replayable one")
        self.home = Path(home)
        try:
            self.ledger = Ledger(self.home / LEDGER_FILE, self.budgets, meta.delta, party="payment")
        except ValueError as exc:  # unreadable or another party's ledger, a malformed budget: do not guess
            raise GuardRefused(str(exc)) from None
        self._lock = _LifetimeLock(self.home / COUNTS_LOCK)
        self.counts_file = self.home / COUNTS_FILE
        self.all_counts: dict[str, dict[str, int]] = self._read_counts()
        self.counts = self.all_counts.setdefault(served.sha256, {})
        self.worst = max(self.counts.values(), default=0)
        if self.sigma is None:
            record_disclosure(self.home, "payment.features", EMBEDDINGS_DISCLOSURE)

    def _check_protection(self, home: Path, allow_unprotected: bool) -> None:
        if self.sigma is None:
            if GUARANTEE in self.budgets:
                raise GuardRefused(f"this model version's embeddings carry no noise (feature protection was off in "
                                   f"training) but this party holds a budget for {GUARANTEE}; retrain with "
                                   "privacy.feature_epsilon set")
            if not allow_unprotected:
                raise GuardRefused("this model version's embeddings carry no noise (feature protection was off in "
                                   "training): pass --allow-unprotected to serve them unprotected (recorded in "
                                   f"{Path(home) / DISCLOSURES_FILE}), or retrain with privacy.feature_epsilon set")
        elif GUARANTEE not in self.budgets:
            raise GuardRefused(f"no budget for {GUARANTEE}: pass --budget {GUARANTEE}=EPS")

    def _read_counts(self) -> dict[str, dict[str, int]]:
        if not self.counts_file.exists():
            return {}
        try:
            data = json.loads(self.counts_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise GuardRefused(f"{self.counts_file}: unreadable ({exc}); refusing to guess what was released") from None
        if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("by_model"), dict):
            raise GuardRefused(f"{self.counts_file}: not a per-model release count file (version 1); refusing to "
                               "guess what was released")
        return data["by_model"]

    def before_release(self, user_id: str) -> None:
        """Count the release (and charge the ledger if it raises the worst case), write-ahead; or refuse."""
        from fedscore.shared.privacy import BudgetExceeded, embedding_release

        count = self.counts.get(user_id, 0) + 1
        if self.sigma is not None and count > self.worst:
            record = embedding_release(self.sigma, self.clip, 1, self.neighbouring)
            try:
                self.ledger.charge([record], GUARANTEE, note=f"online scoring of model {self.served.sha256[:12]}: "
                                                             f"a user's {count}th online release")
            except BudgetExceeded as exc:
                raise ReleaseRefused(str(exc)) from exc
        self.counts[user_id] = count
        self.worst = max(self.worst, count)
        write_json_atomic(self.counts_file, {"version": 1, "by_model": self.all_counts})

    def noise(self, embedding: np.ndarray) -> np.ndarray:
        """Clip to the training clip, add N(0, (sigma * clip)^2) per coordinate; clean if unprotected (recorded)."""
        if self.sigma is None:
            return embedding
        from fedscore.shared.privacy import clip_rows

        row = clip_rows(torch.from_numpy(np.asarray(embedding, dtype=np.float32))[None], self.clip)
        return (row + self.source.normal(row.shape, std=self.sigma * self.clip))[0].numpy()

    def close(self) -> None:
        """Let another service use this home (the files stay)."""
        self._lock.release()
