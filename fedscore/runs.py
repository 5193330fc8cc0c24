"""The in-process runners: `fedscore train` and `fedscore train --resume`, both parties as objects in this process.

The run folder's layout and its pre-resume check are shared/run_folder.py's (`RunFolder`), the budgets
fedscore/budgets.py's, the parties' homes, keys and settings fedscore/local_parties.py's, and what a finished run
writes fedscore/finish.py's; the Flower launchers (fedscore/federation.py, fedscore/deploy.py) use the same pieces.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedscore.budgets import Budgets, default_budgets
from fedscore.finish import finish_run
from fedscore.local_parties import Homes, check_data_dir, party_homes, party_settings
from fedscore.server.outcome import write_outcome
from fedscore.shared.config import FedConfig
from fedscore.shared.run_folder import Launch, Refusal, RunError, RunFolder

if TYPE_CHECKING:
    from fedscore.clients.base import PartyBase, PartySettings

Progress = Callable[[str, int, int], None]
MakeParties = Callable[[dict[str, "PartySettings"]], dict[str, "PartyBase"]]  # party settings -> party objects


def run_inprocess(config: FedConfig, data_dir: Path, run_dir: Path, progress: Progress | None = None,
                  secret: str | None = None, budgets: Budgets | None = None,
                  homes: Homes | None = None, parties: MakeParties | None = None) -> dict[str, Any]:
    """A new run in `run_dir`. `parties` builds the party objects from their settings (default: `make_party`;
    retraining passes warm-started ones, fedscore/retrain.py)."""
    from fedscore.clients.parties import make_party
    from fedscore.server.coordinator import Coordinator, new_run_id
    from fedscore.shared.protocol.transport import InProcessTransport

    check_data_dir(data_dir)
    folder = RunFolder(run_dir)
    secret = folder.create(config, secret)
    budgets = default_budgets(config) if budgets is None else budgets
    folder.write_launch(Launch.of(data_dir, "inprocess", budgets, homes or party_homes()))
    settings = party_settings(run_dir, data_dir, secret, budgets, homes)
    made = parties(settings) if parties is not None else {name: make_party(s) for name, s in settings.items()}
    coordinator = Coordinator(config, InProcessTransport(made), progress=progress,
                              run_id=new_run_id(run_dir.name), checkpoint_dir=run_dir)
    with folder.lock():
        return run_coordinator(coordinator, run_dir, data_dir, config, secret, homes)


def resume_inprocess(run_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Continue a run whose process died: each party object is rebuilt from its state directory and home (model,
    optimizer, DP-SGD plan, alignment, channel counters; lifetime ledger), the coordinator from its checkpoint."""
    from fedscore.clients.parties import make_party
    from fedscore.server.coordinator import CheckpointError, Coordinator
    from fedscore.shared.protocol.transport import InProcessTransport

    folder = RunFolder(run_dir)
    folder.check_resumable(local=True)
    config, launch, secret = folder.read_config(), folder.read_launch(), folder.read_secret()
    data_dir, homes = Path(launch.data), launch.home_paths()
    check_data_dir(data_dir)
    with folder.lock():
        settings = party_settings(run_dir, data_dir, secret, launch.budgets, homes)
        parties = {name: make_party(s) for name, s in settings.items()}
        try:
            coordinator = Coordinator.resume(config, InProcessTransport(parties), run_dir, progress)
        except CheckpointError as exc:
            raise RunError(str(exc)) from None
        folder.new_attempt()
        return run_coordinator(coordinator, run_dir, data_dir, config, secret, homes)


def run_coordinator(coordinator: Any, run_dir: Path, data_dir: Path, config: FedConfig, secret: str,
                    homes: Homes | None) -> dict[str, Any]:
    """Run the coordinator to its end (the caller holds the run folder's lock), record its outcome or the party's
    refusal, and finish the run folder (fedscore/finish.py)."""
    from fedscore.server.coordinator import PartyRefused

    start = time.perf_counter()
    error = None
    try:
        coordinator.run()
    except PartyRefused as exc:
        error = Refusal(party=exc.party, request=exc.kind, reason=exc.reason)
    timing = coordinator.result.timing
    timing["federation_s"] = timing.get("federation_s", 0.0) + time.perf_counter() - start
    write_outcome(run_dir, coordinator.result, error)
    return finish_run(run_dir, data_dir, config, secret, homes)
