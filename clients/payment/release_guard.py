"""The payment holder's guard for online scoring: every answer is a release of one user's embedding to the lender.

It charges the party's lifetime ledger (`home/privacy-ledger.sqlite`, the same one training charges) and adds the
same noise training assumed (`served/S.json`: sigma, clip, neighbouring), drawn from a `NoiseSource` keyed from the
OS, so no seed, bundle or counterparty can replay it.

Accounting is per user, worst case over users, per model version: every answer is appended to the `releases`
table of the party's ledger (`home/privacy-ledger.sqlite`: model version, user, this user's n-th answer under it),
and the ledger's charges for that version cover a worst case (`online_charged.upto`): an answer whose count would
pass it is charged first (another user's first answer adds nothing to the worst case). Per version, because versions
may differ in sigma: a user's lifetime total is the sum of its per-version counts, each bounded by that version's
charged worst case. The answer row (and any charge it needs) is written in one transaction that is durable before the
answer leaves; concurrent answers share that transaction (group commit, `shared/privacy/ledger_store.py`), so
`before_release` may be called from many threads at once (`thread_safe`).

Charging ahead: composing a guarantee (dp-accounting PLD) takes about a second (one Gaussian composed onto the
remembered rest, whatever the count: shared/privacy/accounting.py), longer than an answer may wait, so a background
thread keeps the charged worst case `ahead` releases above the actual one, `reserve` releases per charge, composing
off the commit path in a worker process; and it composes the NEXT charge as soon as one is recorded, so when the
worst case rises the charge is only a row written. An answer charges inline only if the background has not kept
up, and even then finds its charge composed (the first one is composed in the service process before serving).
What this costs: the ledger may count up to `ahead + reserve - 1` releases more than the worst case actually
answered (an over-count, never an under-count); `reserve=1, ahead=0` charges exactly at each raise (no over-count)
and, with the charge composed beforehand, the raising answer waits only for its row. A service holds
`home/online-releases.lock` for its lifetime: the counts live in its memory, so two services on one home would
undercount. The old `home/online-releases.json` (counts rewritten whole per answer)
is migrated into the ledger on first start and kept as `.json.migrated`.

When training ran without feature protection (`feature_sigma` null) there is no feature guarantee to charge. The
guard then refuses to be built unless the operator passes `allow_unprotected` (`--allow-unprotected`), which records
the clean embeddings as unprotected in `home/disclosures.json`; and it refuses even then if this party holds a
budget for payment.features@lender, since that budget would promise a protection that does not exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedscore.clients.payment.served import ServedVersion
from fedscore.clients.payment.service import ReleaseRefused
from fedscore.shared.atomic import write_json_atomic
from fedscore.shared.party_home import PartyHome
from fedscore.shared.privacy.secure_random import NoiseSource

log = logging.getLogger(__name__)

GUARANTEE = "payment.features@lender"
SIGNALS_DISCLOSURE = "coarse spend signals (spend_level, stability, recent_spend_anomaly) to the lender, exact"
EMBEDDINGS_DISCLOSURE = ("payment embeddings of the served intersection to the lender, without noise (feature "
                         "protection was off in training)")


class GuardRefused(ValueError):
    """The service must not start with this record and these options; the message says what to change."""


def record_disclosure(home: Path, protects: str, what: str) -> dict[str, Any]:
    """Append an unprotected release to `home/disclosures.json` (once per kind; `since` is the first time)."""
    path = PartyHome(home).disclosures
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

    def __init__(self, home: PartyHome) -> None:
        from filelock import FileLock, Timeout

        self.lock: FileLock | None = home.lock(home.ONLINE_RELEASES_LOCK)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            self.lock = None
            raise GuardRefused(f"{home.root / home.ONLINE_RELEASES_LOCK}: another payment service is serving from "
                               "this party home") from None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class LedgerGuard:
    """Charges the party's ledger per release (worst case over users) and noises what leaves."""

    def __init__(self, home: Path, served: ServedVersion, budgets: Mapping[str, float], *,
                 allow_unprotected: bool = False, source: NoiseSource | None = None, reserve: int = 1,
                 ahead: int = 1) -> None:
        from fedscore.shared.privacy import BudgetExceeded, Ledger

        if reserve < 1 or ahead < 0:
            raise GuardRefused(f"reserve must be >= 1 and ahead >= 0, got {reserve} and {ahead}")
        self.reserve, self.ahead = reserve, ahead

        meta = served.meta
        self.sigma, self.clip, self.neighbouring = meta.feature_sigma, meta.embedding_clip, meta.feature_neighbouring
        self.served = served
        self.budgets = dict(budgets)
        self._check_protection(home, allow_unprotected)
        self.source = source if source is not None else NoiseSource()
        if self.source.replayable:
            raise GuardRefused("online noise must come from an OS-keyed NoiseSource, not a replayable one")
        self.home = Path(home)
        from fedscore.shared.privacy.ledger_store import LedgerDamaged, LedgerUnavailable

        try:
            self.ledger = Ledger(PartyHome(self.home).ledger, self.budgets, meta.delta, party="payment")
        except ValueError as exc:  # unreadable or another party's ledger, a malformed budget: do not guess
            raise GuardRefused(str(exc)) from None
        self._lock = _LifetimeLock(PartyHome(self.home))
        try:
            self._store = self.ledger._store
            self._store.ensure_created()
            self._migrate_counts()
            self.model_id, self.counts, charged = self._store.submit(self._load_counts)
        except (LedgerDamaged, LedgerUnavailable, GuardRefused) as exc:
            self._lock.release()
            raise GuardRefused(str(exc)) from None
        self.worst = max(self.counts.values(), default=0)
        self.charged = max(charged, self.worst)  # older ledgers charged exactly at each raise
        self.inline_charges = 0  # answers that had to wait for a charge (the background did not keep up)
        self._noise_lock = threading.Lock()  # the noise source's keystream is not shared between threads
        self._wake = threading.Condition()
        self._closed = False
        self._reserver: threading.Thread | None = None
        self._composer: Any = None
        if self.sigma is not None:
            if self.worst + self.ahead > self.charged:  # before serving: no first answer waits for a composition
                try:
                    self._store.submit(lambda conn: self._charge(conn, self.worst + max(self.ahead, 1)))
                except BudgetExceeded:
                    pass  # nothing can be charged ahead; answers are then charged (or refused) one by one
                except (LedgerDamaged, LedgerUnavailable) as exc:
                    self._lock.release()
                    raise GuardRefused(str(exc)) from None
            from fedscore.shared.privacy.ledger import compose_records

            try:
                self._precompose(self.charged + 1)  # an answer that must charge inline finds its charge composed
            except Exception:  # only speed is lost: the charge composes when it is made
                log.exception("composing the next online charge ahead failed")
            self._composer = _composer()
            self._composer.submit(compose_records, [], meta.delta)  # start it and import now, not at the first need
            self._reserver = threading.Thread(target=self._reserve_loop, name="ledger-reserve", daemon=True)
            self._reserver.start()
        if self.sigma is None:
            record_disclosure(self.home, "payment.features", EMBEDDINGS_DISCLOSURE)

    thread_safe = True  # before_release and noise may be called from many threads at once (group commit)

    def _check_protection(self, home: Path, allow_unprotected: bool) -> None:
        if self.sigma is None:
            if GUARANTEE in self.budgets:
                raise GuardRefused(f"this model version's embeddings carry no noise (feature protection was off in "
                                   f"training) but this party holds a budget for {GUARANTEE}; retrain with "
                                   "privacy.feature_epsilon set")
            if not allow_unprotected:
                raise GuardRefused("this model version's embeddings carry no noise (feature protection was off in "
                                   "training): pass --allow-unprotected to serve them unprotected (recorded in "
                                   f"{PartyHome(home).disclosures}), or retrain with privacy.feature_epsilon set")
        elif GUARANTEE not in self.budgets:
            raise GuardRefused(f"no budget for {GUARANTEE}: pass --budget {GUARANTEE}=EPS")

    def _migrate_counts(self) -> None:
        """Move the old `online-releases.json` (version 1, rewritten whole per answer) into the ledger's releases
        table, once, then keep it renamed `.json.migrated`. A crash between the two leaves the JSON and a
        `migrated:` mark holding its sha256 in the ledger: the next start only renames it."""
        from fedscore.shared.privacy.ledger_store import _retire

        path = PartyHome(self.home).online_releases
        if not path.exists():
            return
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GuardRefused(f"{path}: unreadable ({exc}); refusing to guess what was released. It was not "
                               "changed: restore it from a backup") from None
        if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("by_model"), dict) \
                or not all(isinstance(c, dict) and all(isinstance(n, int) and n >= 0 for n in c.values())
                           for c in data["by_model"].values()):
            raise GuardRefused(f"{path}: not a per-model release count file (version 1); refusing to guess what "
                               "was released")
        mark = f"migrated:{PartyHome.ONLINE_RELEASES}"

        def migrate(conn: sqlite3.Connection) -> None:
            done = conn.execute("SELECT value FROM meta WHERE key = ?", (mark,)).fetchone()
            if done is not None:
                if done[0] != digest:
                    raise GuardRefused(f"{path}: release counts beside a ledger that already migrated other counts "
                                       f"({self._store.path}); refusing to guess which are right")
                return
            for sha, counts in data["by_model"].items():
                model = _model_id(conn, sha)
                conn.executemany("INSERT INTO releases (model, user_id, n, released_at) VALUES (?, ?, ?, NULL)",
                                 [(model, user, n) for user, n in counts.items() if n > 0])
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (mark, digest))

        self._store.submit(migrate)
        _retire(path)

    def _load_counts(self, conn: sqlite3.Connection) -> tuple[int, dict[str, int], int]:
        """This version's id in the ledger, each user's answers so far (max n per user), the charged worst case."""
        model = _model_id(conn, self.served.sha256)
        rows = conn.execute("SELECT user_id, MAX(n) FROM releases WHERE model = ? GROUP BY user_id", (model,))
        counts = dict(rows.fetchall())
        charged = conn.execute("SELECT MAX(upto) FROM online_charged WHERE model = ?", (model,)).fetchone()[0]
        return model, counts, int(charged or 0)

    def before_release(self, user_id: str) -> None:
        """Count the release (and charge the ledger if it passes the charged worst case), durably, before the
        answer leaves; or refuse. Thread-safe: concurrent calls share one commit."""
        self._store.submit(lambda conn: self._record(conn, user_id))

    def _record(self, conn: sqlite3.Connection, user_id: str) -> None:
        """Inside the ledger's write transaction (one writer thread: the counts need no lock of their own). The
        in-memory counts change only after the rows are written; a commit that then fails leaves them one higher
        than the ledger, which over-counts (safe), never under-counts."""
        from fedscore.shared.privacy import BudgetExceeded

        count = self.counts.get(user_id, 0) + 1
        entry = None
        if self.sigma is not None and count > self.charged:
            try:
                entry = self._charge(conn, count)  # the background did not keep up: charge now, the answer waits
            except BudgetExceeded as exc:
                raise ReleaseRefused(str(exc)) from exc
            self.inline_charges += 1
        conn.execute("INSERT INTO releases (model, user_id, n, released_at, entry) VALUES (?, ?, ?, ?, ?)",
                     (self.model_id, user_id, count, time.time(), entry))
        self.counts[user_id] = count
        self.worst = max(self.worst, count)
        if self.sigma is not None and self.worst + self.ahead > self.charged:
            with self._wake:
                self._wake.notify()

    def _charge(self, conn: sqlite3.Connection, upto: int) -> int | None:
        """Charge the releases that take the charged worst case to `upto` (in the writer's transaction)."""
        from fedscore.shared.privacy import embedding_release

        block = upto - self.charged
        record = embedding_release(self.sigma, self.clip, block, self.neighbouring)  # type: ignore[arg-type]
        note = (f"online scoring of model {self.served.sha256[:12]}: worst case {self.charged + 1}"
                f"{f'..{upto}' if block > 1 else ''} online release(s) per user")
        _, entry = self.ledger.charge_in(conn, [record.to_dict()], GUARANTEE, note=note)
        conn.execute("INSERT INTO online_charged (model, upto, entry) VALUES (?, ?, ?)", (self.model_id, upto, entry))
        self.charged = upto
        with self._wake:
            self._wake.notify()  # the background composes the next charge now
        return entry

    def _precompose(self, upto: int) -> None:
        """Compose, in this process, the charge that takes the charged worst case to `upto`, and remember it for
        `charge_in` (before serving: the composing worker may not have started yet)."""
        from fedscore.shared.privacy import embedding_release
        from fedscore.shared.privacy.ledger import _mechanisms, compose_records, remember_composition
        from fedscore.shared.privacy.ledger_store import select_entries

        with self._store.reading() as conn:
            entries = select_entries(conn, GUARANTEE)
        record = embedding_release(self.sigma, self.clip, upto - self.charged,  # type: ignore[arg-type]
                                   self.neighbouring)
        planned = [*_mechanisms(entries), record]
        remember_composition(planned, self.ledger.delta, compose_records([m.to_dict() for m in planned],
                                                                         self.ledger.delta))

    def _reserve_loop(self) -> None:
        """Keep the charged worst case `ahead` above the actual one, composing off the commit path (see the module
        docstring). The composition of the next charge is made as soon as the previous one is recorded, before
        it is needed (`remember_composition`): when the worst case rises, the charge is a row written, and an
        answer that has to charge inline (the background fell behind, or `ahead=0`) finds it composed too. Stops for
        good once the budget refuses: answers past it are then refused inline."""
        from fedscore.shared.privacy import BudgetExceeded, embedding_release
        from fedscore.shared.privacy.ledger import _mechanisms, compose_records, remember_composition
        from fedscore.shared.privacy.ledger_store import select_entries

        block = self.reserve if self.ahead > 0 else 1  # ahead=0: every charge is an answer's own, one release
        composer = self._composer
        composed: tuple[int, int] | None = None  # (charged, target) whose composition is remembered
        while not self._closed:
            try:
                charged = self.charged
                target = charged + block
                if composed != (charged, target):
                    with self._store.reading() as conn:
                        entries = select_entries(conn, GUARANTEE)
                    record = embedding_release(self.sigma, self.clip, block,  # type: ignore[arg-type]
                                               self.neighbouring)
                    planned = [*_mechanisms(entries), record]
                    result = composer.submit(compose_records, [m.to_dict() for m in planned],
                                             self.ledger.delta).result()
                    remember_composition(planned, self.ledger.delta, result)  # the charge below finds it
                    composed = (charged, target)
                with self._wake:
                    while not self._closed and self.worst + self.ahead <= self.charged == charged:
                        self._wake.wait(1.0)
                    if self._closed:
                        return
                if self.charged != charged:
                    continue  # charged inline meanwhile: compose the next one
                self._store.submit(lambda conn, upto=target: None if upto <= self.charged else self._charge(conn, upto))
            except BudgetExceeded:
                if block > 1:
                    block = 1  # near the budget: one release at a time
                    continue
                log.info("online charging ahead stopped: the budget for %s is spent", GUARANTEE)
                return
            except Exception:  # the next answer charges inline and reports a real problem
                if self._closed:  # closed mid-composition: its worker pool is shut down, nothing to retry
                    return
                log.exception("charging ahead failed; answers will charge inline")
                time.sleep(1.0)

    def noise(self, embedding: np.ndarray) -> np.ndarray:
        """Clip to the training clip, add N(0, (sigma * clip)^2) per coordinate; clean if unprotected (recorded)."""
        if self.sigma is None:
            return embedding
        from fedscore.shared.privacy import clip_rows

        row = clip_rows(torch.from_numpy(np.asarray(embedding, dtype=np.float32))[None], self.clip)
        with self._noise_lock:
            noise = self.source.normal(row.shape, std=self.sigma * self.clip)
        return (row + noise)[0].numpy()

    def close(self) -> None:
        """Let another service use this home (the files stay)."""
        self._closed = True
        with self._wake:
            self._wake.notify_all()
        if self._composer is not None:
            self._composer.shutdown(wait=False, cancel_futures=True)
        self._lock.release()


