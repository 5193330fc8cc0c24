"""A party's own lifetime privacy budget: a write-ahead ledger of every release, refused once a budget is spent.

Why party-held: a budget protects the party's own users, so it comes from the party's own settings and lives in
its own home (shared/party_home.py), outside any run folder; the coordinator can neither raise it nor reset it.
Why lifetime: a second run, a retraining or an online service on the same people composes with everything the
party released before (worst case over users), so one ledger per party holds all of it, each entry tagged with the
run that made it. Why write-ahead: a release is recorded before it leaves, so a round that fails or is interrupted
after the charge still counts (we may over-count, never under-count).

Storage (`ledger_store.py`): one SQLite file in WAL mode in the home (`privacy-ledger.sqlite`), append-only, each
charge checked and written inside one write transaction that is fsynced before `charge` returns; concurrent charges
and online answers in one process share commits (group commit). Writers may be several processes (a training run
and a live service): SQLite's write lock serialises their check-and-charge transactions. A JSON ledger of the old
format (`privacy-ledger.json`, rewritten whole per charge) is migrated on first open and kept as `.json.migrated`; a
damaged ledger is refused (`LedgerDamaged`, naming the file), never reset.

Why a step key (resume after a crash, README "Resume"): a party tags each charge a protocol step makes with the run,
the step and the charge's place in it. A party runs a step again only when its saved state still expects that step,
i.e. when no reply of the earlier attempt ever left it (the state is saved before a reply is returned); the redo then
releases once what the earlier attempt never released, so the charge the earlier attempt made covers it and is not
made twice. Every charge ever made stays in the ledger: nothing is removed, a resumed run only avoids double entries.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedscore.shared.privacy.accounting import account, check_guarantee_records, epsilon_lower_bound
from fedscore.shared.privacy.ledger_store import (
    INSERT_ENTRY,
    LedgerDamaged,
    LedgerStore,
    LedgerUnavailable,
    entry_row,
    ledger_db_path,
    ledger_exists,
    open_store,
    select_entries,
)
from fedscore.shared.privacy.mechanisms import Mechanism, mechanisms_from_dicts, split_guarantee_key

if TYPE_CHECKING:
    from fedscore.shared.protocol.bodies import LedgerReport

LEDGER_VERSION = 2  # SQLite; version 1 was the JSON file

__all__ = ["BudgetExceeded", "Ledger", "LedgerDamaged", "LedgerUnavailable", "ledger_db_path", "ledger_entries",
           "ledger_exists", "ledger_report"]


class BudgetExceeded(RuntimeError):
    """A release that would take a guarantee past the party's budget; nothing was recorded or released."""

    is_refusal = True  # a party's own decision, not a fault: callers report it as a refusal

    def __init__(self, party: str, guarantee: str, spent: float, would_be: float, budget: float | None, *,
                 at_least: bool = False) -> None:
        self.party, self.guarantee, self.spent, self.would_be, self.budget = party, guarantee, spent, would_be, budget
        if budget is None:
            message = (f"{party}: no privacy budget is configured for {guarantee}; set one in this party's node "
                       "config before releasing anything under it")
        else:
            message = (f"{party}: privacy budget for {guarantee} exceeded: spent eps={spent:.4g}, this release would "
                       f"make it {'at least ' if at_least else ''}{would_be:.4g} > budget {budget:.4g}; nothing was "
                       "recorded, do not release")
        super().__init__(message)


