"""`fedscore federate`: a real local Flower federation, every process started here and stopped here.

SuperLink (one HTTP port) + one SuperNode per party (its data path, state dir and the parties' shared secret in
its --node-config, which the ServerApp cannot read) + `flwr run` of a tiny app whose components are our
ServerApp (server/flower_server.py) and ClientApp (clients/flower_client.py). FLWR_HOME lives in RUN_DIR/flower.
Every process is stopped on success, failure and Ctrl-C.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import closing, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedscore.flower.flwr_run import superlink_healthy
from fedscore.flower.processes import ProcessGroup, stop_on_sigterm, survivors, tied_preexec
from fedscore.flower.supernode import FORKSERVER_ENV, LAUNCHER_SCRIPTS
from fedscore.runs import (
    DEFAULT_PARTY_TIMEOUT_S,
    Budgets,
    Homes,
    RunError,
    check_data_dir,
    default_budgets,
    finish_run,
    party_settings,
    prepare_run_dir,
    read_launch,
    record_launch,
    resume_hint,
    run_lock,
    set_aside_outcome,
)
from fedscore.shared.atomic import write_json_atomic, write_text_atomic
from fedscore.shared.config import FedConfig
from fedscore.shared.tls import SuperLinkTls, make_local_pki, node_auth_key
from fedscore.shared.waiting import wait_until

if TYPE_CHECKING:
    from fedscore.clients.base import PartySettings

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedscore-federation"
version = "0.1.0"
description = "fedscore vertical credit scoring (components live in the installed fedscore package)"
dependencies = []

[tool.flwr.app]
publisher = "fedscore"

[tool.flwr.app.components]
serverapp = "fedscore.server.flower_server:app"
clientapp = "fedscore.clients.flower_client:app"

[tool.flwr.app.config]
run-dir = {run_dir}
nodes = {nodes}
capture = {capture}
"""


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[IPv6]:PORT') -> (host, port), with a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RunError(f"{address!r}: expected HOST:PORT, e.g. 10.0.0.5:9093")
    return host.strip("[]"), int(port)


def refuse_insecure_off_loopback(host: str, what: str) -> None:
    """`--insecure` is plaintext: allowed only when every byte stays on this machine."""
    if not is_loopback(host):
        raise RunError(f"--insecure is loopback-only: {what} {host} is not a loopback address; drop --insecure and "
                       "use TLS (the default; `fedscore certs --out DIR --server-name HOST` makes a local set)")


def local_superlink_tls(folder: Path) -> SuperLinkTls:
    """A throwaway CA and SuperLink certificate for a one-host federation (the CA key is discarded)."""
    pki = make_local_pki(folder, server_names=["localhost", "127.0.0.1"], clients=[], server="superlink")
    return SuperLinkTls(ca=pki.ca, cert=pki.server_cert, key=pki.server_key)


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


UNIX_SOCKET_MAX = 100  # bytes of a socket path (the kernel's limit is 108 with the terminating NUL)


def worker_socket_path(settings: PartySettings) -> Path:
    """In the party's run state directory when the path fits a Unix socket, else in a fresh private (0700)
    temporary folder: either way only this user can reach it, and the worker checks a per-run token besides."""
    candidate = settings.state_dir / "worker.sock"
    if len(str(candidate).encode()) <= UNIX_SOCKET_MAX:
        return candidate
    return Path(tempfile.mkdtemp(prefix="fedscore-")) / f"{settings.party}.sock"


def _quote(value: str) -> str:
    if '"' in value:
        raise RunError(f"path {value!r} contains a double quote, which Flower's --node-config cannot carry")
    return f'"{value}"'


