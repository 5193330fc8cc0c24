"""The storage under a party's lifetime ledger: one SQLite file in WAL mode, append-only, with group commit.

Why SQLite and not a JSON file rewritten whole: the online service records every answer, and rewriting (and
fsyncing) a file that grows with every applicant ever served costs more per answer the longer the service lives
(issue 20: 108 KB rewritten per answer after 7,000 answers, 361 ms p50 at 200 requests per second). An append costs
the same on day one and after a million answers.

What is stored (`privacy-ledger.sqlite` in the party home):
  meta      key/value: schema version, the party the ledger belongs to, what was migrated from where
  entries   one row per charge (the old JSON entry's fields; `mechanisms` is the records' JSON)
  models    the payment part sha256 of each model version answered online
  releases  one row per online answer: model, user, this user's n-th answer under that model, time, and the ledger
            entry it made when it raised the worst case past what was charged (else NULL)
  online_charged  per model version, the worst case per user the ledger's charges cover (`upto`), and the entry
            that raised it (the online guard charges ahead of need: clients/payment/release_guard.py)
Every table refuses UPDATE and DELETE (triggers): nothing ever leaves the ledger.

Durability (what a returned `submit` guarantees): the transaction is committed with `synchronous=FULL`, i.e. the
WAL is fsynced before `submit` returns, so a charge or answer recorded before a release leaves survives a SIGKILL of
the process (the data is already in the OS), a kernel crash and a power loss (as far as the disk honours fsync).
`synchronous=NORMAL` (opt-in: FEDSCORE_LEDGER_SYNC=normal) survives SIGKILL but not a power loss; by default we pay
the fsync and share it instead: all requests that arrive while one commit is in flight are written by the next
transaction together (group commit), so under load one fsync serves many answers, and no caller returns before
the fsync that covers it.

Several processes may write one ledger (a training run and a live service): SQLite's write lock
(`BEGIN IMMEDIATE`, waited on up to `BUSY_TIMEOUT_S`) serialises their transactions, and each check-and-charge reads
the ledger inside its own write transaction, so two writers can never both spend the last of a budget.

A damaged file (not a database, failed `quick_check`, another party's, an unknown version, or an empty file where a
ledger was) is refused with `LedgerDamaged` naming the file; it is never reset or recreated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # the JSON ledger was version 1
LEGACY_VERSION = 1
BUSY_TIMEOUT_S = 60.0
MAX_BATCH = 4096  # operations per group commit
MIGRATED_SUFFIX = ".migrated"

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    guarantee TEXT NOT NULL,
    mechanisms TEXT NOT NULL,
    epsilon_after REAL NOT NULL,
    accountant TEXT NOT NULL,
    delta REAL NOT NULL,
    recorded_at TEXT NOT NULL,
    run TEXT NOT NULL DEFAULT '',
    step TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX entries_guarantee ON entries (guarantee);
CREATE TABLE models (id INTEGER PRIMARY KEY AUTOINCREMENT, sha256 TEXT NOT NULL UNIQUE);
CREATE TABLE releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model INTEGER NOT NULL REFERENCES models (id),
    user_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    released_at REAL,
    entry INTEGER REFERENCES entries (id)
);
CREATE TABLE online_charged (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model INTEGER NOT NULL REFERENCES models (id),
    upto INTEGER NOT NULL,
    entry INTEGER NOT NULL REFERENCES entries (id)
);
""" + "".join(f"""
CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} BEGIN
    SELECT RAISE(ABORT, 'the privacy ledger is append-only: {table} rows are never changed'); END;
CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} BEGIN
    SELECT RAISE(ABORT, 'the privacy ledger is append-only: {table} rows are never removed'); END;
""" for table in ("meta", "entries", "models", "releases", "online_charged"))


class LedgerDamaged(ValueError):
    """The ledger file cannot be trusted (unreadable, corrupt, another party's, unknown version); never reset.
    The message names the file and says what to do."""


class LedgerUnavailable(OSError):
    """The ledger could not be written (disk full, locked for longer than the timeout); nothing was released."""


def ledger_db_path(path: Path) -> Path:
    """Where the ledger lives: a `.json` name (the old format's) maps to the `.sqlite` file beside it, so callers
    that still name `privacy-ledger.json` get the same ledger."""
    path = Path(path)
    return path.with_suffix(".sqlite") if path.suffix == ".json" else path


