"""The lifetime ledger in SQLite (shared/privacy/ledger_store.py): migration from the JSON ledgers, refusal of a
damaged file, append-only rows, group commit, concurrent charges that never overspend, durability under SIGKILL,
and the `fedscore ledger` CLI for auditors."""

from __future__ import annotations

import inspect
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedscore.cli import app
from fedscore.clients.payment.release_guard import GuardRefused, LedgerGuard, release_counts
from fedscore.clients.payment.served import ServedMeta, ServedVersion
from fedscore.shared.party_home import PartyHome
from fedscore.shared.privacy import BudgetExceeded, Ledger, account, embedding_release
from fedscore.shared.privacy.ledger import ledger_entries, ledger_exists, ledger_report
from fedscore.shared.privacy.ledger_store import LedgerDamaged, open_store

ROOT = Path(__file__).resolve().parents[1]
KEY = "payment.features@lender"
DELTA = 1e-6
RELEASE = embedding_release(4.0, 1.0, 1)


def _old_ledger(path: Path, party: str = "payment", charges: int = 2) -> list[dict]:
    """A JSON ledger as the old code wrote it (version 1, the whole file rewritten per charge)."""
    entries = []
    for k in range(1, charges + 1):
        entries.append({"guarantee": KEY, "mechanisms": [RELEASE.to_dict()],
                        "epsilon_after": account([RELEASE] * k, DELTA)[0], "accountant": "dp_accounting.pld",
                        "delta": DELTA, "recorded_at": "2026-11-30T10:00:00+00:00", "run": f"run{k}",
                        "note": f"round {k}", **({"step": "embed:1#0"} if k == 1 else {})})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "party": party, "delta": DELTA, "entries": entries}, indent=1))
    return entries


def test_the_public_api_keeps_its_names_and_signatures() -> None:
    """Other code (training parties, the report, retraining on another branch) calls these: keep them."""
    params = list(inspect.signature(Ledger.__init__).parameters)
    assert params == ["self", "path", "budget", "delta", "party", "run", "step"]
    for method in ("mechanisms", "epsilon", "spent", "report", "check", "charge", "entries"):
        assert hasattr(Ledger, method)
    assert list(inspect.signature(Ledger.charge).parameters) == ["self", "mechanisms", "guarantee", "note"]
    assert list(inspect.signature(ledger_report).parameters) == ["path", "budget", "party"]
    assert issubclass(BudgetExceeded, RuntimeError) and BudgetExceeded.is_refusal


def test_a_json_ledger_is_migrated_on_first_open_and_kept(tmp_path: Path) -> None:
    old = _old_ledger(tmp_path / PartyHome.LEGACY_LEDGER)
    text = (tmp_path / PartyHome.LEGACY_LEDGER).read_text()
    ledger = Ledger(tmp_path / PartyHome.LEDGER, {KEY: 50.0}, DELTA, party="payment")
    assert ledger.entries == old  # every field, the step key included
    assert not (tmp_path / PartyHome.LEGACY_LEDGER).exists()
    assert (tmp_path / f"{PartyHome.LEGACY_LEDGER}.migrated").read_text() == text  # kept, byte for byte
    after = ledger.charge([RELEASE], KEY, note="after migration")
    assert after == pytest.approx(account([RELEASE] * 3, DELTA)[0])  # composes with what was migrated
    assert [e["note"] for e in ledger_entries(tmp_path / PartyHome.LEDGER, "payment")] == ["round 1", "round 2",
                                                                                     "after migration"]
    # the old name still reaches the same ledger (callers that pass privacy-ledger.json)
    assert len(Ledger(tmp_path / PartyHome.LEGACY_LEDGER, {KEY: 50.0}, DELTA, party="payment").entries) == 3


def test_a_migration_interrupted_before_the_rename_is_finished_once(tmp_path: Path) -> None:
    _old_ledger(tmp_path / PartyHome.LEGACY_LEDGER)
    Ledger(tmp_path / PartyHome.LEDGER, {KEY: 50.0}, DELTA, party="payment")
    # as if the process died after writing the database and before renaming the JSON
    (tmp_path / f"{PartyHome.LEGACY_LEDGER}.migrated").rename(tmp_path / PartyHome.LEGACY_LEDGER)
    from fedscore.shared.privacy.ledger_store import LedgerStore

    LedgerStore(tmp_path / PartyHome.LEDGER, "payment")  # what a new process does on open
    assert not (tmp_path / PartyHome.LEGACY_LEDGER).exists()
    assert len(ledger_entries(tmp_path / PartyHome.LEDGER, "payment")) == 2  # not migrated twice
    _old_ledger(tmp_path / PartyHome.LEGACY_LEDGER, charges=1)  # another JSON ledger beside it: ambiguous
    with pytest.raises(LedgerDamaged, match="two privacy ledgers"):
        LedgerStore(tmp_path / PartyHome.LEDGER, "payment")