class Federation(ProcessGroup):
    """The processes of one local federation (fedscore/flower/processes.py); a context manager that always stops
    them, a SIGTERM included."""

    def __init__(self, flower_dir: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.flower_dir = flower_dir
        self.home = flower_dir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
               "PYTHONWARNINGS": "ignore::UserWarning:google.protobuf.runtime_version",
               "PYTHONUNBUFFERED": "1",
               # the SuperExec asks for new tasks every second by default: a message waits ~0.5 s less
               "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05",
               # Flower starts helpers (flower-superexec, flwr-clientapp) by name: our faster flwr-clientapp
               # first (fedscore/flower/supernode.py), then this venv
               "PATH": os.pathsep.join([str(self._clientapp_shim()), str(Path(sys.executable).parent),
                                        os.environ.get("PATH", "")])}
        # every process Flower starts inherits FLWR_HOME: the teardown finds the detached ones by it
        super().__init__(flower_dir, env, ("FLWR_HOME", str(self.home)), RunError)
        # SuperNodes first, then the workers, then the SuperLink
        self.stop_rank = lambda name: {"superlink": 2}.get(name, 1 if name.startswith("worker-") else 0)
        self.sockets: list[Path] = []
        self.host = host  # the SuperLink's bind address (`start_superlink`)
        self.port = port or free_port()
        self.tls_ca: Path | None = None  # the CA that signed the SuperLink's certificate, once started with TLS

    def _clientapp_shim(self) -> Path:
        """A folder holding Flower's `flwr-clientapp`, `flwr-serverapp` and `flower-superexec` as fedscore launches
        them: the same code, started faster (lighter imports; app processes forked from a warm fork server,
        fedscore/flower/supernode.py and fedscore/flower/forkserver.py)."""
        folder = self.flower_dir / "bin"
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in LAUNCHER_SCRIPTS.items():
            script = folder / name
            script.write_text(text.format(python=sys.executable))
            script.chmod(0o755)
        return folder

    def start_worker(self, settings: PartySettings) -> dict[str, str]:
        """The party's long-lived worker (clients/worker.py): settings and a fresh token on its stdin, never on a
        command line. Returns the node-config entries its ClientApp needs to reach it."""
        token = secrets.token_hex(16)
        socket_path = worker_socket_path(settings)
        self.start(f"worker-{settings.party}", [sys.executable, "-m", "fedscore.clients.worker", "--socket",
                                                str(socket_path)],
                   stdin=json.dumps({"settings": settings.model_dump(mode="json"), "token": token}).encode())
        self.sockets.append(socket_path)
        return {"worker-socket": str(socket_path), "worker-token": token}

    def wait_for_workers(self, timeout_s: float = 120.0) -> None:
        def ready() -> bool:
            self.check_alive()
            return all(path.exists() for path in self.sockets)

        wait_until(ready, timeout_s, 0.1, "the party workers did not start", RunError)

    def check_alive(self, allowed_to_exit: tuple[str, ...] = ("flwr-run",)) -> None:
        super().check_alive(allowed_to_exit)

    def start_superlink(self, tls: SuperLinkTls | None, auth: bool = True) -> None:
        """Start it and return at once: the workers start meanwhile (`wait_healthy` waits). TLS with `tls`, and then
        SuperNode authentication (only registered keys may join) unless `auth` is False; plaintext on loopback
        only without it."""
        self.tls_ca = tls.ca if tls else None
        if tls is None:
            refuse_insecure_off_loopback(self.host, "the SuperLink's --host")
            security = ["--insecure"]
        else:
            security = ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile",
                        str(tls.key), *(["--enable-supernode-auth"] if auth else [])]
        self.start("superlink", [_bin("flower-superlink"), *security, "--disable-runtime-dependency-installation",
                                 "--host", self.host, "--port", str(self.port)],
                   env={FORKSERVER_ENV: "flwr-serverapp"})

    @property
    def address(self) -> str:
        """Where processes on this host reach the SuperLink."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://{self.address}/health"

    def wait_healthy(self, tls: SuperLinkTls | None = None, timeout_s: float = 60.0) -> None:
        url = self.health_url
        wildcard = self.host in ("0.0.0.0", "::", "")

        def healthy() -> bool:
            self.check_alive()
            return superlink_healthy(url, tls.ca if tls else None, check_hostname=not wildcard)

        wait_until(healthy, timeout_s, 0.3, f"SuperLink not healthy at {url}", RunError)

    def flwr_when_ready(self, args: list[str], after: Path | None = None) -> list[str]:
        """Command line of `flwr ARGS` imported at once and run as soon as the SuperLink answers (and `after`
        exists): fedscore/flower/flwr_run.py."""
        ready = ["--health", self.health_url, *(["--ca", str(self.tls_ca)] if self.tls_ca else []),
                 *(["--after", str(after)] if after else [])]
        return [sys.executable, "-m", "fedscore.flower.flwr_run", *ready, "--", *args]

    def write_connection(self, address: str, ca: Path | None) -> None:
        """$FLWR_HOME/config.toml: the `local` connection `flwr run` and `flwr supernode register` use, trusting
        `ca` (TLS) or plaintext when None."""
        security = f"root-certificates = {json.dumps(str(ca))}\n" if ca is not None else "insecure = true\n"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = {json.dumps(address)}\n{security}')

    def begin_register(self, public_keys: dict[str, Path]) -> dict[str, subprocess.Popen]:
        """Start registering each party's SuperNode key with the SuperLink (`flwr supernode register`, in parallel,
        each as soon as the SuperLink answers): only these keys may join. `finish_register` collects the ids."""
        return {party: subprocess.Popen(self.flwr_when_ready(["supernode", "register", str(key), "local", "--format",
                                                              "json"]),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                                        cwd=self.flower_dir, text=True, preexec_fn=tied_preexec())
                for party, key in public_keys.items()}

    def finish_register(self, procs: dict[str, subprocess.Popen], public_keys: dict[str, Path],
                        timeout_s: float = 90.0) -> dict[str, int]:
        """Party -> the node id the SuperLink registered for its key."""
        nodes: dict[str, int] = {}
        for party, proc in procs.items():
            try:
                output = proc.communicate(timeout=timeout_s)[0]
            except subprocess.TimeoutExpired:  # a registration that hangs is killed and reported
                proc.kill()
                output = proc.communicate()[0] + f"\n(no answer within {timeout_s:.0f} s)"
            try:
                reply = json.loads(output[output.index("{"):])
            except ValueError:
                reply = {}
            if not reply.get("success"):
                reason = reply.get("error-message") or output.strip()[-500:]
                raise RunError(f"could not register the {party} SuperNode key {public_keys[party]}: "
                               f"{' '.join(str(reason).split())}")
            nodes[party] = int(reply["node-id"])
        return nodes

    def register_nodes(self, public_keys: dict[str, Path], timeout_s: float = 90.0) -> dict[str, int]:
        """Register each party's SuperNode key (both at once); party -> node id."""
        return self.finish_register(self.begin_register(public_keys), public_keys, timeout_s)

    def start_supernode(self, party: str, node_config: dict[str, str], superlink: str | None = None,
                        root_cert: Path | None = None, auth_key: Path | None = None) -> None:
        """The party's SuperNode: TLS trusting `root_cert` (plaintext, loopback only, when None), authenticated with
        `auth_key` when given."""
        superlink = superlink or self.address
        if root_cert is None:
            refuse_insecure_off_loopback(split_address(superlink)[0], "the SuperLink address")
            security = ["--insecure"]
        else:
            security = ["--root-certificates", str(root_cert)]
        if auth_key is not None:
            security += ["--auth-supernode-private-key", str(auth_key)]
        config = " ".join(f"{k}={_quote(v)}" for k, v in node_config.items())
        self.start(f"supernode-{party}", [sys.executable, "-m", "fedscore.flower.supernode", *security, "--superlink",
                                          superlink, "--port", str(free_port()), "--node-config", config],
                   env={FORKSERVER_ENV: "flwr-clientapp"})

    def write_app(self, run_dir: Path, nodes: dict[str, int] | None = None, capture: bool = False) -> Path:
        """The Flower app. `nodes` (party -> node id, the registered SuperNodes) restricts the ServerApp to those
        nodes; `capture` (tests only) makes it record every reply it receives in RUN_DIR/capture."""
        app = self.flower_dir / "app"
        app.mkdir(exist_ok=True)
        # atomic: a `flwr run` waiting for this file (fedscore/flower/flwr_run.py --after) never reads half of it
        write_text_atomic(app / "pyproject.toml", APP_PYPROJECT.format(
            run_dir=json.dumps(str(run_dir)), nodes=json.dumps(json.dumps(nodes or {})),
            capture=json.dumps(capture)))
        return app

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every process (`ProcessGroup.stop`); the workers' sockets are removed."""
        super().stop(grace_s)
        for path in self.sockets:
            path.unlink(missing_ok=True)

    def __enter__(self) -> Federation:
        # a SIGTERM (a service manager, a CI timeout, `kill`) stops the federation like Ctrl-C does
        self._sigterm = stop_on_sigterm()
        self._sigterm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        finally:
            self._sigterm.__exit__(None, None, None)


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
    secret = prepare_run_dir(run_dir, config, secret)
    budgets = default_budgets(config) if budgets is None else budgets
    record_launch(run_dir, data_dir, "flower", budgets, homes, party_timeout_s, insecure=insecure)
    if config.baselines.enabled and config.baselines.references:
        from fedscore.references import prefetch_references

        prefetch_references(data_dir, config, secret)  # tuned while the federation waits on its messages
    with run_lock(run_dir):
        return _federate(config, data_dir, run_dir, secret, budgets, homes, progress, timeout_s, insecure, capture)