def legacy_json_path(path: Path) -> Path:
    """The JSON ledger (format version 1) the SQLite ledger at `path` is migrated from."""
    return ledger_db_path(path).with_suffix(".json")


def ledger_exists(path: Path) -> bool:
    """Whether a party has a ledger here, in either format."""
    return ledger_db_path(path).exists() or legacy_json_path(path).exists()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _retire(path: Path) -> Path:
    """Rename a migrated file to `<name>.migrated` (or `.migrated.N` if that exists): kept, never deleted."""
    target = path.with_name(path.name + MIGRATED_SUFFIX)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{MIGRATED_SUFFIX}.{n}")
        n += 1
    os.rename(path, target)
    _fsync_dir(path.parent)
    return target


def read_legacy_entries(path: Path, party: str) -> list[dict[str, Any]]:
    """A version-1 JSON ledger's entries, after checking it is readable, of this version and this party's."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerDamaged(f"privacy ledger {path} is damaged ({exc}); refusing to guess what was spent. It was not "
                            "changed: restore it from a backup") from None
    if not isinstance(data, dict) or data.get("version") != LEGACY_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise LedgerDamaged(f"privacy ledger {path}: unknown version {version!r}")
    if data.get("party") != party:
        raise LedgerDamaged(f"privacy ledger {path} belongs to {data.get('party')!r}, not {party!r}")
    entries = data.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "guarantee" in e and "mechanisms" in e
                                                for e in entries):
        raise LedgerDamaged(f"privacy ledger {path}: 'entries' is not a list of ledger entries")
    return entries


def entry_row(entry: dict[str, Any]) -> tuple[Any, ...]:
    return (entry["guarantee"], json.dumps(entry["mechanisms"], allow_nan=False), float(entry["epsilon_after"]),
            str(entry.get("accountant", "")), float(entry.get("delta", 0.0)), str(entry.get("recorded_at", "")),
            str(entry.get("run", "")), str(entry.get("step", "")), str(entry.get("note", "")))


INSERT_ENTRY = ("INSERT INTO entries (guarantee, mechanisms, epsilon_after, accountant, delta, recorded_at, run, step, "
                "note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


def entry_dict(row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
    """An `entries` row in the old JSON entry's form (`step` only when set)."""
    _, guarantee, mechanisms, epsilon_after, accountant, delta, recorded_at, run, step, note = row
    entry = {"guarantee": guarantee, "mechanisms": json.loads(mechanisms), "epsilon_after": epsilon_after,
             "accountant": accountant, "delta": delta, "recorded_at": recorded_at, "run": run, "note": note}
    if step:
        entry["step"] = step
    return entry


ENTRY_COLUMNS = "id, guarantee, mechanisms, epsilon_after, accountant, delta, recorded_at, run, step, note"


def synchronous() -> str:
    """FULL (default): every commit fsyncs the WAL. NORMAL (FEDSCORE_LEDGER_SYNC=normal): commits reach the OS but
    are fsynced only at checkpoints, which survives a SIGKILL of the process but not a power loss or kernel crash
    (the last answers' records could be lost after they left): for machines whose fsync is too slow, knowingly."""
    value = os.environ.get("FEDSCORE_LEDGER_SYNC", "full").strip().upper()
    if value not in ("FULL", "NORMAL"):
        raise LedgerUnavailable(f"FEDSCORE_LEDGER_SYNC must be 'full' or 'normal', got {value.lower()!r}")
    return value


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA synchronous={synchronous()}")
    return conn


def _create(path: Path, party: str, legacy: list[dict[str, Any]] | None = None,
            migrated_from: tuple[str, str] | None = None) -> None:
    """Write a complete new ledger beside `path` and rename it into place: a crash leaves no ledger or a whole one."""
    tmp = path.with_name(f".{path.name}.creating")
    for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
        leftover.unlink(missing_ok=True)  # a creation that crashed; the source of truth is still the old file
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript("BEGIN;" + _SCHEMA)  # executescript commits what is pending first, so BEGIN goes inside
        meta = {"version": str(SCHEMA_VERSION), "party": party, "created_at": _now_iso()}
        if migrated_from is not None:
            meta[f"migrated:{migrated_from[0]}"] = migrated_from[1]
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
        conn.executemany(INSERT_ENTRY, [entry_row(e) for e in legacy or []])
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: every later connection uses the WAL
    finally:
        conn.close()
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.rename(tmp, path)
    _fsync_dir(path.parent)


