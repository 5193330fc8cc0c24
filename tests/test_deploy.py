"""Two institutions, two machines, played on one: `fedscore superlink`, two `fedscore node` and `fedscore run`, each
party at its own network address.

When `ip netns` works (root), each party runs in its own network namespace joined to the coordinator's by a veth
pair on a bridge: the SuperLink listens on the bridge's (non-loopback) address, so TLS is required, and every byte
between a party and the coordinator crosses the virtual network. Otherwise the SuperLink listens on a second
loopback address (127.0.0.2) and the parties share this host's network (FEDSCORE_TEST_NO_NETNS=1 forces that).
Either way: a TLS, SuperNode-authenticated, end-to-end-encrypted run completes, and a third node whose key was not
registered is refused and never served a message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FAST, SECRET
from tests.test_federation import _alive

pytestmark = pytest.mark.federation
BIN = Path(sys.executable).parent
# privacy on with real noise: each node derives its budgets from the same settings, as its operator would
SETTINGS = [*FAST, "training.rounds=2", "baselines.enabled=false", "privacy.enabled=true",
            "privacy.dpsgd_batch_size=256"]
NAMESPACES = ("payment", "lender", "rogue")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Network:
    """Where the SuperLink listens and how each party's commands are launched (inside its namespace or not)."""

    def __init__(self) -> None:
        self.tag = f"fs{os.getpid() % 100000}"
        self.subnet = f"10.231.{os.getpid() % 250}"
        self.namespaces: dict[str, str] = {}
        self.bridge = ""
        self.superlink_host = "127.0.0.2"

    def netns_works(self) -> bool:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return False
        probe = f"{self.tag}probe"
        try:
            _ip("netns", "add", probe)
            _ip("netns", "del", probe)
            return True
        except (subprocess.SubprocessError, OSError):
            return False

    def build(self) -> None:
        """A bridge at SUBNET.1 in this namespace; one namespace per party at SUBNET.2, .3, .4 behind a veth."""
        self.bridge = f"{self.tag}br"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, party in enumerate(NAMESPACES, start=2):
            ns, outside, inside = f"{self.tag}-{party}", f"{self.tag}h{index}", f"{self.tag}n{index}"
            _ip("netns", "add", ns)
            self.namespaces[party] = ns
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "addr", "add", f"{self.subnet}.{index}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        self.superlink_host = f"{self.subnet}.1"

    def teardown(self) -> None:
        for ns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)

    def party_prefix(self, party: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[party]] if party in self.namespaces else []


@pytest.fixture
def network() -> Iterator[Network]:
    net = Network()
    if net.netns_works() and not os.environ.get("FEDSCORE_TEST_NO_NETNS"):
        try:
            net.build()
        except (subprocess.SubprocessError, OSError):
            net.teardown()
            net = Network()  # distinct loopback addresses instead
    try:
        yield net
    finally:
        net.teardown()


def _fedscore(*args: str) -> list[str]:
    return [str(BIN / "fedscore"), *args]


def _sets() -> list[str]:
    return [item for setting in SETTINGS for item in ("--set", setting)]


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


