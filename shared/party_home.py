"""Where a party keeps what outlives a run: its lifetime privacy ledger and what its services need.

Why not RUN_DIR: a ledger per run does not bound what a party releases over its lifetime (a second run on the same
people would start from zero). Each party chooses its own home (`--party-home`); the default is
`$FEDSCORE_HOME/parties/<party>`, with FEDSCORE_HOME defaulting to `~/.fedscore`. A run's own state (model,
optimizer, alignment) stays in RUN_DIR/parties/<party>; everything that must compose across runs, retraining and
serving lives here.
"""

from __future__ import annotations

import os
from pathlib import Path

LEDGER_FILE = "privacy-ledger.sqlite"  # the party's lifetime ledger, in its home (shared/privacy/ledger_store.py)
LEGACY_LEDGER_FILE = "privacy-ledger.json"  # the old whole-file ledger, migrated on first open, kept as .migrated
SERVED_DIR = "served"  # payment: served/<payment part sha256>.ids, the intersection a model version may answer


def fedscore_home() -> Path:
    return Path(os.environ.get("FEDSCORE_HOME") or Path.home() / ".fedscore").expanduser()


def default_party_home(party: str) -> Path:
    return fedscore_home() / "parties" / party


def ensure_party_home(home: Path) -> Path:
    """Create the home (owner-only permissions: it holds the ledger and the served intersection)."""
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    return home
