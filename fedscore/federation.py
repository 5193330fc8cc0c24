"""`fedscore federate`: a real local Flower federation, every process started here and stopped here.

SuperLink (one HTTP port) + one SuperNode per party (its data path, state dir and the parties' shared secret in
its --node-config, which the ServerApp cannot read) + `flwr run` of a tiny app whose components are our
ServerApp (server/flower_server.py) and ClientApp (clients/flower_client.py). FLWR_HOME lives in RUN_DIR/flower.
Every process is stopped on success, failure and Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

from fedscore.runs import (
    Budgets,
    Homes,
    RunError,
    check_data_dir,
    default_budgets,
    finish_run,
    party_settings,
    prepare_run_dir,
)
from fedscore.shared.config import FedConfig
from fedscore.shared.privacy.budgets import format_budgets
from fedscore.shared.waiting import wait_until

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
                    # Flower starts helpers (flower-superexec, flwr-clientapp) by name: put this venv first
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.port = free_port()

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.flower_dir,
                                start_new_session=True, stdin=subprocess.DEVNULL)
        self.processes.append((name, proc))
        (self.flower_dir / "pids.json").write_text(json.dumps({n: p.pid for n, p in self.processes}))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.processes:
            if proc.poll() is not None and name != "flwr-run":
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RunError(f"{name} exited with code {proc.returncode}; its log ends:\n{tail}")

    def start_superlink(self, timeout_s: float = 60.0) -> None:
        self.start("superlink", [_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                                 "--host", "127.0.0.1", "--port", str(self.port)])

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
        self.start(f"supernode-{party}", [_bin("flower-supernode"), "--insecure", "--superlink",
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
        """SuperNodes first, then the SuperLink: SIGTERM to each process group, SIGKILL after a grace period."""
        order = sorted(self.processes, key=lambda item: item[0] == "superlink")
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

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run_federated(config: FedConfig, data_dir: Path, run_dir: Path,
                  progress: Callable[[str, int, int], None] | None = None, timeout_s: float = 1800.0,
                  secret: str | None = None, budgets: Budgets | None = None, homes: Homes | None = None) -> dict:
    """Start the federation, run the ServerApp to the end, stop everything, and write metrics.json."""
    check_data_dir(data_dir)
    run_dir = run_dir.resolve()
    secret = prepare_run_dir(run_dir, config, secret)
    start = time.perf_counter()
    progress = progress or (lambda stage, done, total: None)
    with Federation(run_dir / "flower") as federation:
        progress("starting SuperLink", 0, 1)
        federation.start_superlink()
        budgets = default_budgets(config) if budgets is None else budgets
        for party, settings in party_settings(run_dir, data_dir, secret, budgets, homes).items():
            settings.state_dir.mkdir(parents=True, exist_ok=True)
            federation.start_supernode(party, {"party": party, "data-path": str(settings.data_path),
                                               "state-dir": str(settings.state_dir), "home": str(settings.home),
                                               "secret": secret,
                                               "budgets": format_budgets(settings.budgets)})
        app = federation.write_app(run_dir)
        progress("starting run", 0, 1)
        runner = federation.start("flwr-run", [_bin("flwr"), "run", str(app), "local", "--stream"])
        _follow(run_dir, federation, runner, progress, timeout_s)
    if not (run_dir / "outcome.json").exists():
        log = (run_dir / "flower" / "logs" / "flwr-run.log").read_text(errors="replace")[-3000:]
        raise RunError(f"the ServerApp wrote no outcome; `flwr run` log ends:\n{log}")
    outcome = json.loads((run_dir / "outcome.json").read_text())
    outcome["timing"]["federation_s"] = time.perf_counter() - start
    (run_dir / "outcome.json").write_text(json.dumps(outcome, indent=2))
    return finish_run(run_dir, data_dir, config, secret)


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
            # the ServerApp has finished; `flwr run --stream` may linger on log streaming
            with suppress(subprocess.TimeoutExpired):
                runner.wait(timeout=5)
            return True
        return False

    wait_until(finished, timeout_s, 0.3, "the federation did not finish", RunError)
