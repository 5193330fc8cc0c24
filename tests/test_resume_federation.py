"""Resume under a real Flower federation: the lender's worker is SIGKILLed mid-run (round 1 of 2), the command fails
with a message naming the dead worker and saying how to resume, leaving no process behind, and `fedscore federate
--resume RUN_DIR` restarts every process and finishes the planned rounds with the model an uninterrupted run gives
(replayable noise, test only); every ledger holds exactly what was released. Also: a party whose SuperNode stays
away stops the run within the party timeout (fake grid).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedscore.runs import run_inprocess
from fedscore.server.flower_server import FlowerTransport, PartyDown
from fedscore.shared.config import load_config
from fedscore.shared.protocol.messages import MessageKind, request
from tests.conftest import FAST, SECRET, fresh_homes
from tests.test_federation import _alive, _assert_none_left, _served, _wait_for
from tests.test_resume import _releases  # a ledger without what differs between runs (ids, the draw's name)

# the privacy settings of tests/test_federation.py's SMALL and tests/test_deploy.py's SETTINGS (2 rounds, DP-SGD batch
# 256 on party_data): the same noise calibrations, which the run's shared accountant cache then answers at once
SETTINGS = [*FAST, "training.rounds=2", "baselines.enabled=false", "privacy.enabled=true",
            "privacy.dpsgd_batch_size=256", "privacy.replayable_noise=true"]
FEDSCORE = str(Path(sys.executable).parent / "fedscore")


@pytest.fixture
def meanwhile() -> Iterator[ThreadPoolExecutor]:
    """A thread for an in-process run that needs nothing from the federation the test drives: it runs while the
    federation's processes mostly wait on each other, and is joined (its error raised) by whoever reads its result."""
    with ThreadPoolExecutor(1) as pool:
        yield pool


@pytest.mark.federation
def test_a_killed_worker_then_resume_finishes_the_run(party_data: tuple[Path, dict], tmp_path: Path,
                                                      party_homes_in_tmp: Path, meanwhile: ThreadPoolExecutor) -> None:
    data, _ = party_data
    out, secret = tmp_path / "run", tmp_path / "secret.hex"
    secret.write_text(SECRET)
    uninterrupted = meanwhile.submit(run_inprocess, load_config(None, SETTINGS), data, tmp_path / "reference",
                                     secret=SECRET, homes=fresh_homes(tmp_path / "reference-homes"))
    args = [FEDSCORE, "federate", "--data", str(data), "--out", str(out), "--secret-file", str(secret),
            *[item for override in SETTINGS for item in ("--set", override)]]
    cli = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = out / "flower" / "logs"
    # the payment holder has served setup, alignment and the embed of round 0: the lender's train of round 0 (of 2)
    # is under way, and after the kill both parties still have a message to serve (train 0 and 1, embed 1)
    _wait_for(lambda: cli.poll() is not None or _served(logs / "worker-payment.log") >= 3)
    assert cli.poll() is None, cli.communicate()[0]
    pids = json.loads((out / "flower" / "pids.json").read_text())
    os.kill(pids["worker-lender"], signal.SIGKILL)
    output, _ = cli.communicate(timeout=120)
    flat = " ".join(output.split())
    assert cli.returncode != 0 and "Traceback" not in output, output
    assert "worker-lender" in flat and f"fedscore federate --resume {out}" in flat, output
    assert not (out / "metrics.json").exists()
    checkpoint = json.loads((out / "checkpoint.json").read_text())
    assert 3 <= checkpoint["next_step"] < checkpoint["total_steps"]
    _wait_for(lambda: not [p for p in pids.values() if _alive(p)], timeout_s=30)
    # nothing of the dead run is left: fork servers and their children too (this kill is also the federation
    # tests' dead-worker case, which used to start a federation of its own in tests/test_federation.py)
    _assert_none_left(out / "flower" / "home")

    started = time.perf_counter()
    resumed = subprocess.run([FEDSCORE, "federate", "--resume", str(out)], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    resume_s = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    reference = uninterrupted.result()
    assert len(metrics["rounds"]) == 2 and metrics["transport"] == "flower"
    for key, value in reference["test"].items():
        assert metrics["test"][key] == pytest.approx(value, abs=1e-6), key
    assert abs(metrics["test"]["auc"] - reference["test"]["auc"]) < 0.01
    for party in ("payment", "lender"):  # the same releases as the uninterrupted run: nothing lost, nothing twice
        assert _releases(party_homes_in_tmp / "parties" / party) == \
            _releases(tmp_path / "reference-homes" / "homes" / party), party
    report = json.loads((out / "privacy-report.json").read_text())
    assert report["run_id"] == checkpoint["run_id"]
    assert (out / "flower-attempt-1" / "logs" / "worker-lender.log").exists()
    # the resumed workers loaded their state once from disk and went on from there
    for party in ("payment", "lender"):
        served = [line for line in (out / "flower" / "logs" / f"worker-{party}.log").read_text().splitlines()
                  if line.startswith("served ")]
        assert served and served[-1].endswith("state loads 1"), served
    pids = json.loads((out / "flower" / "pids.json").read_text())
    _wait_for(lambda: not [p for p in pids.values() if _alive(p)], timeout_s=30)
    print(f"resume took {resume_s:.1f} s")


class _Grid:
    """Flower's Grid as far as the transport uses it: the lender's node never answers and is gone."""

    def __init__(self, connected: list[int]) -> None:
        self.connected = connected

    def push_messages(self, messages: list) -> list[str]:
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids: set[str]) -> list:
        return []

    def get_node_ids(self) -> list[int]:
        return list(self.connected)


def test_a_party_that_stays_down_stops_the_run_within_the_party_timeout() -> None:
    transport = FlowerTransport(_Grid([1]), poll_s=0.01, timeout_s=60, party_timeout_s=1.5)  # type: ignore[arg-type]
    transport.nodes = {"payment": 1, "lender": 2}
    message = SimpleNamespace(metadata=SimpleNamespace(dst_node_id=2))
    started = time.monotonic()
    with pytest.raises(PartyDown, match="the lender party is down: its SuperNode has not been connected"):
        transport._round_trip([message])  # type: ignore[list-item]
    assert 1.5 <= time.monotonic() - started < 10
    with pytest.raises(PartyDown, match=r"a party is down: only 1 of 2 SuperNodes connected within 1 s"):
        FlowerTransport(_Grid([1]), party_timeout_s=1.0).exchange([request(MessageKind.SETUP, "payment"),  # type: ignore[arg-type]
                                                                   request(MessageKind.SETUP, "lender")])


def test_a_slow_party_that_stays_connected_is_waited_for() -> None:
    """Connected but silent: no PartyDown, only the (longer) reply timeout names the party."""
    transport = FlowerTransport(_Grid([1, 2]), poll_s=0.01, timeout_s=2.5, party_timeout_s=0.5)  # type: ignore[arg-type]
    transport.nodes = {"payment": 1, "lender": 2}
    message = SimpleNamespace(metadata=SimpleNamespace(dst_node_id=2))
    with pytest.raises(TimeoutError, match=r"no reply from the lender party \(up, but slower than the reply timeout\)"):
        transport._round_trip([message])  # type: ignore[list-item]
