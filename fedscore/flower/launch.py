"""How a Flower federation is launched: the processes of one federation (SuperLink, party workers, SuperNodes,
the `flwr` commands) and the one way a run is started on it and followed to its end.

Why one module: `fedscore federate` (fedscore/federation.py: everything on one host) and the two-machine commands
`fedscore superlink`, `fedscore node` and `fedscore run` (fedscore/deploy.py) start the same pieces; each piece is
written once here. `flwr run` always starts through `begin_run` (fedscore/flower/flwr_run.py: its imports overlap
the rest of the start-up, it acts once the app exists) and is followed by `follow`.
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
from fedscore.flower.processes import ProcessGroup, stop_on_sigterm, tied_preexec
from fedscore.flower.supernode import AFTER_ENV, FORKSERVER_ENV, LAUNCHER_SCRIPTS
from fedscore.shared.atomic import write_json_atomic, write_text_atomic
from fedscore.shared.run_folder import RunError, RunFolder
from fedscore.shared.tls import SuperLinkTls, make_local_pki
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

    def flwr_when_ready(self, args: list[str], after: Path | None = None, health: bool = True) -> list[str]:
        """Command line of `flwr ARGS` imported at once and run as soon as this federation's SuperLink answers
        (unless not `health`) and `after` exists: fedscore/flower/flwr_run.py."""
        ready = [*(["--health", self.health_url] if health else []),
                 *(["--ca", str(self.tls_ca)] if self.tls_ca and health else []),
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
                        root_cert: Path | None = None, auth_key: Path | None = None,
                        after: Path | None = None) -> None:
        """The party's SuperNode: TLS trusting `root_cert` (plaintext, loopback only, when None), authenticated with
        `auth_key` when given; with `after`, it does its imports at once and connects only once that file exists
        (fedscore/flower/supernode.py)."""
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
                   env={FORKSERVER_ENV: "flwr-clientapp", **({AFTER_ENV: str(after)} if after else {})})

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


def begin_run(federation: Federation, health: bool = True) -> subprocess.Popen:
    """`flwr run` of the app in federation's folder on the SuperLink in its $FLWR_HOME/config.toml: started at once,
    it does its imports meanwhile and acts as soon as the app is written (`Federation.write_app`) and, with
    `health`, the federation's own SuperLink answers. The only way fedscore starts a run."""
    app = federation.flower_dir / "app"
    return federation.start("flwr-run", federation.flwr_when_ready(["run", str(app), "local", "--stream"],
                                                                     after=app / "pyproject.toml", health=health))


def start_run(federation: Federation, run_dir: Path, progress: Callable[[str, int, int], None], timeout_s: float,
              nodes: dict[str, int] | None, capture: bool, t0: float) -> tuple[float, float]:
    """`fedscore run`: our app on a SuperLink already up (no health check: its address may not be this host's),
    started (`begin_run`) and followed to its end. Returns (startup seconds since t0, when the run ended)."""
    runner = begin_run(federation, health=False)
    federation.write_app(run_dir, nodes, capture)
    progress("starting run", 0, 1)
    startup_s = time.perf_counter() - t0  # until `flwr run` is launched
    follow(run_dir, federation, runner, progress, timeout_s)
    return startup_s, time.perf_counter()


def record_timing(run_dir: Path, start: float, startup_s: float, teardown_s: float) -> None:
    """The ServerApp's outcome must exist; its timing is completed with what the launcher measured."""
    folder = RunFolder(run_dir)
    if not folder.outcome.exists():
        log = (folder.flower / "logs" / "flwr-run.log").read_text(errors="replace")[-3000:]
        raise RunError(f"the ServerApp wrote no outcome; `flwr run` log ends:\n{log}{folder.resume_hint()}")
    outcome = folder.read_outcome()
    outcome["timing"].update(federation_s=time.perf_counter() - start, startup_s=startup_s, teardown_s=teardown_s)
    write_json_atomic(folder.outcome, outcome)


def follow(run_dir: Path, federation: Federation, runner: subprocess.Popen,
            progress: Callable[[str, int, int], None], timeout_s: float) -> None:
    """Relay the ServerApp's progress lines until `flwr run` ends; fail fast if a federation process dies."""
    folder = RunFolder(run_dir)
    progress_file = folder.progress
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
        if folder.outcome.exists():
            # the ServerApp has finished; `flwr run --stream` may linger on log streaming, which nobody reads:
            # give it a moment, then the teardown stops it
            with suppress(subprocess.TimeoutExpired):
                runner.wait(timeout=0.5)
            return True
        return False

    wait_until(finished, timeout_s, 0.3, "the federation did not finish", RunError)