def test_two_parties_at_their_own_addresses_and_an_unregistered_node_refused(
        party_data: tuple[Path, dict], tmp_path: Path, network: Network) -> None:
    data, ids = party_data
    host = network.superlink_host
    port = 19000 + os.getpid() % 1000
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}

    def run(*args: str) -> str:
        done = subprocess.run(_fedscore(*args), capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    # the coordinator's TLS material for its (non-loopback, with namespaces) address; each party's keys in its home
    run("certs", "--out", str(tmp_path / "pki"), "--server-name", host)
    homes = {party: tmp_path / "homes" / party for party in NAMESPACES}
    for party, home in homes.items():
        run("keys", "--party", "payment" if party == "rogue" else party, "--party-home", str(home))
    secret = tmp_path / "secret.hex"
    secret.write_text(SECRET)
    pki = tmp_path / "pki"

    # plaintext is refused off loopback, before anything starts
    refused = subprocess.run(_fedscore("superlink", "--dir", str(tmp_path / "x"), "--host", "10.0.0.1",
                                       "--insecure"), capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode != 0 and "--insecure is loopback-only" in refused.stdout, refused.stdout

    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["superlink"] = subprocess.Popen(
            _fedscore("superlink", "--dir", str(tmp_path / "superlink"), "--host", host, "--port", str(port),
                      "--ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "server.pem"), "--tls-key",
                      str(pki / "server.key"), "--register", f"payment={homes['payment'] / 'supernode-auth.pub'}",
                      "--register", f"lender={homes['lender'] / 'supernode-auth.pub'}"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        nodes_file = tmp_path / "superlink" / "nodes.json"
        _wait_for(lambda: nodes_file.exists() or procs["superlink"].poll() is not None, 120, "the SuperLink")
        assert nodes_file.exists(), _stop(procs["superlink"])

        for party in NAMESPACES:
            real = "payment" if party == "rogue" else party
            peer = homes["lender" if real == "payment" else "payment"] / "identity.pub"
            procs[party] = subprocess.Popen(
                [*network.party_prefix(party), *_fedscore(
                    "node", "--party", real, "--data", str(data), "--superlink", f"{host}:{port}", "--ca",
                    str(pki / "ca.pem"), "--secret-file", str(secret), "--peer-key", str(peer), "--party-home",
                    str(homes[party]), "--state", str(tmp_path / "nodes" / party), *_sets())],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

        runner = subprocess.Popen(
            _fedscore("run", "--superlink", f"{host}:{port}", "--ca", str(pki / "ca.pem"), "--nodes",
                      str(nodes_file), "--out", str(tmp_path / "run"), *_sets()),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        # meanwhile the unregistered node is refused by the SuperLink and its command ends with the reason
        rogue_output = procs["rogue"].communicate(timeout=180)[0]
        assert procs["rogue"].returncode != 0
        assert "refused this SuperNode" in " ".join(rogue_output.split()), rogue_output
        run_output = runner.communicate(timeout=900)[0]
        assert runner.returncode == 0, run_output
        for party in ("payment", "lender"):
            assert procs[party].poll() is None, _stop(procs[party])
    finally:
        outputs = {name: _stop(proc) for name, proc in procs.items()}

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2 and metrics["transport"] == "flower"
    assert metrics["alignment"]["intersection"] == len(ids["payment"] & ids["lender"])
    assert "baselines" not in metrics  # the coordinator has neither party's data nor the lender's own evaluation
    assert not (tmp_path / "run" / "parties" / "shared-secret.hex").exists()  # nor their secret
    # each party's model part stays on its machine; whoever is handed both parts assembles the bundle
    assert not (tmp_path / "run" / "model").exists()
    run("bundle", str(tmp_path / "run"), *(item for party in ("payment", "lender") for item in (
        "--export", f"{party}={tmp_path / 'nodes' / party / 'state' / 'export'}")))
    manifest = json.loads((tmp_path / "run" / "model" / "manifest.json").read_text())
    assert set(manifest["parts"]) == {"payment", "lender"}
    # both parties' workers served every step; the rogue's served nothing
    for party in ("payment", "lender"):
        served = (tmp_path / "nodes" / party / "logs" / f"worker-{party}.log").read_text()
        assert served.count("served ") == 4, served
    rogue_worker = tmp_path / "nodes" / "rogue" / "logs" / "worker-payment.log"
    assert "served " not in (rogue_worker.read_text() if rogue_worker.exists() else "")
    # the SuperLink served TLS with node authentication; the ServerApp was pinned to the two registered nodes
    superlink_log = (tmp_path / "superlink" / "flower" / "logs" / "superlink.log").read_text()
    assert "SuperNode authentication is disabled" not in superlink_log
    registered = json.loads((tmp_path / "superlink" / "nodes.json").read_text())
    assert registered["tls"] and registered["node_auth"] and set(registered["nodes"]) == {"payment", "lender"}
    app = (tmp_path / "run" / "flower" / "app" / "pyproject.toml").read_text()
    assert all(str(entry["node_id"]) in app for entry in registered["nodes"].values())
    # every process any command started is gone after Ctrl-C
    pids = [pid for folder in [tmp_path / "superlink", tmp_path / "run", *(tmp_path / "nodes" / p for p in NAMESPACES)]
            if (folder / "flower" / "pids.json").exists() or (folder / "pids.json").exists()
            for pid in json.loads(((folder / "flower" / "pids.json") if (folder / "flower" / "pids.json").exists()
                                   else folder / "pids.json").read_text()).values()]
    assert len(pids) >= 7, outputs
    _wait_for(lambda: not [p for p in pids if _alive(p)], 30, "every process to stop")
