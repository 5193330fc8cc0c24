"""`fedscore blacklist`: the blacklist check between the two parties a local operator plays (a three-row session of
its own, `blacklist_plan` in shared/protocol/steps.py), outside any training run."""

from __future__ import annotations

import secrets
from pathlib import Path

from fedscore.local_parties import Homes, check_data_dir, party_settings
from fedscore.shared.run_folder import RunError


def run_blacklist(data_dir: Path, run_dir: Path, secret: str | None = None, homes: Homes | None = None) -> Path:
    """The blacklist check between the two local parties; returns the lender's hits file (its own state dir)."""
    from fedscore.clients.parties import make_party
    from fedscore.server.coordinator import PartyRefused, check_blacklist
    from fedscore.shared.protocol.transport import InProcessTransport

    check_data_dir(data_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = party_settings(run_dir, data_dir, secret or secrets.token_hex(16), homes=homes)
    try:
        check_blacklist(InProcessTransport({name: make_party(s) for name, s in settings.items()}))
    except PartyRefused as exc:
        raise RunError(f"blacklist check stopped: {exc}") from exc
    return settings["lender"].state_dir / "blacklist-hits.csv"
