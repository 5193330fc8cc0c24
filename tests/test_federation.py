"""One real multi-process Flower federation: SuperLink + two SuperNodes + ServerApp, on small data, over the default
TLS with SuperNode authentication.

It must give the same metrics as the in-process transport for the same seed and secret, leave no process behind, and
everything the ServerApp received (captured on the real Flower path) must be ciphertext.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import numpy as np
import psutil
import pytest

from fedscore.clients.state_store import read_state
from fedscore.federation import run_federated
from fedscore.runs import run_inprocess
from fedscore.shared.config import MIN_CHUNK_BYTES, load_config
from tests.conftest import FAST, SECRET, fresh_homes

pytestmark = pytest.mark.federation
# privacy on: randomized response, DP-SGD (Opacus inside the ClientApp processes), budgets passed as node config
# replayable noise (VOID, test only) so both transports draw the same flips, samples and noise
SMALL = [*FAST, "training.rounds=2", "baselines.enabled=false", "privacy.enabled=true",
         "privacy.dpsgd_batch_size=256", "privacy.replayable_noise=true", "audit.record_transcripts=true"]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_flower_matches_inprocess_and_cleans_up(party_data: tuple[Path, dict], tmp_path: Path) -> None:
    """Also the chunked path under Flower (it used to start a federation of its own in tests/test_chunks.py): both
    runs at the smallest chunk cap, so every exchange crosses in several sealed chunks, all in one Flower message."""
    data, ids = party_data
    config = load_config(None, [*SMALL, f"exchange.chunk_bytes={MIN_CHUNK_BYTES}"])
    with ThreadPoolExecutor(1) as pool:  # the in-process run meanwhile: the federation's processes mostly wait
        pending = pool.submit(run_inprocess, config, data, tmp_path / "inprocess", secret=SECRET,
                              homes=fresh_homes(tmp_path / "inprocess-homes"))
        federated = run_federated(config, data, tmp_path / "flower", secret=SECRET, timeout_s=600,
                                  homes=fresh_homes(tmp_path / "flower-homes"), capture=True)
        reference = pending.result()

    assert federated["transport"] == "flower" and reference["transport"] == "inprocess"
    for key, value in reference["test"].items():
        assert federated["test"][key] == pytest.approx(value, abs=1e-6), key
    assert len(federated["rounds"]) == 2
    # the same chunks per exchange as in process, several per exchange, and one message per party per exchange
    flower_traffic = json.loads((tmp_path / "flower" / "outcome.json").read_text())["traffic"]
    local_traffic = json.loads((tmp_path / "inprocess" / "outcome.json").read_text())["traffic"]
    chunks = {(t["kind"], t["round"]): t["reply_chunks"] for t in flower_traffic}
    assert chunks == {(t["kind"], t["round"]): t["reply_chunks"] for t in local_traffic}
    assert len(flower_traffic) == len(local_traffic) and min(chunks[("embed", r)] for r in range(2)) >= 3, chunks
    flower_report = json.loads((tmp_path / "flower" / "privacy-report.json").read_text())
    local_report = json.loads((tmp_path / "inprocess" / "privacy-report.json").read_text())
    assert [g["epsilon"] for g in flower_report["guarantees"]] == [g["epsilon"] for g in local_report["guarantees"]]
    assert {g["protects"] for g in flower_report["guarantees"]} == {"lender.labels", "joint.records"}
    assert flower_report["void"] and {g["status"] for g in flower_report["guarantees"]} == {"VOID"}
    assert federated["alignment"]["intersection"] == len(ids["payment"] & ids["lender"])
    # each party's worker recorded what it received, and the run collected it: the same as in process
    for view in ("payment_view.npz", "lender_view.npz"):
        flower_view = np.load(tmp_path / "flower" / "transcripts" / view, allow_pickle=False)
        local_view = np.load(tmp_path / "inprocess" / "transcripts" / view, allow_pickle=False)
        assert set(flower_view.files) == set(local_view.files) and len(flower_view["id"]) > 0
        for name in ("round", "id"):
            assert np.array_equal(flower_view[name], local_view[name]), (view, name)
        array = "gradient" if "gradient" in flower_view.files else "embedding"
        assert np.allclose(flower_view[array], local_view[array], atol=1e-5), view

    logs = tmp_path / "flower" / "flower" / "logs"
    # the default is TLS with SuperNode authentication: both SuperNodes registered, none joined without a key
    superlink_log = (logs / "superlink.log").read_text()
    assert "SuperNode authentication is disabled" not in superlink_log
    assert "root-certificates" in (tmp_path / "flower" / "flower" / "home" / "config.toml").read_text()
    # (with authentication on, a SuperNode joins only with a registered key: both joined, so both had theirs)
    _assert_capture_is_ciphertext(tmp_path / "flower", data, ids)

    assert {p.name for p in logs.iterdir()} >= {"superlink.log", "supernode-payment.log", "supernode-lender.log"}
    assert "query.fedscore" in (logs / "supernode-lender.log").read_text()
    pids = json.loads((tmp_path / "flower" / "flower" / "pids.json").read_text())
    assert set(pids) == {"superlink", "worker-payment", "supernode-payment", "worker-lender", "supernode-lender",
                         "flwr-run"}
    assert not [p for p in pids.values() if _alive(p)]
    _assert_none_left(tmp_path / "flower" / "flower" / "home")  # fork servers and their children too
    # every ClientApp process was forked from a warm fork server (fedscore/forkserver.py), none started cold
    for name, command in (("supernode-payment", "flwr-clientapp"), ("supernode-lender", "flwr-clientapp"),
                          ("superlink", "flwr-serverapp")):
        log = (logs / f"{name}.log").read_text()
        assert f"{command} processes are forked warm" in log and "as plain processes" not in log, log[-2000:]
    # each party's worker kept its state in memory: every message served, none reloaded the state file
    for party, messages in (("payment", 1 + 1 + 2), ("lender", 1 + 1 + 2)):
        served = [line for line in (logs / f"worker-{party}.log").read_text().splitlines()
                  if line.startswith("served ")]
        assert len(served) == messages, served
        assert all(line.endswith("state loads 0") for line in served), served


def _frames(blob: bytes) -> list[bytes]:
    import struct

    parts, at = [], 0
    while at < len(blob):
        (size,) = struct.unpack_from(">Q", blob, at)
        parts.append(blob[at + 8:at + 8 + size])
        at += 8 + size
    return parts


def _assert_capture_is_ciphertext(run: Path, data: Path, ids: dict) -> None:
    """Everything the ServerApp received under Flower: no ID, hash of one, label or raw feature; every payload a
    sealed frame that does not unpack as the parties' array format; none of the released embeddings' rows."""
    import numpy as np

    from fedscore.shared.protocol import e2e
    from fedscore.shared.protocol.chunks import read_bundle
    from fedscore.shared.protocol.messages import unpack_arrays
    from tests.test_e2e import assert_learns_nothing

    blob = (run / "capture" / "serverapp-received.bin").read_bytes()
    parts = _frames(blob)
    payloads = [parts[i + 1] for i, part in enumerate(parts[:-1]) if part == b"payload" and parts[i + 1]]
    # psi request, psi response, tokens, then per round embeddings and gradients, but no gradients after the last
    # round (2 rounds: 3 + 2 * 2 - 1)
    # each payload is a bundle of sealed chunks (one Array at this size: flower_codec packs chunks up to 4 MiB)
    assert len(payloads) >= 6 and all(f.startswith(e2e.MAGIC) for p in payloads for _, _, f in read_bundle(p))
    for payload in payloads:
        with pytest.raises(Exception):  # noqa: B017 - any failure to parse will do
            unpack_arrays(payload)
    lender = read_state(run / "parties" / "lender" / "state.pt")
    assert_learns_nothing(blob, data, ids, lender["y"][lender["rows"]].numpy())
    released = read_state(run / "parties" / "payment" / "state.pt")["released"].numpy()
    # two consecutive users' rows at a time: one partial logit is 4 bytes, which a ciphertext of this size holds
    # by chance with probability ~0.1 over 1,800 needles; 8 bytes never do, and plaintext would hold every pair
    rows = [released[i:i + 2].astype(np.float32).tobytes() for i in range(len(released) - 1)]
    assert len(rows) > 1000 and not [r for r in rows if r in blob]
    folder = run / "parties" / "payment"
    state_bytes = b"".join(f.read_bytes() for f in [folder / "state.pt", *(folder / "state.d").glob("*.pt")])
    assert sum(r in state_bytes for r in rows[::100]) == len(rows[::100])  # the search finds them where they are


def _federate(data: Path, out: Path) -> subprocess.Popen:
    args = [str(Path(sys.executable).parent / "fedscore"), "federate", "--data", str(data), "--out", str(out),
            *[item for override in [*SMALL, "training.rounds=6"] for item in ("--set", override)]]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _processes_using(flwr_home: Path) -> list[int]:
    """PIDs of live processes started for the federation whose FLWR_HOME is `flwr_home` (read from their
    environment, which forked children and helpers Flower starts by name all inherit)."""
    home = str(flwr_home.resolve())
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("FLWR_HOME") == home and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _assert_none_left(flwr_home: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := _processes_using(flwr_home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    described = []
    for pid in left:
        with suppress(psutil.Error):
            described.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:150]}")
    assert not left, described


def _served(log: Path) -> int:
    return sum(line.startswith("served ") for line in log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_a_dead_worker_or_ctrl_c_stops_everything(party_data: tuple[Path, dict], tmp_path: Path, how: str) -> None:
    """Mid-run, the operator presses Ctrl-C, or the command itself gets SIGTERM or even SIGKILL: either way the
    command exits non-zero and leaves no process behind. A dead worker (the run fails with a clear message naming
    it, never hangs, and leaves no process behind) is tests/test_resume_federation.py's kill, before it resumes."""
    data, _ = party_data
    out = tmp_path / "run"
    cli = _federate(data, out)
    logs = out / "flower" / "logs"
    _wait_for(lambda: cli.poll() is not None or _served(logs / "worker-lender.log") >= 1)  # setup done: mid-run
    assert cli.poll() is None, cli.communicate()[0]
    cli.send_signal({"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[how])
    output, _ = cli.communicate(timeout=120)
    assert cli.returncode != 0, output
    assert "Traceback" not in output
    pids = json.loads((out / "flower" / "pids.json").read_text())
    _wait_for(lambda: not [p for p in pids.values() if _alive(p)], timeout_s=30)
    _assert_none_left(out / "flower" / "home")