def resume_federated(run_dir: Path, progress: Callable[[str, int, int], None] | None = None,
                     timeout_s: float = 1800.0, party_timeout_s: float | None = None) -> dict:
    """`fedscore federate --resume RUN_DIR`: start every process again for a run whose processes died. Each party
    worker reloads its state (model, optimizer, DP-SGD plan, alignment, channel counters) from its state directory
    and its ledger from its home; the ServerApp reloads the coordinator's checkpoint and continues the same run id.
    The crashed attempt's Flower logs are kept in RUN_DIR/flower-attempt-<n>."""
    from fedscore.server.coordinator import CHECKPOINT_FILE, Checkpoint

    run_dir = run_dir.resolve()
    config, data_dir, secret, budgets, homes, launch = read_launch(run_dir)
    check_data_dir(data_dir)
    if not (run_dir / CHECKPOINT_FILE).exists():
        raise RunError(f"{run_dir}: no {CHECKPOINT_FILE}: the run stopped before its coordinator started; start a "
                       "new run (what the parties charged stays charged)")
    checkpoint = Checkpoint.model_validate_json((run_dir / CHECKPOINT_FILE).read_text())
    if checkpoint.next_step >= checkpoint.total_steps:
        raise RunError(f"{run_dir}: run {checkpoint.run_id!r} already finished all its steps")
    with run_lock(run_dir):
        _refuse_survivors(run_dir / "flower")
        if party_timeout_s is not None and party_timeout_s != launch.get("party_timeout_s"):
            record_launch(run_dir, data_dir, "flower", budgets, homes, party_timeout_s,
                          insecure=bool(launch.get("insecure", False)))
        set_aside_outcome(run_dir)
        if (run_dir / "flower").exists():
            attempts = len(list(run_dir.glob("flower-attempt-*"))) + 1
            (run_dir / "flower").rename(run_dir / f"flower-attempt-{attempts}")
        return _federate(config, data_dir, run_dir, secret, budgets, homes, progress, timeout_s,
                         bool(launch.get("insecure", False)), False)


