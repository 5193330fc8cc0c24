"""The deployment commands' checks that need no Flower process: plaintext refused off loopback, TLS material and
SuperNode keys, and the ServerApp pinned to the registered nodes (tests/test_deploy.py runs the real thing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fedscore.flower.launch import is_loopback, refuse_insecure_off_loopback, split_address
from fedscore.shared.run_folder import RunError
from fedscore.shared.tls import TlsError, node_auth_key, node_key_fingerprint

FEDSCORE = str(Path(sys.executable).parent / "fedscore")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FEDSCORE, *args], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "300", "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["superlink", "--dir", "{tmp}/sl", "--host", "192.0.2.7", "--insecure"],
    ["run", "--superlink", "192.0.2.7:9093", "--out", "{tmp}/run", "--insecure"],
    ["node", "--party", "lender", "--data", "{tmp}", "--superlink", "192.0.2.7:9093", "--secret-file", "{tmp}/s",
     "--peer-key", "00" * 32, "--party-home", "{tmp}/home", "--insecure"],
], ids=["superlink", "run", "node"])
def test_plaintext_is_refused_off_loopback(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "s").write_text("ab" * 16)
    done = _cli(*(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--insecure is loopback-only" in done.stdout and "192.0.2.7" in done.stdout, done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.slow
def test_tls_is_the_default_and_needs_its_files(tmp_path: Path) -> None:
    done = _cli("superlink", "--dir", str(tmp_path / "sl"), "--host", "192.0.2.7")
    assert done.returncode == 2 and "TLS is the default: pass --ca, --tls-cert, --tls-key" in done.stdout
    done = _cli("run", "--superlink", "192.0.2.7:9093", "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "TLS is the default: pass --ca" in done.stdout


def test_loopback_and_addresses() -> None:
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.org")
    assert split_address("[::1]:9093") == ("::1", 9093) and split_address("10.1.2.3:80") == ("10.1.2.3", 80)
    for bad in ("10.1.2.3", ":9093", "host:port", "h:70000"):
        with pytest.raises(RunError, match="expected HOST:PORT"):
            split_address(bad)
    with pytest.raises(RunError, match=r"0\.0\.0\.0 is not a loopback address"):
        refuse_insecure_off_loopback("0.0.0.0", "the SuperLink's --host")


def test_supernode_keys_live_in_the_home_in_flowers_format(tmp_path: Path) -> None:
    private, public = node_auth_key(tmp_path / "home")
    assert private.stat().st_mode & 0o777 == 0o600
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert key.curve.name == "secp384r1"  # type: ignore[union-attr]
    assert serialization.load_ssh_public_key(public.read_bytes()).public_numbers() == \
        key.public_key().public_numbers()  # type: ignore[union-attr]
    assert node_auth_key(tmp_path / "home") == (private, public)  # created once, then reused
    assert len(node_key_fingerprint(public).replace(" ", "")) == 16
    private.chmod(0o644)
    with pytest.raises(TlsError, match="readable by other users"):
        node_auth_key(tmp_path / "home")


def test_certs_writes_node_keys_and_a_loopback_capable_server_cert(tmp_path: Path) -> None:
    from cryptography import x509

    done = _cli("certs", "--out", str(tmp_path / "pki"), "--server-name", "10.9.8.7", "--node", "payment")
    assert done.returncode == 0, done.stdout
    assert (tmp_path / "pki" / "payment-node.key").stat().st_mode & 0o777 == 0o600
    assert "fingerprint" in done.stdout
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "server.pem").read_bytes())
    names = {str(n) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
             .get_values_for_type(x509.IPAddress)}
    assert names == {"10.9.8.7", "127.0.0.1"}


def test_the_serverapp_talks_to_the_registered_nodes_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three SuperNodes connected, the third claiming to be the payment holder: pinned to the two registered node
    ids, the ServerApp sends the opening exchange to those only and uses them; unpinned, it has to refuse the run;
    a registered node answering as the other party is refused."""
    from types import SimpleNamespace

    from fedscore.server import flower_server
    from fedscore.shared.protocol.flower_codec import encode
    from fedscore.shared.protocol.messages import Envelope, Header, MessageKind, request

    parties = {1: "payment", 2: "lender", 3: "payment"}
    asked: list[list[int]] = []

    class FakeMessage(SimpleNamespace):
        def __init__(self, content: object, dst_node_id: int, message_type: str) -> None:
            super().__init__(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def round_trip(messages: list) -> list:
        asked.append([m.dst_node_id for m in messages])
        return [SimpleNamespace(content=encode(Envelope(Header(kind=MessageKind.SETUP, sender=parties[m.dst_node_id],
                                                               recipient="server"))))
                for m in messages]

    setup = [request(MessageKind.SETUP, "payment"), request(MessageKind.SETUP, "lender")]
    monkeypatch.setattr(flower_server, "Message", FakeMessage)
    grid = SimpleNamespace(get_node_ids=lambda: [3, 1, 2])
    pinned = flower_server.FlowerTransport(grid, allowed={"payment": 1, "lender": 2})  # type: ignore[arg-type]
    monkeypatch.setattr(pinned, "_round_trip", round_trip)
    replies = pinned.exchange(setup)
    assert [r.header.sender for r in replies] == ["payment", "lender"] and asked == [[1, 2]]
    assert pinned.nodes == {"payment": 1, "lender": 2}

    open_transport = flower_server.FlowerTransport(grid)  # type: ignore[arg-type]
    monkeypatch.setattr(open_transport, "_round_trip", round_trip)
    with pytest.raises(RuntimeError, match="two SuperNodes claim to be the payment party"):
        open_transport.exchange(setup)

    wrong = flower_server.FlowerTransport(grid, allowed={"payment": 2, "lender": 1})  # type: ignore[arg-type]
    monkeypatch.setattr(wrong, "_round_trip", round_trip)
    with pytest.raises(RuntimeError, match="node 2 says it serves 'lender', but was not registered for it"):
        wrong.exchange(setup)


@pytest.mark.slow
@pytest.mark.parametrize(("args", "words"), [
    (["--resume", "{tmp}/run", "--config", "{tmp}/c.toml"], ["--resume", "drop --config"]),
    (["--resume", "{tmp}/run", "--out", "{tmp}/other"], ["drop --out"]),
    ([], ["--out RUN_DIR is required"]),
    (["--resume", "{tmp}/run"], ["checkpoint.json", "nothing to resume"]),
], ids=["resume with a config", "resume with an out", "neither out nor resume", "no checkpoint"])
def test_run_resume_is_refused_when_it_cannot_continue(tmp_path: Path, args: list[str], words: list[str]) -> None:
    """`fedscore run --resume RUN_DIR` takes the run's own config and needs the coordinator's checkpoint; each
    refusal is one line and exit 2, and nothing is written to the run folder."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (tmp_path / "c.toml").write_text("")
    done = _cli("run", "--superlink", "127.0.0.1:9093", "--insecure", *(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == 2, done.stdout + done.stderr
    assert all(w in " ".join(done.stdout.split()) for w in words), done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
