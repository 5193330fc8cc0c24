"""The two parties a local operator plays (`fedscore train`, `federate`, `blacklist`, retraining): their data
folders, their homes, each one's public key pinned in the other's settings, and the settings themselves.

In a deployment each party's operator does this alone for its own party (`fedscore node`, fedscore/cli_deploy.py);
a local run holds both sides, so the pinning that operators do out of band happens here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedscore.budgets import Budgets
from fedscore.shared.data.tables import DataError
from fedscore.shared.party_home import default_party_home, ensure_party_home
from fedscore.shared.run_folder import PARTIES, RunError, RunFolder

if TYPE_CHECKING:
    from fedscore.clients.base import PartySettings

Homes = dict[str, Path]  # party -> its home (lifetime ledger, keys), see shared/party_home.py


def check_data_dir(data_dir: Path) -> None:
    for party in PARTIES:
        if not (data_dir / party).is_dir():
            raise DataError(f"{data_dir}: no {party}/ folder (expected DIR/payment and DIR/lender)")


def party_homes(overrides: list[str] | None = None) -> Homes:
    """Each party's home: `$FEDSCORE_HOME/parties/<party>` unless `party=DIR` overrides it."""
    homes = {party: default_party_home(party) for party in PARTIES}
    for item in overrides or []:
        party, sep, path = item.partition("=")
        if not sep or party not in homes or not path:
            raise RunError(f"--party-home {item!r}: expected party=DIR, e.g. lender=/srv/lender-home")
        homes[party] = Path(path)
    return homes


def party_settings(run_dir: Path, data_dir: Path, secret: str, budgets: Budgets | None = None,
                   homes: Homes | None = None) -> dict[str, PartySettings]:
    """Both parties' settings for a run in `run_dir`: each its own state folder there, its home, its budgets and the
    other's public key."""
    from fedscore.clients.base import PartySettings

    budgets = budgets or {}
    homes = {p: ensure_party_home(h) for p, h in (homes or party_homes()).items()}
    keys = pinned_keys(homes)
    folder = RunFolder(run_dir)
    return {p: PartySettings(party=p, data_path=(data_dir / p).resolve(),
                             state_dir=folder.party_state(p).resolve(), home=homes[p],
                             secret=secret, budgets=budgets.get(p, {}), peer_public_key=keys[p])
            for p in PARTIES}


def pinned_keys(homes: Homes) -> dict[str, str]:
    """For a local run the operator plays both parties: each party's public key (created in its home on first use)
    pinned in the other's settings. In a deployment each operator pins the key the other handed over, after
    comparing its fingerprint out of band."""
    from fedscore.shared.protocol.e2e import public_key_hex

    public = {p: public_key_hex(homes[p]) for p in PARTIES}
    return {"payment": public["lender"], "lender": public["payment"]}


def key_fingerprints(homes: Homes | None = None) -> dict[str, str]:
    """Each party's public key fingerprint, for the run summary and the outcome (operators compare them)."""
    from fedscore.shared.protocol.e2e import fingerprint, public_key_hex

    homes = homes or party_homes()
    return {p: fingerprint(bytes.fromhex(public_key_hex(homes[p]))) for p in PARTIES}