def _model_id(conn: sqlite3.Connection, sha256: str) -> int:
    """The ledger's id for a model version (payment part sha256), added on first use."""
    row = conn.execute("SELECT id FROM models WHERE sha256 = ?", (sha256,)).fetchone()
    if row is None:
        return int(conn.execute("INSERT INTO models (sha256) VALUES (?)", (sha256,)).lastrowid or 0)
    return int(row[0])


def release_counts(home: Path) -> dict[str, dict[str, int]]:
    """Per model version (payment part sha256), each user's online answers recorded in the party's ledger: what
    `online-releases.json` used to hold (auditors, tests)."""
    from fedscore.shared.privacy.ledger_store import open_store

    store = open_store(PartyHome(home).ledger, "payment")
    if not store.ready():
        return {}
    with store.reading() as conn:
        rows = conn.execute("SELECT m.sha256, r.user_id, MAX(r.n) FROM releases r JOIN models m ON m.id = r.model "
                            "GROUP BY r.model, r.user_id").fetchall()
    out: dict[str, dict[str, int]] = {}
    for sha, user, n in rows:
        out.setdefault(sha, {})[user] = n
    return out


def _composer() -> Any:
    """One worker process that composes guarantees for the background charges: a PLD composition holds the GIL
    for up to a few seconds, which would stall every answer of a serving process. Spawned, so it inherits no
    threads. Not niced below the service: a charge now costs about a second of CPU per raise of the worst case
    (shared/privacy/accounting.py), and at nice 19 on a busy machine it was starved for longer than a raise takes
    (answers then composed inline, holding the ledger's writer for seconds). It exits when the service dies, even
    by SIGKILL (`exit_with_parent`)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from fedscore.shared.waiting import exit_with_parent

    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),))
