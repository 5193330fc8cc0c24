"""`fedscore federate`: a real local Flower federation, every process started here and stopped here (the pieces
are fedscore/flower/launch.py's, shared with the two-machine commands in fedscore/deploy.py).

SuperLink (one HTTP port) + one SuperNode per party (its data path, state dir and the parties' shared secret in
its --node-config, which the ServerApp cannot read) + `flwr run` of a tiny app whose components are our
ServerApp (server/flower_server.py) and ClientApp (clients/flower_client.py). FLWR_HOME lives in RUN_DIR/flower.
Every process is stopped on success, failure and Ctrl-C.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from fedscore.budgets import Budgets, default_budgets
from fedscore.finish import finish_run
from fedscore.flower.launch import Federation, begin_run, follow, local_superlink_tls, record_timing
from fedscore.flower.processes import survivors
from fedscore.local_parties import Homes, check_data_dir, party_homes, party_settings
from fedscore.shared.config import FedConfig
from fedscore.shared.run_folder import DEFAULT_PARTY_TIMEOUT_S, Launch, RunError, RunFolder
from fedscore.shared.tls import node_auth_key


def run_federated(config: FedConfig, data_dir: Path, run_dir: Path,
                  progress: Callable[[str, int, int], None] | None = None, timeout_s: float = 1800.0,
                  secret: str | None = None, budgets: Budgets | None = None, homes: Homes | None = None,
                  insecure: bool = False, capture: bool = False,
                  party_timeout_s: float = DEFAULT_PARTY_TIMEOUT_S) -> dict:
    """Start the federation, run the ServerApp to the end, stop everything, and write metrics.json.

    The same deployment as `fedscore superlink` + two `fedscore node` + `fedscore run`, on one host: TLS with a
    throwaway CA (RUN_DIR/flower/pki) and SuperNode authentication with each party's key from its home, registered
    before its SuperNode starts; `insecure` serves plaintext on 127.0.0.1 without node authentication."""
    check_data_dir(data_dir)
    run_dir = run_dir.resolve()
    folder = RunFolder(run_dir)
    secret = folder.create(config, secret)
    budgets = default_budgets(config) if budgets is None else budgets
    folder.write_launch(Launch.of(data_dir, "flower", budgets, homes or party_homes(), party_timeout_s, insecure))
    if config.baselines.enabled and config.baselines.references:
        from fedscore.references import prefetch_references

        prefetch_references(data_dir, config, secret)  # tuned while the federation waits on its messages
    with folder.lock():
        return _federate(config, data_dir, run_dir, secret, budgets, homes, progress, timeout_s, insecure, capture)


def resume_federated(run_dir: Path, progress: Callable[[str, int, int], None] | None = None,
                     timeout_s: float = 1800.0, party_timeout_s: float | None = None) -> dict:
    """`fedscore federate --resume RUN_DIR`: start every process again for a run whose processes died. Each party
    worker reloads its state (model, optimizer, DP-SGD plan, alignment, channel counters) from its state directory
    and its ledger from its home; the ServerApp reloads the coordinator's checkpoint and continues the same run id.
    The crashed attempt's Flower logs are kept in RUN_DIR/flower-attempt-<n>."""
    run_dir = run_dir.resolve()
    folder = RunFolder(run_dir)
    folder.check_resumable(local=True)
    config, launch, secret = folder.read_config(), folder.read_launch(), folder.read_secret()
    data_dir, homes = Path(launch.data), launch.home_paths()
    check_data_dir(data_dir)
    with folder.lock():
        _refuse_survivors(folder)
        if party_timeout_s is not None and party_timeout_s != launch.party_timeout_s:
            folder.write_launch(launch.model_copy(update={"party_timeout_s": party_timeout_s}))
        folder.new_attempt()
        return _federate(config, data_dir, run_dir, secret, launch.budgets, homes, progress, timeout_s,
                         launch.insecure, False)


def _refuse_survivors(folder: RunFolder) -> None:
    """The crashed attempt's processes run in sessions of their own: if its launcher was killed outright they may
    still run, and a second worker of the same party must not write the same state. Refuse, naming them."""
    pids_file = folder.pids
    if not pids_file.exists():
        return
    alive = survivors(json.loads(pids_file.read_text()))
    if alive:
        raise RunError(f"the crashed attempt's processes still run: {', '.join(alive)}; stop them before resuming")


def _federate(config: FedConfig, data_dir: Path, run_dir: Path, secret: str, budgets: Budgets, homes: Homes | None,
              progress: Callable[[str, int, int], None] | None, timeout_s: float, insecure: bool,
              capture: bool) -> dict:
    start = time.perf_counter()
    progress = progress or (lambda stage, done, total: None)
    folder = RunFolder(run_dir)
    with Federation(folder.flower) as federation:
        # everything starts at once: the SuperLink; `flwr supernode register` and `flwr run`, which do their imports
        # meanwhile and act as soon as the SuperLink answers (fedscore/flower/flwr_run.py; the run also waits for the
        # app, written once the keys are registered); the workers, which load torch and opacus; and the SuperNodes,
        # which do their imports and connect once their keys are registered (the `registered` file: an
        # unregistered SuperNode is refused). A ClientApp that arrives before its worker is ready waits for the
        # worker's socket (clients/worker.py forward).
        progress("starting SuperLink, party workers, SuperNodes and the run", 0, 1)
        t0 = time.perf_counter()
        tls = None if insecure else local_superlink_tls(federation.flower_dir / "pki")
        federation.start_superlink(tls)
        federation.write_connection(federation.address, tls.ca if tls else None)
        settings = party_settings(run_dir, data_dir, secret, budgets, homes)
        keys = {party: node_auth_key(one.home) for party, one in settings.items()}
        public = {party: pub for party, (_, pub) in keys.items()}
        registering = federation.begin_register(public) if tls else {}
        runner = begin_run(federation)
        workers = {}
        for party, one in settings.items():
            one.state_dir.mkdir(parents=True, exist_ok=True)
            workers[party] = federation.start_worker(one)
        registered = federation.flower_dir / "registered"
        registered.unlink(missing_ok=True)
        for party, worker in workers.items():
            federation.start_supernode(party, {"party": party, **worker}, root_cert=tls.ca if tls else None,
                                       auth_key=keys[party][0] if tls else None, after=registered)
        nodes = federation.finish_register(registering, public) if tls else {}
        federation.write_app(run_dir, nodes, capture)
        registered.touch()
        federation.wait_healthy(tls)
        federation.wait_for_workers()
        startup_s = time.perf_counter() - t0  # until the SuperLink answers and both workers serve
        try:
            follow(run_dir, federation, runner, progress, timeout_s)
        except RunError as exc:
            raise RunError(f"{exc}{folder.resume_hint()}") from None
        federation.begin_stop()  # the processes shut down while the baselines and the report are computed
        record_timing(run_dir, start, startup_s, 0.0)
        metrics = finish_run(run_dir, data_dir, config, secret, homes)
        t_stop = time.perf_counter()
    # what the shutdown still cost after the finishing work (usually nothing)
    metrics["timing"]["teardown_s"] = time.perf_counter() - t_stop
    return metrics
