"""Where a party keeps what outlives a run: its lifetime privacy ledger, its keys and what its services need.

Why not RUN_DIR: a ledger per run does not bound what a party releases over its lifetime (a second run on the same
people would start from zero). Each party chooses its own home (`--party-home`); the default is
`$FEDSCORE_HOME/parties/<party>`, with FEDSCORE_HOME defaulting to `~/.fedscore`. A run's own state (model,
optimizer, alignment) stays in RUN_DIR/parties/<party>; everything that must compose across runs, retraining and
serving lives here.

Why one type: the parties, the services and the operator's tools all open files in a home. `PartyHome` names each
file once, is the one way to lock one (filelock) and the one way to write a private one (owner-only from its first
byte, `shared/atomic.py` `write_private`), so a key or token in a home is never written any other way.

HOME/privacy-ledger.sqlite   the lifetime ledger (shared/privacy/ledger_store.py); privacy-ledger.json is the old
                             whole-file ledger, migrated on first open and kept as .migrated
HOME/identity.key, .pub      the X25519 key pair that seals payloads (shared/protocol/e2e.py), private key 0600
HOME/supernode-auth.key, .pub  the SuperNode's authentication key pair (shared/tls.py), private key 0600
HOME/e2e-runs.txt            run ids this home has set up (clients/channel.py), under e2e-runs.lock
HOME/served/                 payment: <payment part sha256>.ids, the intersection a model version may answer
HOME/online-releases.json, .lock  payment: the old per-answer counts (migrated), and the lock a serving service
                             holds for its lifetime (clients/payment/release_guard.py)
HOME/disclosures.json        what was released without DP, recorded once per kind
HOME/registry.json, champion lender: the model registry and the champion link (fedscore/registry.py)
HOME/api-token               lender: the bearer token its scoring API requires, 0600
HOME/monitor/                payment: cached monitoring releases (fedscore/monitor.py)
HOME/node/                   a party's default state folder under `fedscore node`
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from fedscore.shared.atomic import write_private
from fedscore.shared.folders import InFolder


def fedscore_home() -> Path:
    return Path(os.environ.get("FEDSCORE_HOME") or Path.home() / ".fedscore").expanduser()


def default_party_home(party: str) -> Path:
    return fedscore_home() / "parties" / party


def ensure_party_home(home: Path) -> Path:
    """Create the home (owner-only permissions: it holds the ledger, the keys and the served intersection)."""
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    return home


@dataclass(frozen=True)
class PartyHome:
    """One party's home folder. Paths are attributes; nothing is created until a method writes."""

    root: Path

    LEDGER = "privacy-ledger.sqlite"
    LEGACY_LEDGER = "privacy-ledger.json"
    IDENTITY_KEY = "identity.key"
    IDENTITY_PUB = "identity.pub"
    NODE_AUTH_KEY = "supernode-auth.key"
    NODE_AUTH_PUB = "supernode-auth.pub"
    E2E_RUNS = "e2e-runs.txt"
    E2E_RUNS_LOCK = "e2e-runs.lock"
    SERVED = "served"
    ONLINE_RELEASES = "online-releases.json"
    ONLINE_RELEASES_LOCK = "online-releases.lock"
    DISCLOSURES = "disclosures.json"
    REGISTRY = "registry.json"
    CHAMPION = "champion"
    API_TOKEN = "api-token"
    MONITOR = "monitor"
    NODE_STATE = "node"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def default(cls, party: str) -> PartyHome:
        """`$FEDSCORE_HOME/parties/<party>`."""
        return cls(default_party_home(party))

    # -- paths ---------------------------------------------------------------------------------------------------
    ledger = InFolder(LEDGER)
    legacy_ledger = InFolder(LEGACY_LEDGER)
    identity_key = InFolder(IDENTITY_KEY)
    identity_pub = InFolder(IDENTITY_PUB)
    node_auth_key = InFolder(NODE_AUTH_KEY)
    node_auth_pub = InFolder(NODE_AUTH_PUB)
    e2e_runs = InFolder(E2E_RUNS)
    served = InFolder(SERVED)
    online_releases = InFolder(ONLINE_RELEASES)
    disclosures = InFolder(DISCLOSURES)
    registry = InFolder(REGISTRY)
    champion = InFolder(CHAMPION)
    api_token = InFolder(API_TOKEN)
    monitor = InFolder(MONITOR)
    node_state = InFolder(NODE_STATE)

    # -- the one lock and the one private writer -------------------------------------------------------------------
    def lock(self, name: str) -> FileLock:
        """The file lock `name` in this home (E2E_RUNS_LOCK: held while a run id is checked and appended;
        ONLINE_RELEASES_LOCK: held by a payment service for its lifetime). The caller acquires it: blocking in a
        `with`, or `acquire(timeout=0)` to refuse at once."""
        if name not in (self.E2E_RUNS_LOCK, self.ONLINE_RELEASES_LOCK):
            raise ValueError(f"{name!r}: not a lock of a party home")
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / name)

    def write_private(self, path: Path, data: bytes | str, mode: int = 0o600, exclusive: bool = False) -> bool:
        """Write one of this home's private files (keys, tokens) owner-only from its first byte (`exclusive`: only
        if it does not exist yet; False when it did). Refuses a path outside the home."""
        path = Path(path)
        if path.parent.resolve() != self.root.resolve():
            raise ValueError(f"{path}: not a file of the party home {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        return write_private(path, data, mode, exclusive)