def _refuse_survivors(flower_dir: Path) -> None:
    """The crashed attempt's processes run in sessions of their own: if its launcher was killed outright they may
    still run, and a second worker of the same party must not write the same state. Refuse, naming them."""
    pids_file = flower_dir / "pids.json"
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
    with Federation(run_dir / "flower") as federation:
        # everything starts at once: the SuperLink; `flwr supernode register` and `flwr run`, which do their imports
        # meanwhile and act as soon as the SuperLink answers (fedscore/flower/flwr_run.py; the run also waits for the
        # app, written once the keys are registered); the workers, which load torch and opacus; then the
        # SuperNodes, once their keys are registered (an unregistered SuperNode is refused). A ClientApp that
        # arrives before its worker is ready waits for the worker's socket (clients/worker.py forward).
        progress("starting SuperLink, party workers, SuperNodes and the run", 0, 1)
        t0 = time.perf_counter()
        tls = None if insecure else local_superlink_tls(federation.flower_dir / "pki")
        federation.start_superlink(tls)
        federation.write_connection(federation.address, tls.ca if tls else None)
        settings = party_settings(run_dir, data_dir, secret, budgets, homes)
        keys = {party: node_auth_key(one.home) for party, one in settings.items()}
        public = {party: pub for party, (_, pub) in keys.items()}
        registering = federation.begin_register(public) if tls else {}
        app = federation.flower_dir / "app"
        runner = federation.start("flwr-run", federation.flwr_when_ready(["run", str(app), "local", "--stream"],
                                                                         after=app / "pyproject.toml"))
        workers = {}
        for party, one in settings.items():
            one.state_dir.mkdir(parents=True, exist_ok=True)
            workers[party] = federation.start_worker(one)
        nodes = federation.finish_register(registering, public) if tls else {}
        federation.write_app(run_dir, nodes, capture)
        for party, worker in workers.items():
            federation.start_supernode(party, {"party": party, **worker}, root_cert=tls.ca if tls else None,
                                       auth_key=keys[party][0] if tls else None)
        federation.wait_healthy(tls)
        federation.wait_for_workers()
        startup_s = time.perf_counter() - t0  # until the SuperLink answers and both workers serve
        try:
            _follow(run_dir, federation, runner, progress, timeout_s)
        except RunError as exc:
            raise RunError(f"{exc}{resume_hint(run_dir)}") from None
        federation.begin_stop()  # the processes shut down while the baselines and the report are computed
        record_timing(run_dir, start, startup_s, 0.0)
        metrics = finish_run(run_dir, data_dir, config, secret, homes)
        t_stop = time.perf_counter()
    # what the shutdown still cost after the finishing work (usually nothing)
    metrics["timing"]["teardown_s"] = time.perf_counter() - t_stop
    return metrics


