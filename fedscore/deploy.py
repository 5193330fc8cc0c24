"""Two institutions, two machines: what `fedscore superlink`, `fedscore node` and `fedscore run` do.

The same pieces as the one-host `fedscore federate` (fedscore/flower/launch.py: the process group, the SuperLink's
TLS and SuperNode registration, the party worker beside its SuperNode, `flwr run` and following it;
shared/run_folder.py and fedscore/finish.py: the run folder and metrics), split by who runs them:

- the coordinator's operator: `fedscore superlink` (TLS with its certificate; only the SuperNode keys the parties
  handed over may join; writes DIR/nodes.json with the node id registered for each party) and `fedscore run` on the
  same host (the ServerApp runs inside the SuperLink's host and writes RUN_DIR there);
- each party on its own machine: `fedscore node` (its long-lived worker and its SuperNode, with its own data, party
  home, budget, keys and the secret the two parties share, which never reaches the coordinator).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedscore.flower.launch import Federation, record_timing, split_address, start_run
from fedscore.flower.patches import REFUSED_MARKERS
from fedscore.shared.atomic import write_json_atomic
from fedscore.shared.config import FedConfig
from fedscore.shared.run_folder import RunError, RunFolder
from fedscore.shared.tls import SuperLinkTls, node_key_fingerprint

if TYPE_CHECKING:
    from fedscore.clients.base import PartySettings

NODES_FILE = "nodes.json"  # in the SuperLink's folder: party -> registered node id and key fingerprint


def serve_superlink(folder: Path, host: str, port: int, tls: SuperLinkTls | None, keys: dict[str, Path],
                    on_ready: Callable[[dict[str, Any]], None], until: Callable[[], bool] = lambda: False) -> None:
    """Start the SuperLink, register the parties' SuperNode keys, write FOLDER/nodes.json, then keep it up until
    Ctrl-C / SIGTERM (or `until()`). Without `tls`: plaintext, loopback only, no node authentication."""
    if tls is not None:
        tls.check()
        missing = [p for p in ("payment", "lender") if p not in keys]
        if missing:
            raise RunError(f"node authentication needs both parties' SuperNode keys: pass --register for "
                           f"{', '.join(missing)} (PARTY=their supernode-auth.pub)")
    elif keys:
        raise RunError("--register needs TLS: Flower authenticates SuperNodes over TLS only (drop --insecure)")
    prints = {party: node_key_fingerprint(path) for party, path in keys.items()}
    folder = folder.resolve()
    with Federation(folder / "flower", host=host, port=port) as link:
        link.start_superlink(tls)
        link.wait_healthy(tls)
        link.write_connection(link.address, tls.ca if tls else None)
        nodes = link.register_nodes(keys) if keys else {}
        info = {"address": f"{host}:{port}", "tls": tls is not None, "node_auth": bool(keys),
                "nodes": {p: {"node_id": nodes[p], "key_fingerprint": prints[p]} for p in nodes}}
        write_json_atomic(folder / NODES_FILE, info)
        on_ready(info)
        while not until():
            link.check_alive()
            time.sleep(0.5)


def serve_node(settings: PartySettings, superlink: str, ca: Path | None, auth_key: Path | None, folder: Path,
               on_ready: Callable[[], None], until: Callable[[], bool] = lambda: False) -> None:
    """Start this party's worker and its SuperNode (TLS trusting `ca`, authenticated with `auth_key`) and keep them
    up until Ctrl-C / SIGTERM (or `until()`); a SuperNode the SuperLink refuses ends the command with the reason."""
    host, _ = split_address(superlink)
    if ca is None:
        from fedscore.flower.launch import refuse_insecure_off_loopback

        refuse_insecure_off_loopback(host, "the SuperLink address")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with Federation(folder.resolve()) as node:
        worker = node.start_worker(settings)
        node.start_supernode(settings.party, {"party": settings.party, **worker}, superlink=superlink, root_cert=ca,
                             auth_key=auth_key)
        try:
            node.wait_for_workers()
            on_ready()
            while not until():
                node.check_alive()
                time.sleep(0.5)
        except RunError:
            log = node.logs / f"supernode-{settings.party}.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            if any(marker in text for marker in REFUSED_MARKERS):
                raise RunError(f"the SuperLink at {superlink} refused this SuperNode: its key "
                               f"{'(none given)' if auth_key is None else auth_key} is not registered there; send "
                               "the coordinator's operator your supernode-auth.pub (`fedscore keys`) and compare "
                               "its fingerprint out of band") from None
            raise


def run_on_superlink(config: FedConfig, superlink: str, run_dir: Path, ca: Path | None,
                     nodes: dict[str, int] | None = None, progress: Callable[[str, int, int], None] | None = None,
                     timeout_s: float = 1800.0) -> dict[str, Any]:
    """Start a run on a SuperLink on this host, follow it, and write RUN_DIR (outcome, the metrics the lender
    shared: no baselines, which stay with the lender and the parties' data; privacy report). `nodes` (party -> node
    id, from the SuperLink's nodes.json) restricts the ServerApp to the registered SuperNodes."""
    host, _ = split_address(superlink)
    if ca is None:
        from fedscore.flower.launch import refuse_insecure_off_loopback

        refuse_insecure_off_loopback(host, "the SuperLink address")
    run_dir = run_dir.resolve()
    RunFolder(run_dir).create(config, shared_secret=False)  # the coordinator never holds the parties' secret
    return _run_and_finish(config, superlink, run_dir, ca, nodes, progress, timeout_s)


def resume_on_superlink(run_dir: Path, superlink: str, ca: Path | None, nodes: dict[str, int] | None = None,
                        progress: Callable[[str, int, int], None] | None = None,
                        timeout_s: float = 1800.0) -> dict[str, Any]:
    """`fedscore run --resume RUN_DIR`: the coordinator's side of a resume. The ServerApp continues the same run
    (same run id and config) from RUN_DIR/checkpoint.json; each party's node must be up again (`fedscore node` with
    the same party home and state folder: its worker reloads its state, and a step whose reply already left is
    answered from the saved copy, never drawn or charged again)."""
    run_dir = run_dir.resolve()
    folder = RunFolder(run_dir)
    folder.check_resumable(local=False)
    config = folder.read_config()
    with folder.lock():
        folder.new_attempt()
        return _run_and_finish(config, superlink, run_dir, ca, nodes, progress, timeout_s)


def _run_and_finish(config: FedConfig, superlink: str, run_dir: Path, ca: Path | None, nodes: dict[str, int] | None,
                    progress: Callable[[str, int, int], None] | None, timeout_s: float) -> dict[str, Any]:
    progress = progress or (lambda stage, done, total: None)
    start = time.perf_counter()
    with Federation(RunFolder(run_dir).flower) as runner:
        runner.write_connection(superlink, ca)
        startup_s, t_stop = start_run(runner, run_dir, progress, timeout_s, nodes, False, start)
    record_timing(run_dir, start, startup_s, time.perf_counter() - t_stop)
    from fedscore.finish import finish_run  # torch and the accountant: `fedscore superlink` never needs them

    return finish_run(run_dir, None, config, None, fingerprints={}, bundle=False)


def read_nodes(path: Path) -> dict[str, int]:
    """party -> node id from a SuperLink's nodes.json."""
    try:
        info = json.loads(Path(path).read_text())
        return {party: int(entry["node_id"]) for party, entry in info["nodes"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: not a nodes.json written by `fedscore superlink` ({exc})") from None
