"""The two typed folders on their own (no training): the run folder's one pre-resume check and attempt bookkeeping,
the launch record's format, and the party home's one private writer and one lock."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from filelock import Timeout

from fedscore.shared.config import load_config
from fedscore.shared.party_home import PartyHome
from fedscore.shared.run_folder import Launch, NotResumable, Refusal, RunError, RunFolder


def _resumable(root: Path, *, next_step: int = 3, total_steps: int = 7) -> RunFolder:
    """A run folder as a crash leaves it: config, launch, secret and a checkpoint with steps left."""
    folder = RunFolder(root)
    folder.create(load_config(None, []), "ab" * 16)
    folder.write_launch(Launch.of(root, "inprocess", {"payment": {}, "lender": {}},
                                  {"payment": root / "hp", "lender": root / "hl"}))
    folder.checkpoint.write_text(json.dumps({"run_id": "r1", "next_step": next_step, "total_steps": total_steps}))
    return folder


def test_a_crashed_run_is_resumable(tmp_path: Path) -> None:
    folder = _resumable(tmp_path / "run")
    folder.check_resumable(local=True)
    folder.check_resumable(local=False)
    assert folder.read_secret() == "ab" * 16
    assert folder.secret.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("spoil", "local", "words"), [
    (lambda f: f.launch.unlink(), True, "no launch.json"),
    (lambda f: f.secret.unlink(), True, "no parties/shared-secret.hex"),
    (lambda f: f.config.unlink(), False, "no config.json"),
    (lambda f: f.checkpoint.unlink(), False, "no checkpoint.json: nothing to resume"),
    (lambda f: f.metrics.write_text("{}"), True, "already finished (metrics.json exists)"),
    (lambda f: f.checkpoint.write_text(json.dumps({"run_id": "r1", "next_step": 7, "total_steps": 7})), False,
     "'r1' already finished all its steps"),
], ids=["no launch", "no secret", "no config", "no checkpoint", "finished", "all steps done"])
def test_resume_is_refused_with_the_reason(tmp_path: Path, spoil, local: bool, words: str) -> None:
    folder = _resumable(tmp_path / "run")
    spoil(folder)
    before = sorted(p.name for p in folder.root.iterdir())
    with pytest.raises(NotResumable, match=re.escape(words)):
        folder.check_resumable(local=local)
    assert sorted(p.name for p in folder.root.iterdir()) == before  # the check writes nothing


def test_a_deployment_coordinator_resumes_without_launch_or_secret(tmp_path: Path) -> None:
    folder = _resumable(tmp_path / "run")
    folder.launch.unlink()
    folder.secret.unlink()
    folder.check_resumable(local=False)
    with pytest.raises(NotResumable):
        folder.check_resumable(local=True)


def test_new_attempt_sets_the_crashed_one_aside(tmp_path: Path) -> None:
    folder = _resumable(tmp_path / "run")
    for n in (1, 2):
        folder.write_outcome({"rounds": [], "attempt": n}, Refusal.failure(f"crash {n}"))
        folder.flower.mkdir()
        folder.new_attempt()
        assert not folder.outcome.exists() and not folder.flower.exists()
    first = json.loads((folder.root / "outcome-attempt-1.json").read_text())
    assert first["attempt"] == 1 and first["error"] == {"party": "", "request": "", "reason": "crash 1"}
    assert (folder.root / "flower-attempt-2").is_dir()
    folder.new_attempt()  # nothing to set aside: nothing moves
    assert sorted(p.name for p in folder.root.glob("*-attempt-*")) == [
        "flower-attempt-1", "flower-attempt-2", "outcome-attempt-1.json", "outcome-attempt-2.json"]


def test_a_refusal_is_recorded_as_party_request_reason(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.write_outcome({"rounds": []}, Refusal(party="lender", request="train", reason="over budget"))
    assert folder.read_outcome()["error"] == {"party": "lender", "request": "train", "reason": "over budget"}
    folder.write_outcome({"rounds": []}, None)
    assert folder.read_outcome()["error"] is None


def test_launch_keeps_its_format(tmp_path: Path) -> None:
    """launch.json as the runners wrote it before the type existed: the same keys in the same order, and an older
    one without `insecure` still reads."""
    folder = RunFolder(tmp_path)
    launch = Launch.of(tmp_path / "data", "flower", {"lender": {"lender.labels@payment": 1.5}},
                       {"payment": tmp_path / "p"}, 60.0, insecure=True)
    folder.write_launch(launch)
    assert list(json.loads(folder.launch.read_text())) == ["data", "transport", "budgets", "homes",
                                                           "party_timeout_s", "insecure"]
    assert folder.read_launch() == launch
    old = {k: v for k, v in launch.model_dump().items() if k != "insecure"}
    folder.launch.write_text(json.dumps(old))
    assert folder.read_launch().insecure is False
    crashed = _resumable(tmp_path / "run2")
    assert f"`fedscore train --resume {crashed.root}`" in crashed.resume_hint()
    crashed.checkpoint.unlink()
    assert crashed.resume_hint() == ""  # nothing to continue from


def test_a_new_run_refuses_a_used_folder(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.flower.mkdir(parents=True)  # the launcher may make flower/ first
    assert folder.create(load_config(None, []), shared_secret=False) == ""
    assert not folder.secret.exists()
    with pytest.raises(RunError, match="exists and is not empty"):
        folder.create(load_config(None, []))


def test_one_process_per_run_folder(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    with folder.lock(), pytest.raises(RunError, match="in use by another fedscore process"), folder.lock():
        pass
    with folder.lock():  # released
        pass


def test_the_home_writes_its_private_files_only(tmp_path: Path) -> None:
    home = PartyHome(tmp_path / "home")
    assert home.write_private(home.identity_key, "secret\n", exclusive=True)
    assert home.identity_key.stat().st_mode & 0o777 == 0o600
    assert not home.write_private(home.identity_key, "other\n", exclusive=True)  # never overwritten
    assert home.identity_key.read_text() == "secret\n"
    with pytest.raises(ValueError, match="not a file of the party home"):
        home.write_private(tmp_path / "elsewhere.key", "x")


def test_the_home_has_its_two_locks_only(tmp_path: Path) -> None:
    home = PartyHome(tmp_path)
    held = home.lock(home.ONLINE_RELEASES_LOCK)
    held.acquire(timeout=0)
    try:
        with pytest.raises(Timeout):
            home.lock(home.ONLINE_RELEASES_LOCK).acquire(timeout=0)
        with home.lock(home.E2E_RUNS_LOCK):  # another lock of the same home is free
            pass
    finally:
        held.release()
    with pytest.raises(ValueError, match="not a lock of a party home"):
        home.lock("ledger.lock")