def start_run(federation: Federation, run_dir: Path, progress: Callable[[str, int, int], None], timeout_s: float,
              nodes: dict[str, int] | None, capture: bool, t0: float) -> tuple[float, float]:
    """`flwr run` of our app on the SuperLink in federation's $FLWR_HOME/config.toml, followed to its end (shared by
    `fedscore federate` and `fedscore run`). Returns (startup seconds since t0, when the run ended)."""
    app = federation.write_app(run_dir, nodes, capture)
    progress("starting run", 0, 1)
    runner = federation.start("flwr-run", [_bin("flwr"), "run", str(app), "local", "--stream"])
    startup_s = time.perf_counter() - t0  # until `flwr run` is launched
    _follow(run_dir, federation, runner, progress, timeout_s)
    return startup_s, time.perf_counter()


def record_timing(run_dir: Path, start: float, startup_s: float, teardown_s: float) -> None:
    """The ServerApp's outcome must exist; its timing is completed with what the launcher measured."""
    if not (run_dir / "outcome.json").exists():
        log = (run_dir / "flower" / "logs" / "flwr-run.log").read_text(errors="replace")[-3000:]
        raise RunError(f"the ServerApp wrote no outcome; `flwr run` log ends:\n{log}{resume_hint(run_dir)}")
    outcome = json.loads((run_dir / "outcome.json").read_text())
    outcome["timing"].update(federation_s=time.perf_counter() - start, startup_s=startup_s, teardown_s=teardown_s)
    write_json_atomic(run_dir / "outcome.json", outcome)


def _follow(run_dir: Path, federation: Federation, runner: subprocess.Popen,
            progress: Callable[[str, int, int], None], timeout_s: float) -> None:
    """Relay the ServerApp's progress lines until `flwr run` ends; fail fast if a federation process dies."""
    progress_file = run_dir / "progress.jsonl"
    seen = 0

    def finished() -> bool:
        nonlocal seen
        if runner.poll() is not None:
            return True
        federation.check_alive()
        if progress_file.exists():
            lines = progress_file.read_text().splitlines()
            for line in lines[seen:]:
                event = json.loads(line)
                progress(event["stage"], event["done"], event["total"])
            seen = len(lines)
        if (run_dir / "outcome.json").exists():
            # the ServerApp has finished; `flwr run --stream` may linger on log streaming, which nobody reads:
            # give it a moment, then the teardown stops it
            with suppress(subprocess.TimeoutExpired):
                runner.wait(timeout=0.5)
            return True
        return False

    wait_until(finished, timeout_s, 0.3, "the federation did not finish", RunError)