@pytest.mark.parametrize("damage", ["half-truncated json", "empty json", "half-truncated sqlite", "empty sqlite",
                                    "garbage sqlite", "other party's json"])
def test_a_damaged_ledger_is_refused_naming_the_file_and_left_as_it_is(tmp_path: Path, damage: str) -> None:
    home = tmp_path / "payment"
    if "json" in damage:
        _old_ledger(home / PartyHome.LEGACY_LEDGER)
        victim = home / PartyHome.LEGACY_LEDGER
        text = victim.read_bytes()
        if damage != "other party's json":
            victim.write_bytes(text[: len(text) // 2] if damage.startswith("half") else b"")
    else:
        Ledger(home / PartyHome.LEDGER, {KEY: 50.0}, DELTA, party="payment").charge([RELEASE], KEY)
        open_store(home / PartyHome.LEDGER, "payment").submit(lambda conn: conn.executemany(
            "INSERT INTO releases (model, user_id, n) VALUES (0, ?, 1)", [(f"user{k}" * 20,) for k in range(2000)]))
        victim = home / PartyHome.LEDGER
        _checkpoint(victim)
        data = victim.read_bytes()
        if damage == "half-truncated sqlite":
            victim.write_bytes(data[: len(data) // 2])
        elif damage == "empty sqlite":
            victim.write_bytes(b"")
        elif damage == "garbage sqlite":
            victim.write_bytes(data[:100] + os.urandom(len(data) - 100))
    before = victim.read_bytes()
    party = "lender" if damage == "other party's json" else "payment"
    from fedscore.shared.privacy.ledger_store import LedgerStore

    with pytest.raises(LedgerDamaged, match=str(victim.name)) as refused:
        LedgerStore(home / PartyHome.LEDGER, party)  # a fresh process's open
    assert str(victim) in str(refused.value)
    assert victim.read_bytes() == before  # never reset or rewritten
    if "json" in damage:
        assert not (home / PartyHome.LEDGER).exists()  # nothing half-migrated
    result = CliRunner().invoke(app, ["ledger", "show", "--party", party, "--party-home", str(home)])
    assert result.exit_code == 2 and str(victim) in " ".join(result.output.split())
    assert "Traceback" not in result.output


def _checkpoint(path: Path) -> None:
    """Fold the WAL into the database file (as SQLite does on its own), so damage to the file is damage to all."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def test_the_ledger_is_append_only(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / PartyHome.LEDGER, {KEY: 50.0}, DELTA, party="payment")
    ledger.charge([RELEASE], KEY)
    conn = sqlite3.connect(tmp_path / PartyHome.LEDGER, isolation_level=None)
    conn.execute("INSERT INTO releases (model, user_id, n) VALUES (0, 'u1', 1)")  # appending is allowed
    for statement in ("UPDATE entries SET epsilon_after = 0", "DELETE FROM entries",
                      "UPDATE meta SET value = 'lender' WHERE key = 'party'", "DELETE FROM releases"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(statement)
    conn.close()
    assert ledger.entries[0]["epsilon_after"] > 0


def test_concurrent_charges_share_commits_and_never_overspend(tmp_path: Path) -> None:
    budget = account([RELEASE] * 3, DELTA)[0] * 1.0001  # room for exactly three releases
    path = tmp_path / PartyHome.LEDGER
    results: list[object] = []

    def charge(k: int) -> None:
        ledger = Ledger(path, {KEY: budget}, DELTA, party="payment")  # one Ledger per caller, like the parties
        try:
            results.append(ledger.charge([RELEASE], KEY, note=f"thread {k}"))
        except BudgetExceeded as exc:
            results.append(exc)

    threads = [threading.Thread(target=charge, args=(k,)) for k in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    charged = [r for r in results if isinstance(r, float)]
    assert len(charged) == 3 and sum(isinstance(r, BudgetExceeded) for r in results) == 9
    ledger = Ledger(path, {KEY: budget}, DELTA, party="payment")
    assert len(ledger.entries) == 3 and ledger.epsilon(KEY) <= budget


def test_operations_waiting_on_a_commit_share_the_next_one(tmp_path: Path) -> None:
    """Group commit: while one transaction is open, everything submitted joins the next transaction (one fsync)."""
    store = open_store(tmp_path / PartyHome.LEDGER, "payment")
    gate, inside = threading.Event(), threading.Event()

    def slow(conn: sqlite3.Connection) -> int:
        inside.set()
        gate.wait(10)
        return 0

    first = threading.Thread(target=store.submit, args=(slow,))
    first.start()
    assert inside.wait(10)
    commits = store.commits
    waiting = [threading.Thread(target=store.submit, args=(lambda conn: conn.execute(
        "INSERT INTO models (sha256) VALUES (hex(randomblob(8)))").lastrowid,)) for _ in range(20)]
    for thread in waiting:
        thread.start()
    deadline = time.monotonic() + 10
    while len(store._pending) < 20:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gate.set()
    for thread in [first, *waiting]:
        thread.join()
    assert store.commits == commits + 2 and store.operations >= 21
    with store.reading() as conn:
        assert conn.execute("SELECT COUNT(*) FROM models").fetchone()[0] == 20


def _served(sha: str = "ab" * 32, ids: tuple[str, ...] = ("u1", "u2", "u3")) -> ServedVersion:
    meta = ServedMeta(feature_sigma=None, embedding_clip=1.0, feature_neighbouring="add_remove", delta=DELTA,
                      replayable_noise=False)
    return ServedVersion(sha256=sha, ids=frozenset(ids), meta=meta, ids_file=Path("served.ids"))


def test_online_release_counts_are_migrated_and_appended(tmp_path: Path) -> None:
    sha = "ab" * 32
    (tmp_path / PartyHome.ONLINE_RELEASES).write_text(json.dumps({"version": 1, "by_model": {sha: {"u1": 3, "u2": 1},
                                                                               "cd" * 32: {"u1": 2}}}))
    guard = LedgerGuard(tmp_path, _served(sha), {}, allow_unprotected=True)
    assert guard.counts == {"u1": 3, "u2": 1} and guard.worst == 3
    counts = PartyHome(tmp_path).online_releases
    assert counts.with_name(f"{counts.name}.migrated").exists() and not counts.exists()
    guard.before_release("u2")
    guard.before_release("u3")
    guard.close()
    assert release_counts(tmp_path) == {sha: {"u1": 3, "u2": 2, "u3": 1}, "cd" * 32: {"u1": 2}}
    again = LedgerGuard(tmp_path, _served(sha), {}, allow_unprotected=True)  # the counts survive a restart
    assert again.counts == {"u1": 3, "u2": 2, "u3": 1}
    again.close()


def test_damaged_release_counts_are_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / PartyHome.ONLINE_RELEASES).write_text('{"version": 1, "by_model": {"ab')
    with pytest.raises(GuardRefused, match=PartyHome.ONLINE_RELEASES):
        LedgerGuard(tmp_path, _served(), {}, allow_unprotected=True)
    assert (tmp_path / PartyHome.ONLINE_RELEASES).read_text() == '{"version": 1, "by_model": {"ab'
    (tmp_path / PartyHome.ONLINE_RELEASES).rename(tmp_path / "kept.json")
    guard = LedgerGuard(tmp_path, _served(), {}, allow_unprotected=True)  # the refusal let go of the lock
    guard.close()


CHILD = """
import sys, threading
from pathlib import Path
from tests.test_ledger_store import _served
from fedscore.clients.payment.release_guard import LedgerGuard

guard = LedgerGuard(Path(sys.argv[1]), _served(ids=tuple(f"u{k}" for k in range(50))), {}, allow_unprotected=True)
lock = threading.Lock()

def answer(k):
    n = 0
    while True:
        user = f"u{(k * 7 + n) % 50}"
        guard.before_release(user)  # durable before it returns: only then does the answer 'leave'
        with lock:
            print(user, flush=True)
        n += 1

for k in range(8):
    threading.Thread(target=answer, args=(k,), daemon=True).start()
threading.Event().wait()
"""


@pytest.mark.slow
def test_every_answer_that_left_is_in_the_ledger_after_sigkill(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    left: dict[str, int] = {}
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            left[line.strip()] = left.get(line.strip(), 0) + 1
            if sum(left.values()) >= 300:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    for line in proc.stdout:  # answers printed before the kill landed
        left[line.strip()] = left.get(line.strip(), 0) + 1
    recorded = next(iter(release_counts(tmp_path).values()))
    assert sum(left.values()) >= 300
    assert all(recorded.get(user, 0) >= n for user, n in left.items()), (left, recorded)
    assert ledger_exists(tmp_path / PartyHome.LEDGER)


def test_the_cli_shows_and_exports_a_ledger(tmp_path: Path) -> None:
    home = tmp_path / "payment"
    _old_ledger(home / PartyHome.LEGACY_LEDGER)
    runner = CliRunner()
    shown = runner.invoke(app, ["ledger", "show", "--party-home", str(home), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["guarantees"][0]["charges"] == 2
    assert (home / PartyHome.LEGACY_LEDGER).exists()  # showing does not migrate
    guard = LedgerGuard(home, _served(), {}, allow_unprotected=True)
    guard.before_release("u1")
    guard.before_release("u1")
    guard.close()
    out = tmp_path / "export.json"
    done = runner.invoke(app, ["ledger", "export", "--party-home", str(home), "--out", str(out), "--releases",
                               str(tmp_path / "answers.csv")])
    assert done.exit_code == 0, done.output
    exported = json.loads(out.read_text())
    assert [e["note"] for e in exported["entries"]] == ["round 1", "round 2"]
    assert exported["summary"][0]["epsilon"] == pytest.approx(account([RELEASE] * 2, DELTA)[0])
    assert next(iter(exported["online"].values()))["worst"] == 2
    assert (tmp_path / "answers.csv").read_text().count("\n") == 3  # header + two answers
    again = runner.invoke(app, ["ledger", "export", "--party-home", str(home), "--out", str(out)])
    assert again.exit_code == 2 and "exists" in again.output
    table = runner.invoke(app, ["ledger", "show", "--party-home", str(home)])
    assert table.exit_code == 0 and "charges per guarantee" in table.output and "online answers" in table.output


@pytest.mark.slow
def test_online_charges_are_made_ahead_and_cover_every_answer(tmp_path: Path) -> None:
    """With --charge-ahead 1 the guard charges before it serves and keeps the charged worst case ahead of the answered
    one (the background composes in a worker process): every answer is covered by a charge made before it; the
    over-count is at most ahead + reserve - 1 = 1 release, never an under-count. No waiting on the background: the
    checks hold whenever it runs."""
    meta = ServedMeta(feature_sigma=2.0, embedding_clip=1.0, feature_neighbouring="add_remove", delta=DELTA,
                      replayable_noise=False)
    served = ServedVersion(sha256="ef" * 32, ids=frozenset({"u1", "u2"}), meta=meta, ids_file=Path("served.ids"))
    guard = LedgerGuard(tmp_path, served, {KEY: 1e6}, ahead=1, reserve=1)
    assert guard.charged == 1 and len(ledger_entries(tmp_path / PartyHome.LEDGER, "payment")) == 1  # before serving
    try:
        for user in ("u1", "u2", "u1"):
            guard.before_release(user)
            assert guard.charged >= guard.worst  # every answer that left was covered by a charge first
    finally:
        guard.close()
        assert guard._reserver is not None
        guard._reserver.join()  # a charge in flight at close lands before we look
    assert guard.worst == 2 and 0 <= guard.charged - guard.worst <= 1
    record = embedding_release(2.0, 1.0, 1)
    entries = ledger_entries(tmp_path / PartyHome.LEDGER, "payment")
    assert len(entries) == guard.charged
    assert entries[-1]["epsilon_after"] == pytest.approx(account([record] * guard.charged, DELTA)[0])
    assert release_counts(tmp_path) == {"ef" * 32: {"u1": 2, "u2": 1}}


def test_a_run_on_a_half_truncated_json_ledger_stops_with_one_line_naming_it(party_homes_in_tmp: Path,
                                                                            tmp_path: Path) -> None:
    """Issue 20: this used to end in a Python traceback; the refusal stays, its form is one line and exit 2."""
    from tests.conftest import make_party_data

    make_party_data(tmp_path / "data", population=600)
    ledger = party_homes_in_tmp / "parties" / "payment" / PartyHome.LEGACY_LEDGER
    _old_ledger(ledger)
    text = ledger.read_text()
    ledger.write_text(text[: len(text) // 2])
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                      "--set", "training.rounds=1", "--set", "baselines.enabled=false"])
    assert result.exit_code == 2, result.output
    assert str(ledger) in " ".join(result.output.split()) and "Traceback" not in result.output
    assert ledger.read_text() == text[: len(text) // 2]


def test_closing_the_guard_mid_composition_stops_its_background(tmp_path: Path) -> None:
    """A guard closed while its background composes the next charge (its worker pool is then shut down) used to
    retry the composition every second forever, and a join on it never returned (seen as a hung test run)."""
    meta = ServedMeta(feature_sigma=2.0, embedding_clip=1.0, feature_neighbouring="add_remove", delta=DELTA,
                      replayable_noise=False)
    served = ServedVersion(sha256="ab" * 32, ids=frozenset({"u1"}), meta=meta, ids_file=Path("served.ids"))
    guard = LedgerGuard(tmp_path, served, {KEY: 1e6}, ahead=1, reserve=1)
    guard.close()  # at once: the first composition ahead is still in flight
    assert guard._reserver is not None
    guard._reserver.join(timeout=30)
    assert not guard._reserver.is_alive()