class Ledger:
    """Budgets (guarantee key -> max epsilon, e.g. {"lender.labels@payment": 4.0}) and the releases charged."""

    def __init__(self, path: Path, budget: Mapping[str, float], delta: float, *, party: str = "",
                 run: str = "", step: Callable[[], str] | None = None) -> None:
        for key, limit in budget.items():
            split_guarantee_key(key)
            if not limit >= 0:
                raise ValueError(f"budget for {key} must be a non-negative epsilon, got {limit}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.path = Path(path)
        self.budget = dict(budget)
        self.delta = delta
        self.party = party or self.path.parent.name
        self.run = run  # tags each entry, so a lifetime ledger says which run released what
        self.step = step  # the key of the next charge within the run's current protocol step (see the docstring)
        self._store: LedgerStore = open_store(self.path, self.party)  # migrates and checks the file now

    @property
    def store_path(self) -> Path:
        """The SQLite file that holds this ledger (`path` may name the old JSON ledger it was migrated from)."""
        return self._store.path

    def _load(self) -> list[dict[str, Any]]:
        return self._store.entries()

    # -- queries ---------------------------------------------------------------------------------------------------
    @property
    def entries(self) -> list[dict[str, Any]]:
        return self._load()

    def mechanisms(self, guarantee: str) -> list[Mechanism]:
        """Every release recorded under this guarantee, oldest first."""
        return _mechanisms(self._store.entries(guarantee))

    def epsilon(self, guarantee: str) -> float:
        """What this guarantee has spent so far, recomputed from the records at this ledger's delta."""
        return account(self.mechanisms(guarantee), self.delta)[0]

    def spent(self) -> dict[str, dict[str, Any]]:
        """Per guarantee (budgeted or charged): epsilon spent, budget, remaining, number of charges."""
        entries = self._load()
        keys = list(dict.fromkeys([*self.budget, *(entry["guarantee"] for entry in entries)]))
        summary = {}
        for key in keys:
            spent = account(_mechanisms([e for e in entries if e["guarantee"] == key]), self.delta)[0]
            limit = self.budget.get(key)
            summary[key] = {"epsilon": spent, "budget": limit, "delta": self.delta,
                            "remaining": None if limit is None else max(0.0, limit - spent),
                            "charges": sum(entry["guarantee"] == key for entry in entries)}
        return summary

    def report(self) -> LedgerReport:
        """The form a party shares with the coordinator (budgets, and per entry: guarantee, mechanism records,
        epsilon after, note, run), so the privacy report can compose the ledgers without reading the files."""
        return ledger_report(self.path, self.budget, self.party)

    # -- charging --------------------------------------------------------------------------------------------------
    def check(self, mechanisms: Sequence[Mechanism], guarantee: str) -> float:
        """What `guarantee` would reach if these releases were charged on top of the ledger, or BudgetExceeded;
        records nothing. For a party that knows its whole plan up front and would rather refuse before its first
        release than mid-run (the lender's label releases: clients/lender/party.py)."""
        protects, against = split_guarantee_key(guarantee)
        check_guarantee_records(protects, against, mechanisms)
        entries = self._store.entries(guarantee)
        before = _mechanisms(entries)
        self._refuse_early(entries, [*before, *mechanisms], guarantee)
        would_be = account([*before, *mechanisms], self.delta)[0]
        limit = self.budget.get(guarantee)
        if limit is None or not math.isfinite(would_be) or would_be > limit:
            raise BudgetExceeded(self.party, guarantee, _recorded(entries), would_be, limit)
        return would_be

    def charge(self, mechanisms: Sequence[Mechanism], guarantee: str, *, note: str = "") -> float:
        """Record these releases under `guarantee` and return its new epsilon, or raise BudgetExceeded.

        Call before the data leaves: it returns once the charge is durable (fsynced). The new epsilon composes
        everything recorded so far with these records. Thread-safe; concurrent charges share one commit.
        """
        protects, against = split_guarantee_key(guarantee)
        mechanisms = list(mechanisms)
        if not mechanisms:
            raise ValueError("charge() needs at least one release")
        check_guarantee_records(protects, against, mechanisms)
        step = self.step() if self.step is not None and self.run else ""
        records = json.loads(json.dumps([m.to_dict() for m in mechanisms]))  # as the file holds them
        if not self._store.ready():
            self.check(mechanisms, guarantee)  # a first charge that is refused leaves no ledger behind
        return self._store.submit(lambda conn: self.charge_in(conn, records, guarantee, note=note, step=step)[0])

    def charge_in(self, conn: sqlite3.Connection, records: list[dict[str, Any]], guarantee: str, *, note: str,
                  step: str = "") -> tuple[float, int | None]:
        """The charge inside the store's write transaction (the ledger is re-read under the write lock, so no
        other writer can spend the same budget meanwhile): (new epsilon, entry id or None if a resumed step's
        earlier charge covers it). For callers that record more in the same transaction (the online guard)."""
        entries = select_entries(conn, guarantee)
        if _same_step(entries, self.run, step, guarantee, records) is not None:
            # this step's earlier attempt released nothing: its charge covers this one
            return account(_mechanisms(entries), self.delta)[0], None
        before = _mechanisms(entries)
        planned = [*before, *mechanisms_from_dicts(records)]
        self._refuse_early(entries, planned, guarantee)
        would_be, accountant = _PRECOMPOSED.get((tuple(planned), self.delta)) or account(planned, self.delta)
        limit = self.budget.get(guarantee)
        if limit is None or not math.isfinite(would_be) or would_be > limit:
            raise BudgetExceeded(self.party, guarantee, _recorded(entries), would_be, limit)
        entry = {"guarantee": guarantee, "mechanisms": records, "epsilon_after": would_be, "accountant": accountant,
                 "delta": self.delta, "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
                 "run": self.run, "step": step, "note": note}
        cursor = conn.execute(INSERT_ENTRY, entry_row(entry))
        return would_be, cursor.lastrowid

    def _refuse_early(self, entries: list[dict[str, Any]], planned: list[Mechanism], guarantee: str) -> None:
        """BudgetExceeded, without composing anything, when the Gaussians of `planned` alone already exceed the
        budget (`epsilon_lower_bound`: milliseconds, where composing a guarantee takes a second or more): what every
        online answer past the budget costs. The spent epsilon it names is the one the last charge recorded."""
        limit = self.budget.get(guarantee)
        if limit is None:
            return
        bound = epsilon_lower_bound(planned, self.delta)
        if bound > limit:
            raise BudgetExceeded(self.party, guarantee, _recorded(entries), bound, limit, at_least=True)


# (records, delta) -> (epsilon, accountant) composed elsewhere (another process: composing holds the GIL for
# seconds, which a serving process cannot afford); `charge_in` uses it instead of composing again
_PRECOMPOSED: dict[tuple[tuple[Mechanism, ...], float], tuple[float, str]] = {}


def compose_records(records: list[dict[str, Any]], delta: float) -> tuple[float, str]:
    """`account` of these records (as the ledger stores them): what a composing worker process runs."""
    return account(mechanisms_from_dicts(records), delta)


def remember_composition(mechanisms: Sequence[Mechanism], delta: float, result: tuple[float, str]) -> None:
    """Record a composition made elsewhere, so that the charge of exactly these records at this delta uses it."""
    if len(_PRECOMPOSED) > 64:
        _PRECOMPOSED.clear()
    _PRECOMPOSED[(tuple(mechanisms), delta)] = result


def _recorded(entries: list[dict[str, Any]]) -> float:
    """What these entries have spent, as their last charge recorded it (a refusal names it without composing)."""
    return float(entries[-1]["epsilon_after"]) if entries else 0.0


def _mechanisms(entries: list[dict[str, Any]]) -> list[Mechanism]:
    return mechanisms_from_dicts([item for entry in entries for item in entry["mechanisms"]])


def _same_step(entries: list[dict[str, Any]], run: str, step: str, guarantee: str,
               records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The entry an earlier attempt of this very charge made (same run, step key, guarantee and records), if any."""
    if not step:
        return None
    for entry in entries:
        if (entry.get("run"), entry.get("step"), entry["guarantee"]) == (run, step, guarantee) \
                and entry["mechanisms"] == records:
            return entry
    return None


def ledger_entries(path: Path, party: str) -> list[dict[str, Any]]:
    """A party's ledger entries (old JSON entry form), oldest first; [] if it has none. Migrates an old JSON ledger
    on first read; LedgerDamaged if the file cannot be trusted."""
    return open_store(Path(path), party).entries()


def ledger_report(path: Path, budget: Mapping[str, float], party: str) -> LedgerReport:
    """`Ledger.report` without a Ledger: reporting needs no delta, so a party can report its lifetime ledger even
    when the message that failed never gave it a run config."""
    from fedscore.shared.protocol.bodies import LedgerEntry, LedgerReport

    entries = [LedgerEntry(guarantee=e["guarantee"], mechanisms=e["mechanisms"], epsilon_after=e["epsilon_after"],
                           note=e.get("note", ""), run=e.get("run", "")) for e in ledger_entries(Path(path), party)]
    return LedgerReport(budgets=dict(budget), entries=entries)
