"""`fedscore ledger show/export`: what a party's lifetime ledger holds, for the party's auditors.

Read-only: neither command migrates an old JSON ledger (it is read as it is and said so) nor writes to the home.
Epsilons are recomputed from the recorded mechanisms with the same accountant the parties use, at the delta the
entries were charged at; budgets are not in the ledger (they are each party's settings), so none is shown.
A damaged ledger is one red line naming the file and exit code 2, as everywhere in the CLI.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from fedscore.cli_common import console, fail

ledger_app = typer.Typer(help="A party's lifetime privacy ledger, for auditors: show it or export it.",
                         no_args_is_help=True)

HomeArg = Annotated[Path | None, typer.Option("--party-home", help="the party's home (default: "
                                              "$FEDSCORE_HOME/parties/<party>)")]
PartyArg = Annotated[str, typer.Option("--party", help="payment or lender (checked against the ledger)")]


@dataclass
class LedgerView:
    """What one party's ledger holds: its entries (old JSON entry form) and, per model version, online answers."""

    file: Path
    party: str
    entries: list[dict[str, Any]]
    online: dict[str, dict[str, int]]  # sha256 -> {"answers", "users", "worst"}
    legacy: bool  # read from an old JSON ledger not migrated yet


def _read(home: Path | None, party: str) -> LedgerView:
    from fedscore.shared.party_home import PartyHome
    from fedscore.shared.privacy.ledger_store import (
        LedgerDamaged,
        LedgerUnavailable,
        ledger_db_path,
        legacy_json_path,
        open_store,
        read_legacy_entries,
    )

    home = PartyHome(home) if home is not None else PartyHome.default(party)
    path = ledger_db_path(home.ledger)
    try:
        if not path.exists():
            legacy = legacy_json_path(path)
            if not legacy.exists():
                fail(f"no privacy ledger in {home.root} (no {path.name}, no {legacy.name})")
            return LedgerView(legacy, party, read_legacy_entries(legacy, party), {}, legacy=True)
        store = open_store(path, party)
        with store.reading() as conn:
            from fedscore.shared.privacy.ledger_store import select_entries

            entries = select_entries(conn, None)
            rows = conn.execute("SELECT m.sha256, COUNT(*), COUNT(DISTINCT r.user_id) FROM releases r "
                                "JOIN models m ON m.id = r.model GROUP BY r.model ORDER BY r.model").fetchall()
            worst = dict(conn.execute("SELECT m.sha256, MAX(r.n) FROM releases r JOIN models m ON m.id = r.model "
                                      "GROUP BY r.model").fetchall())
            answers = dict(conn.execute("SELECT m.sha256, SUM(r.n) FROM (SELECT model, user_id, MAX(n) AS n FROM "
                                        "releases GROUP BY model, user_id) r JOIN models m ON m.id = r.model "
                                        "GROUP BY r.model").fetchall())
    except (LedgerDamaged, LedgerUnavailable) as exc:
        fail(str(exc))
    except sqlite3.Error as exc:
        fail(f"privacy ledger {path}: unreadable ({exc})")
    online = {sha: {"answers": int(answers.get(sha, rows_n)), "rows": rows_n, "users": users,
                    "worst": int(worst.get(sha, 0))} for sha, rows_n, users in rows}
    return LedgerView(path, party, entries, online, legacy=False)


def _summary(view: LedgerView) -> list[dict[str, Any]]:
    """Per guarantee: charges, epsilon recomputed from the records, last recorded epsilon, runs, first/last time."""
    from fedscore.shared.privacy.accounting import account
    from fedscore.shared.privacy.mechanisms import mechanisms_from_dicts

    out = []
    for key in dict.fromkeys(e["guarantee"] for e in view.entries):
        held = [e for e in view.entries if e["guarantee"] == key]
        delta = float(held[-1].get("delta") or 1e-5)
        epsilon, accountant = account(mechanisms_from_dicts([m for e in held for m in e["mechanisms"]]), delta)
        out.append({"guarantee": key, "charges": len(held), "epsilon": epsilon, "delta": delta,
                    "accountant": accountant, "epsilon_recorded": held[-1]["epsilon_after"],
                    "runs": len({e.get("run", "") for e in held} - {""}),
                    "first": held[0].get("recorded_at", ""), "last": held[-1].get("recorded_at", "")})
    return out


@ledger_app.command("show")
def show(party: PartyArg = "payment", party_home: HomeArg = None,
         as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False) -> None:
    """Per guarantee: charges, epsilon spent (recomputed), runs; per model version: online answers, worst case."""
    from rich.table import Table

    view = _read(party_home, party)
    summary = _summary(view)
    if as_json:
        typer.echo(json.dumps({"file": str(view.file), "party": view.party, "guarantees": summary,
                               "online": view.online}, indent=1))
        return
    note = " (old JSON format, not migrated yet: the party's next run or service migrates it)" if view.legacy else ""
    console.print(f"privacy ledger of {view.party}: {view.file}{note}")
    table = Table(title="charges per guarantee")
    for column in ("guarantee", "charges", "epsilon (recomputed)", "delta", "accountant", "runs", "first", "last"):
        table.add_column(column)
    for row in summary:
        table.add_row(row["guarantee"], str(row["charges"]), f"{row['epsilon']:.4g}", f"{row['delta']:.0e}",
                      row["accountant"], str(row["runs"]), row["first"], row["last"])
    console.print(table)
    if view.online:
        online = Table(title="online answers per model version (payment part sha256)")
        for column in ("model", "answers", "users", "worst case per user"):
            online.add_column(column)
        for sha, item in view.online.items():
            online.add_row(sha[:16] + "...", str(item["answers"]), str(item["users"]), str(item["worst"]))
        console.print(online)


@ledger_app.command("export")
def export(out: Annotated[Path, typer.Option("--out", help="JSON file to write: every entry, and the summary")],
           party: PartyArg = "payment", party_home: HomeArg = None,
           releases: Annotated[Path | None, typer.Option(
               "--releases", help="also write every online answer as CSV (model, user_id, n, released_at, entry)")]
           = None) -> None:
    """Every ledger entry as JSON (the old ledger's entry form, plus the recomputed summary); answers as CSV."""
    from fedscore.shared.atomic import write_text_atomic

    if out.exists() or (releases is not None and releases.exists()):
        fail(f"{out if out.exists() else releases}: exists; choose a new file")
    view = _read(party_home, party)
    document = {"file": str(view.file), "party": view.party, "summary": _summary(view), "online": view.online,
                "entries": view.entries}
    if releases is not None:
        if view.legacy:
            fail(f"{view.file}: an old JSON ledger records no individual answers; nothing to write to {releases}")
        write_text_atomic(releases, _releases_csv(view.file, view.party))
    write_text_atomic(out, json.dumps(document, indent=1, allow_nan=False))
    console.print(f"wrote {out} ({len(view.entries)} entries)" + (f" and {releases}" if releases else ""))


def _releases_csv(path: Path, party: str) -> str:
    from fedscore.shared.privacy.ledger_store import open_store

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "user_id", "n", "released_at", "entry"])
    with open_store(path, party).reading() as conn:
        writer.writerows(conn.execute("SELECT m.sha256, r.user_id, r.n, r.released_at, r.entry FROM releases r "
                                      "JOIN models m ON m.id = r.model ORDER BY r.id"))
    return buffer.getvalue()
