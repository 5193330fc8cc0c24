"""`fedscore federate`: a real local Flower federation, every process started here and stopped here.

SuperLink (one HTTP port) + one SuperNode per party (its data path, state dir and the parties' shared secret in
its --node-config, which the ServerApp cannot read) + `flwr run` of a tiny app whose components are our
ServerApp (server/flower_server.py) and ClientApp (clients/flower_client.py). FLWR_HOME lives in RUN_DIR/flower.
Every process is stopped on success, failure and Ctrl-C.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import closing, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from fedscore.shared.config import FedConfig
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
"""


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


class Federation:
    """The processes of one local federation; a context manager that always stops them."""

    def __init__(self, flower_dir: Path) -> None:
        self.flower_dir = flower_dir
        self.logs = flower_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home = flower_dir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "PYTHONWARNINGS": "ignore::UserWarning:google.protobuf.runtime_version",
                    "PYTHONUNBUFFERED": "1",
                    # the SuperExec asks for new tasks every second by default: a message waits ~0.5 s less
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05",
                    # Flower starts helpers (flower-superexec, flwr-clientapp) by name: our faster flwr-clientapp
                    # first (fedscore/supernode.py), then this venv
                    "PATH": os.pathsep.join([str(self._clientapp_shim()), str(Path(sys.executable).parent),
                                             os.environ.get("PATH", "")])}
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.sockets: list[Path] = []
        self.port = free_port()

    def _clientapp_shim(self) -> Path:
        """A folder holding a `flwr-clientapp` that starts faster than Flower's own (same code, lighter imports)."""
        from fedscore.supernode import CLIENTAPP_SCRIPT

        folder = self.flower_dir / "bin"
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / "flwr-clientapp"
        script.write_text(CLIENTAPP_SCRIPT.format(python=sys.executable))
        script.chmod(0o755)
        return folder

    def start(self, name: str, args: list[str], stdin: bytes | None = None) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.flower_dir,
                                start_new_session=True,
                                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE)
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        self.processes.append((name, proc))
        (self.flower_dir / "pids.json").write_text(json.dumps({n: p.pid for n, p in self.processes}))
        return proc

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

    def check_alive(self) -> None:
        for name, proc in self.processes:
            if proc.poll() is not None and name != "flwr-run":
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RunError(f"{name} exited with code {proc.returncode}; its log ends:\n{tail}")

    def start_superlink(self) -> None:
        """Start it and return at once: the workers and SuperNodes start meanwhile (`wait_healthy` waits)."""
        self.start("superlink", [_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                                 "--host", "127.0.0.1", "--port", str(self.port)])

    def wait_healthy(self, timeout_s: float = 60.0) -> None:

        def healthy() -> bool:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as reply:
                    return bool(reply.status == 200)
            except OSError:
                return False

        wait_until(healthy, timeout_s, 0.3, f"SuperLink not healthy on port {self.port}", RunError)

    def start_supernode(self, party: str, node_config: dict[str, str]) -> None:
        config = " ".join(f"{k}={_quote(v)}" for k, v in node_config.items())
        self.start(f"supernode-{party}", [sys.executable, "-m", "fedscore.supernode", "--insecure", "--superlink",
                                          f"127.0.0.1:{self.port}", "--port", str(free_port()),
                                          "--node-config", config])

    def write_app(self, run_dir: Path) -> Path:
        app = self.flower_dir / "app"
        app.mkdir(exist_ok=True)
        (app / "pyproject.toml").write_text(APP_PYPROJECT.format(run_dir=json.dumps(str(run_dir))))
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n")
        return app

    def stop(self) -> None:
        """SuperNodes first, then the workers, then the SuperLink: SIGTERM to each process group, SIGKILL after a
        grace period; the workers' sockets are removed."""
        rank = {"superlink": 2}
        order = sorted(self.processes, key=lambda item: rank.get(item[0], 1 if item[0].startswith("worker-") else 0))
        for _, proc in order:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in order:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for path in self.sockets:
            path.unlink(missing_ok=True)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run_federated(config: FedConfig, data_dir: Path, run_dir: Path,
                  progress: Callable[[str, int, int], None] | None = None, timeout_s: float = 1800.0,
                  secret: str | None = None, budgets: Budgets | None = None, homes: Homes | None = None,
                  party_timeout_s: float = DEFAULT_PARTY_TIMEOUT_S) -> dict:
    """Start the federation, run the ServerApp to the end, stop everything, and write metrics.json."""
    check_data_dir(data_dir)
    run_dir = run_dir.resolve()
    secret = prepare_run_dir(run_dir, config, secret)
    budgets = default_budgets(config) if budgets is None else budgets
    record_launch(run_dir, data_dir, "flower", budgets, homes, party_timeout_s)
    with run_lock(run_dir):
        return _federate(config, data_dir, run_dir, secret, budgets, homes, progress, timeout_s)


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
            record_launch(run_dir, data_dir, "flower", budgets, homes, party_timeout_s)
        set_aside_outcome(run_dir)
        if (run_dir / "flower").exists():
            attempts = len(list(run_dir.glob("flower-attempt-*"))) + 1
            (run_dir / "flower").rename(run_dir / f"flower-attempt-{attempts}")
        return _federate(config, data_dir, run_dir, secret, budgets, homes, progress, timeout_s)


