"""A party's own lifetime privacy budget: a write-ahead ledger of every release, refused once a budget is spent.

Why party-held: a budget protects the party's own users, so it comes from the party's own settings and lives in
its own home (shared/party_home.py), outside any run folder; the coordinator can neither raise it nor reset it.
Why lifetime: a second run, a retraining or an online service on the same people composes with everything the
party released before (worst case over users), so one ledger per party holds all of it, each entry tagged with the
run that made it. Why write-ahead: a release is recorded before it leaves, so a round that fails or is interrupted
after the charge still counts (we may over-count, never under-count). Writers may be several processes (a training
run and a live service): each charge holds an exclusive flock on a lock file beside the ledger while it re-reads,
checks and rewrites; writes are atomic (temporary file, fsync, os.replace), so a crash leaves the old or the new
ledger, never half of one.

Why a step key (resume after a crash, README "Resume"): a party tags each charge a protocol step makes with the run,
the step and the charge's place in it. A party runs a step again only when its saved state still expects that step,
i.e. when no reply of the earlier attempt ever left it (the state is saved before a reply is returned); the redo then
releases once what the earlier attempt never released, so the charge the earlier attempt made covers it and is not
made twice. Every charge ever made stays in the ledger: nothing is removed, a resumed run only avoids double entries.
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedscore.shared.atomic import write_text_atomic
from fedscore.shared.privacy.accounting import account, check_guarantee_records
from fedscore.shared.privacy.mechanisms import Mechanism, mechanisms_from_dicts, split_guarantee_key

if TYPE_CHECKING:
    from fedscore.shared.protocol.bodies import LedgerReport

LEDGER_VERSION = 1


class BudgetExceeded(RuntimeError):
    """A release that would take a guarantee past the party's budget; nothing was recorded or released."""

    is_refusal = True  # a party's own decision, not a fault: callers report it as a refusal

    def __init__(self, party: str, guarantee: str, spent: float, would_be: float, budget: float | None) -> None:
        self.party, self.guarantee, self.spent, self.would_be, self.budget = party, guarantee, spent, would_be, budget
        if budget is None:
            message = (f"{party}: no privacy budget is configured for {guarantee}; set one in this party's node "
                       "config before releasing anything under it")
        else:
            message = (f"{party}: privacy budget for {guarantee} exceeded: spent eps={spent:.4g}, this release would "
                       f"make it {would_be:.4g} > budget {budget:.4g}; nothing was recorded, do not release")
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
        self._load()  # fail now, not at the first charge, if the file is unreadable or another party's

    # -- file ------------------------------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock shared by every process that writes this ledger (flock on `<ledger>.lock`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _load(self) -> list[dict[str, Any]]:
        return _read_entries(self.path, self.party)

    def _save(self, entries: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": LEDGER_VERSION, "party": self.party, "delta": self.delta,
                           "entries": entries}, indent=1, allow_nan=False)
        write_text_atomic(self.path, text)

    # -- queries ---------------------------------------------------------------------------------------------------
    @property
    def entries(self) -> list[dict[str, Any]]:
        return self._load()

    def mechanisms(self, guarantee: str) -> list[Mechanism]:
        """Every release recorded under this guarantee, oldest first."""
        items = [item for entry in self._load() if entry["guarantee"] == guarantee for item in entry["mechanisms"]]
        return mechanisms_from_dicts(items)

    def epsilon(self, guarantee: str) -> float:
        """What this guarantee has spent so far, recomputed from the records at this ledger's delta."""
        return account(self.mechanisms(guarantee), self.delta)[0]

    def spent(self) -> dict[str, dict[str, Any]]:
        """Per guarantee (budgeted or charged): epsilon spent, budget, remaining, number of charges."""
        entries = self._load()
        keys = list(dict.fromkeys([*self.budget, *(entry["guarantee"] for entry in entries)]))
        summary = {}
        for key in keys:
            spent = self.epsilon(key)
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
        before = self.mechanisms(guarantee)
        would_be = account([*before, *mechanisms], self.delta)[0]
        limit = self.budget.get(guarantee)
        if limit is None or not math.isfinite(would_be) or would_be > limit:
            raise BudgetExceeded(self.party, guarantee, account(before, self.delta)[0], would_be, limit)
        return would_be

    def charge(self, mechanisms: Sequence[Mechanism], guarantee: str, *, note: str = "") -> float:
        """Record these releases under `guarantee` and return its new epsilon, or raise BudgetExceeded.

        Call before the data leaves. The new epsilon composes everything recorded so far with these records.
        """
        protects, against = split_guarantee_key(guarantee)
        mechanisms = list(mechanisms)
        if not mechanisms:
            raise ValueError("charge() needs at least one release")
        check_guarantee_records(protects, against, mechanisms)
        step = self.step() if self.step is not None and self.run else ""
        records = json.loads(json.dumps([m.to_dict() for m in mechanisms]))  # as the file holds them
        with self._locked():
            entries = self._load()
            earlier = _same_step(entries, self.run, step, guarantee, records)
            if earlier is not None:  # this step's earlier attempt released nothing: its charge covers this one
                return self.epsilon(guarantee)
            before = mechanisms_from_dicts([item for entry in entries if entry["guarantee"] == guarantee
                                            for item in entry["mechanisms"]])
            would_be, accountant = account([*before, *mechanisms], self.delta)
            limit = self.budget.get(guarantee)
            if limit is None or not math.isfinite(would_be) or would_be > limit:
                raise BudgetExceeded(self.party, guarantee, account(before, self.delta)[0], would_be, limit)
            entry = {"guarantee": guarantee, "mechanisms": records, "epsilon_after": would_be,
                     "accountant": accountant, "delta": self.delta,
                     "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"), "run": self.run, "note": note}
            if step:
                entry["step"] = step
            entries.append(entry)
            self._save(entries)
        return would_be


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


def _read_entries(path: Path, party: str) -> list[dict[str, Any]]:
    """A ledger file's entries, after checking it is readable, of this version and this party's."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"privacy ledger {path} is not valid JSON ({exc}); refusing to guess what was spent") from exc
    if data.get("version") != LEDGER_VERSION:
        raise ValueError(f"privacy ledger {path}: unknown version {data.get('version')!r}")
    if data.get("party") != party:
        raise ValueError(f"privacy ledger {path} belongs to {data.get('party')!r}, not {party!r}")
    entries: list[dict[str, Any]] = data["entries"]
    return entries


def ledger_report(path: Path, budget: Mapping[str, float], party: str) -> LedgerReport:
    """`Ledger.report` without a Ledger: reporting needs no delta, so a party can report its lifetime ledger even
    when the message that failed never gave it a run config."""
    from fedscore.shared.protocol.bodies import LedgerEntry, LedgerReport

    entries = [LedgerEntry(guarantee=e["guarantee"], mechanisms=e["mechanisms"], epsilon_after=e["epsilon_after"],
                           note=e.get("note", ""), run=e.get("run", "")) for e in _read_entries(Path(path), party)]
    return LedgerReport(budgets=dict(budget), entries=entries)