def _now_iso() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


class LedgerStore:
    """One ledger file, opened once per process (see `open_store`): checked reads and group-committed writes."""

    def __init__(self, path: Path, party: str) -> None:
        self.path = ledger_db_path(path)
        self.party = party
        self.pid = os.getpid()
        self._local = threading.local()
        self._cond = threading.Condition()
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], Future[Any]]] = []
        self._writer: threading.Thread | None = None
        self._create_lock = threading.RLock()
        self.commits = 0  # transactions committed by this process (group commit: <= operations)
        self.operations = 0
        self._checked = False  # the file was checked (once per process) or created by this store
        self._signature: tuple[int, int, int] | None = None  # (inode, size, mtime) when last checked
        self.ready()

    def ready(self) -> bool:
        """Check (and migrate) the ledger the first time it is seen; whether it exists. LedgerDamaged if the file
        cannot be trusted, or if a ledger this store saw has disappeared (never silently restarted from zero)."""
        with self._create_lock:
            if self.path.exists() or legacy_json_path(self.path).exists():
                if not self._checked:
                    self._open_existing()
                    self._checked = True
                elif self._signature != self._stat():  # replaced or rewritten behind our back (or checkpointed)
                    self.check(thorough=False)
                return True
            if self._checked:
                raise LedgerDamaged(f"privacy ledger {self.path} disappeared while in use; refusing to start a new "
                                    "one from zero. Restore it from a backup")
            return False

    # -- opening ---------------------------------------------------------------------------------------------------
    def _open_existing(self) -> None:
        """Finish or run a migration, then check the file; LedgerDamaged if it cannot be trusted."""
        legacy = legacy_json_path(self.path)
        if not self.path.exists():
            entries = read_legacy_entries(legacy, self.party)
            _create(self.path, self.party, entries, (legacy.name, _sha256(legacy)))
            log.info("privacy ledger %s migrated to %s (%d entries)", legacy, self.path, len(entries))
        self.check()
        if legacy.exists():
            meta = dict(self.reader().execute("SELECT key, value FROM meta").fetchall())
            recorded = meta.get(f"migrated:{legacy.name}")
            if recorded is None or recorded != _sha256(legacy):
                raise LedgerDamaged(f"two privacy ledgers for {self.party!r}: {self.path} and {legacy}, and the "
                                    f"second was not migrated into the first; refusing to guess which holds what "
                                    f"was spent. Move the one that is not the party's ledger away")
            _retire(legacy)  # a migration that crashed before renaming the old file

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def check(self, thorough: bool = True) -> None:
        """The file is a ledger of this schema, this party's, and (thorough: on first open in a process) SQLite's
        quick_check passes. Later opens in the same process re-read the header and meta only when the file changed
        (quick_check reads every page: too slow to repeat for a ledger of a million answers)."""
        signature = self._stat()
        if self.path.stat().st_size == 0:
            raise LedgerDamaged(f"privacy ledger {self.path} is empty (truncated?); refusing to start from zero. "
                                "It was not changed: restore it from a backup")
        try:
            conn = self.reader()
            status = [row[0] for row in conn.execute("PRAGMA quick_check")] if thorough else ["ok"]
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise LedgerDamaged(f"privacy ledger {self.path} is damaged ({exc}); refusing to guess what was spent. "
                                "It was not changed: restore it from a backup") from None
        if status != ["ok"]:
            raise LedgerDamaged(f"privacy ledger {self.path} is damaged (SQLite quick_check: {'; '.join(status[:3])})"
                                "; refusing to guess what was spent. It was not changed: restore it from a backup")
        if meta.get("version") != str(SCHEMA_VERSION):
            raise LedgerDamaged(f"privacy ledger {self.path}: unknown version {meta.get('version')!r}")
        if meta.get("party") != self.party:
            raise LedgerDamaged(f"privacy ledger {self.path} belongs to {meta.get('party')!r}, not {self.party!r}")
        self._signature = signature

    def ensure_created(self) -> None:
        """Create the ledger file on the first write (a party that never charged has no ledger)."""
        if self.ready():
            return
        with self._create_lock:
            if not self.path.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                _create(self.path, self.party)
                self._checked = True
                self._signature = self._stat()

    # -- reading ---------------------------------------------------------------------------------------------------
    def reader(self) -> sqlite3.Connection:
        """This thread's read connection (WAL: readers never wait for the writer)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
        return conn

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot (one read transaction); SQLite errors become LedgerDamaged naming the file."""
        if not self.ready():
            raise FileNotFoundError(self.path)
        conn = self.reader()
        try:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            raise LedgerUnavailable(f"privacy ledger {self.path}: cannot read ({exc})") from None
        except sqlite3.DatabaseError as exc:
            raise LedgerDamaged(f"privacy ledger {self.path} is damaged ({exc}); refusing to guess what was "
                                "spent. It was not changed: restore it from a backup") from None

    def meta(self) -> dict[str, str]:
        with self.reading() as conn:
            return dict(conn.execute("SELECT key, value FROM meta").fetchall())

    def entries(self, guarantee: str | None = None) -> list[dict[str, Any]]:
        """Every charge (or this guarantee's), oldest first, in the old JSON entry's form."""
        if not self.ready():
            return []
        with self.reading() as conn:
            return select_entries(conn, guarantee)

    # -- writing ---------------------------------------------------------------------------------------------------
    def submit(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op(connection)` inside a write transaction and return its result once that transaction is durable.

        Operations submitted while a commit is in flight share the next transaction (one fsync); each runs in its
        own savepoint, so one that raises (a refused charge) is rolled back alone and its exception re-raised here.
        """
        self.ensure_created()
        future: Future[T] = Future()
        with self._cond:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_loop, name=f"ledger-writer-{self.path.name}",
                                                daemon=True)
                self._writer.start()
            self._pending.append((op, future))
            self._cond.notify()
        return future.result()

    def _write_loop(self) -> None:
        conn = _connect(self.path)
        conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run beside the writer, not inside a commit
        checkpointer = threading.Thread(target=self._checkpoint_loop, name="ledger-checkpoint", daemon=True)
        checkpointer.start()
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self._commit(conn, batch)

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple[Callable[[sqlite3.Connection], Any],
                                                                  Future[Any]]]) -> None:
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    result = op(conn)
                except Exception as exc:  # this operation only: the others in the batch go on
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((future, None, exc))
                else:
                    conn.execute("RELEASE op")
                    outcomes.append((future, result, None))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error: Exception = (LedgerUnavailable if isinstance(exc, sqlite3.OperationalError) else LedgerDamaged)(
                f"privacy ledger {self.path}: could not record ({exc}); nothing was released")
            for _, future in batch:
                future.set_exception(error)
            return
        self.commits += 1
        self.operations += len(batch)
        for future, result, exc in outcomes:
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)

    def _checkpoint_loop(self) -> None:
        """Copy the WAL back into the database every second or so, outside the commit path (PASSIVE: never blocks
        the writer); only when the WAL has grown, so an idle ledger costs nothing. A file that is no database (the
        writer's own first commit reports it, naming the file) ends the loop quietly instead of the thread."""
        try:
            conn = _connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            log.debug("ledger checkpoints off for %s: %s", self.path, exc)
            return
        while True:
            time.sleep(1.0)
            wal = self.path.with_name(self.path.name + "-wal")
            try:
                if wal.exists() and wal.stat().st_size > 4 << 20:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except (OSError, sqlite3.Error) as exc:  # the next commit reports a real problem
                log.debug("ledger checkpoint skipped: %s", exc)


def select_entries(conn: sqlite3.Connection, guarantee: str | None = None) -> list[dict[str, Any]]:
    if guarantee is None:
        rows = conn.execute(f"SELECT {ENTRY_COLUMNS} FROM entries ORDER BY id").fetchall()
    else:
        rows = conn.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE guarantee = ? ORDER BY id",
                            (guarantee,)).fetchall()
    return [entry_dict(row) for row in rows]


_stores: dict[tuple[int, Path, str], LedgerStore] = {}
_stores_lock = threading.Lock()


def open_store(path: Path, party: str) -> LedgerStore:
    """The process's one store for this ledger file (shared by every Ledger and guard on it, so their writes share
    commits); migrates a JSON ledger and checks the file on first open. LedgerDamaged if it cannot be trusted."""
    db = ledger_db_path(Path(path).expanduser().absolute())
    key = (os.getpid(), db, party)  # after a fork the child opens its own connections and writer
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = LedgerStore(db, party)
            _stores[key] = store
    store.ready()
    return store