def _refuse_survivors(flower_dir: Path) -> None:
    """The crashed attempt's processes run in sessions of their own: if its launcher was killed outright they may
    still run, and a second worker of the same party must not write the same state. Refuse, naming them."""
    pids_file = flower_dir / "pids.json"
    if not pids_file.exists():
        return
    alive = []
    for name, pid in json.loads(pids_file.read_text()).items():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            status = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            continue
        if status != "Z" and (b"fedscore" in cmdline or b"flwr" in cmdline or b"flower" in cmdline):
            alive.append(f"{name} (pid {pid})")
    if alive:
        raise RunError(f"the crashed attempt's processes still run: {', '.join(alive)}; stop them before resuming")


def _federate(config: FedConfig, data_dir: Path, run_dir: Path, secret: str, budgets: Budgets, homes: Homes | None,
              progress: Callable[[str, int, int], None] | None, timeout_s: float) -> dict:
    start = time.perf_counter()
    progress = progress or (lambda stage, done, total: None)
    with Federation(run_dir / "flower") as federation:
        # everything starts at once: the workers load torch and opacus while the SuperLink comes up, and the
        # SuperNodes keep retrying until it answers
        progress("starting SuperLink, party workers and SuperNodes", 0, 1)
        t0 = time.perf_counter()
        federation.start_superlink()
        for party, settings in party_settings(run_dir, data_dir, secret, budgets, homes).items():
            settings.state_dir.mkdir(parents=True, exist_ok=True)
            worker = federation.start_worker(settings)
            federation.start_supernode(party, {"party": party, **worker})
        federation.wait_healthy()
        federation.wait_for_workers()
        app = federation.write_app(run_dir)
        progress("starting run", 0, 1)
        runner = federation.start("flwr-run", [_bin("flwr"), "run", str(app), "local", "--stream"])
        startup_s = time.perf_counter() - t0  # until `flwr run` is launched
        try:
            _follow(run_dir, federation, runner, progress, timeout_s)
        except RunError as exc:
            raise RunError(f"{exc}{resume_hint(run_dir)}") from None
        t_stop = time.perf_counter()
    teardown_s = time.perf_counter() - t_stop
    if not (run_dir / "outcome.json").exists():
        log = (run_dir / "flower" / "logs" / "flwr-run.log").read_text(errors="replace")[-3000:]
        raise RunError(f"the ServerApp wrote no outcome; `flwr run` log ends:\n{log}{resume_hint(run_dir)}")
    outcome = json.loads((run_dir / "outcome.json").read_text())
    outcome["timing"]["federation_s"] = time.perf_counter() - start
    outcome["timing"]["startup_s"] = startup_s
    outcome["timing"]["teardown_s"] = teardown_s
    (run_dir / "outcome.json").write_text(json.dumps(outcome, indent=2))
    return finish_run(run_dir, data_dir, config, secret, homes)


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
