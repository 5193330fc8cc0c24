"""Resume after a crash, in process: the run's processes die mid-round; the parties are rebuilt from nothing but their
state directories and homes, the coordinator from its checkpoint; the run finishes its planned rounds with the very
model an uninterrupted run gives (replayable noise, test only), and every ledger holds at least what was released.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fedscore.clients.lender.party import LenderParty
from fedscore.clients.payment.party import PaymentParty
from fedscore.runs import resume_inprocess, run_inprocess
from fedscore.shared.config import load_config
from fedscore.shared.party_home import PartyHome
from fedscore.shared.privacy.ledger import ledger_entries, ledger_exists
from fedscore.shared.protocol.messages import Envelope, MessageKind
from fedscore.shared.protocol.transport import InProcessTransport
from fedscore.shared.run_folder import RunError
from tests.conftest import SECRET, fresh_homes, make_party_data

# default privacy (randomized-response labels, DP-SGD on both parts, DP scaler statistics) plus embedding noise,
# in the replayable test mode so an interrupted and an uninterrupted run can be compared exactly
PRIVATE = ["training.rounds=3", "training.local_epochs=1", "training.batch_size=64", "training.lr=0.005",
           "baselines.enabled=false", "privacy.dpsgd_batch_size=256", "privacy.dpsgd_local_epochs=1",
           "privacy.feature_epsilon=8", "privacy.replayable_noise=true"]


class Crash(BaseException):
    """A process dying: not an Exception, so no party or coordinator code turns it into an error reply."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume-data")
    make_party_data(out, population=1000, seed=3)
    return out


@pytest.fixture(scope="module")
def uninterrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("uninterrupted")
    metrics = run_inprocess(load_config(None, PRIVATE), data, root / "run", secret=SECRET, homes=fresh_homes(root))
    return metrics, root


def _releases(home: Path) -> list[tuple[str, str, str]]:
    """What a ledger holds, without what differs between runs (run id, time, step key, and the randomized-response
    draw's name, which carries the run id)."""
    entries = ledger_entries(home / PartyHome.LEDGER, home.name)

    def same_across_runs(m: dict) -> dict:
        return {k: (bool(v) if k in ("draw", "computed_from") else v) for k, v in m.items()}

    return sorted((e["guarantee"], json.dumps([same_across_runs(m) for m in e["mechanisms"]], sort_keys=True),
                   e["note"]) for e in entries)


def _crash_on(monkeypatch: pytest.MonkeyPatch, after: Callable[[Envelope], bool] | None = None,
              before: Callable[[Envelope], bool] | None = None) -> None:
    """The whole run dies once: before a message reaches its party, or after the party served it (its reply lost)."""
    exchange = InProcessTransport.exchange
    fired = []

    def dying(self: InProcessTransport, messages: list[Envelope]) -> list[Envelope]:
        if not fired and before is not None and any(before(m) for m in messages):
            fired.append(1)
            raise Crash("killed before delivery")
        replies = exchange(self, messages)
        if not fired and after is not None and any(after(m) for m in messages):
            fired.append(1)
            raise Crash("killed after the party replied")
        return replies

    monkeypatch.setattr(InProcessTransport, "exchange", dying)


def _is(kind: MessageKind, round_: int) -> Callable[[Envelope], bool]:
    return lambda m: (m.header.kind, m.header.round) == (kind, round_)


def _lender_dies_mid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lender's process dies in round 1 after charging its DP-SGD steps, before its reply is sealed or saved."""
    original = LenderParty._embedding_gradients

    def dying(self: LenderParty, *args: Any) -> Any:
        if args[-1] == 1 and not getattr(LenderParty, "_died", False):
            LenderParty._died = True  # type: ignore[attr-defined]
            raise Crash("lender killed mid-round")
        return original(self, *args)

    monkeypatch.setattr(LenderParty, "_embedding_gradients", dying)
    monkeypatch.setattr(LenderParty, "_died", False, raising=False)


CRASHES: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    # in round 1 of 3: the lender is down when round 1's embeddings are due to reach it
    "lender down before train round 1": lambda mp: _crash_on(mp, before=_is(MessageKind.TRAIN, 1)),
    # the payment holder served the last round's embed (charged, sealed, saved), but its reply never reached anyone
    "reply of embed round 2 lost": lambda mp: _crash_on(mp, after=_is(MessageKind.EMBED, 2)),
    "lender dies mid-train round 1 after charging": _lender_dies_mid_training,
    "during setup": lambda mp: _crash_on(mp, after=_is(MessageKind.SETUP, -1)),
    # the lender served the last train (exported, no gradients: its reply carries no payload), the reply was lost
    "reply of the last train lost": lambda mp: _crash_on(mp, after=_is(MessageKind.TRAIN, 2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("crash", list(CRASHES))
def test_a_resumed_run_equals_an_uninterrupted_one(data: Path, uninterrupted: tuple[dict, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, crash: str) -> None:
    reference, reference_root = uninterrupted
    run_dir, homes = tmp_path / "run", fresh_homes(tmp_path)
    with monkeypatch.context() as patch:
        CRASHES[crash](patch)
        with pytest.raises(Crash):
            run_inprocess(load_config(None, PRIVATE), data, run_dir, secret=SECRET, homes=homes)
    assert not (run_dir / "metrics.json").exists()
    checkpoint = json.loads((run_dir / "checkpoint.json").read_text())
    charged_at_crash = {p: _releases(homes[p]) for p in homes if ledger_exists(homes[p] / PartyHome.LEDGER)}
    if crash == "lender dies mid-train round 1 after charging":
        # write-ahead: the charge of the round that did not finish is on disk, and the lender's saved state still
        # expects that step (its reply never left), so the charge covers the redo
        assert "round 1: the lender part's DP-SGD steps" in [note for _, _, note in charged_at_crash["lender"]]
        assert torch.load(run_dir / "parties" / "lender" / "state.pt")["e2e"]["next"] == ["train", 1]
        assert checkpoint["next_step"] == 4 + 2 * 1

    # every process died: nothing survives but the run folder (state directories, checkpoint) and the party homes
    metrics = resume_inprocess(run_dir)

    assert len(metrics["rounds"]) == 3
    assert metrics["test"] == reference["test"]  # replayable noise: exactly the uninterrupted model
    assert metrics["rounds"] == reference["rounds"]
    for party in ("payment", "lender"):
        released = _releases(reference_root / "homes" / party)
        # the same releases as the uninterrupted run: nothing charged twice, nothing charged that was not released
        assert _releases(homes[party]) == released, party
        assert set(charged_at_crash.get(party, [])) <= set(released)  # what was charged stays charged
    report = json.loads((run_dir / "privacy-report.json").read_text())
    assert report["run_id"] == checkpoint["run_id"]  # the same run continued, not a second one
    assert all(g["runs"] == [checkpoint["run_id"]] for g in report["guarantees"]), report["guarantees"]
    assert json.loads((run_dir / "checkpoint.json").read_text())["resumes"] == 1
    # after the last step the coordinator keeps no payload: the last train reply carries none, nothing is relayed
    assert list(run_dir.glob("checkpoint-*.payload")) == []
    assert json.loads((run_dir / "checkpoint.json").read_text())["carry_file"] == ""


@pytest.mark.slow
def test_a_reply_is_resent_only_when_asked_and_only_for_the_same_request(data: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached reply answers exactly the last request marked `resend`; a plain replay is still refused, and a
    different request marked `resend` is checked as usual."""
    run_dir, homes = tmp_path / "run", fresh_homes(tmp_path)
    sent: list[Envelope] = []
    exchange = InProcessTransport.exchange

    def recording(self: InProcessTransport, messages: list[Envelope]) -> list[Envelope]:
        replies = exchange(self, messages)
        sent.extend(messages)
        if any(_is(MessageKind.EMBED, 1)(m) for m in messages):
            raise Crash("stop here")
        return replies

    monkeypatch.setattr(InProcessTransport, "exchange", recording)
    config = load_config(None, PRIVATE)
    with pytest.raises(Crash):
        run_inprocess(config, data, run_dir, secret=SECRET, homes=homes)
    from fedscore.clients.parties import make_party
    from fedscore.local_parties import party_settings

    settings = party_settings(run_dir, data, SECRET, json.loads((run_dir / "launch.json").read_text())["budgets"],
                              homes)
    payment = make_party(settings["payment"])
    assert isinstance(payment, PaymentParty)
    embed = sent[-1]
    plain = Envelope(header=embed.header.model_copy(update={"resend": False}), payload=embed.payload)
    assert "replayed message" in payment.handle(plain).header.error
    again = Envelope(header=embed.header.model_copy(update={"resend": True}), payload=embed.payload)
    first, second = payment.handle(again), payment.handle(again)
    assert not first.header.error and first.payload == second.payload and first.payload
    charges = len(_releases(homes["payment"]))
    older = sent[-3]  # embed round 0: served long ago, not the last request
    assert older.header.kind is MessageKind.EMBED and older.header.round == 0
    stale = Envelope(header=older.header.model_copy(update={"resend": True}), payload=older.payload)
    assert "replayed message" in payment.handle(stale).header.error
    assert len(_releases(homes["payment"])) == charges


@pytest.mark.slow
def test_resume_refuses_what_it_cannot_continue(data: Path, uninterrupted: tuple[dict, Path], tmp_path: Path) -> None:
    _, root = uninterrupted
    with pytest.raises(RunError, match="already finished"):
        resume_inprocess(root / "run")
    with pytest.raises(RunError, match=r"no config\.json"):
        resume_inprocess(tmp_path)


def test_a_step_key_makes_a_redone_charge_count_once(tmp_path: Path) -> None:
    """The ledger side of a redone step: same run, step key, guarantee and records -> one entry; anything else (no
    key, another run, other records) is charged as always."""
    from fedscore.shared.privacy import Ledger
    from fedscore.shared.privacy.mechanisms import embedding_release

    path, budget = tmp_path / PartyHome.LEDGER, {"payment.features@lender": 50.0}
    release = embedding_release(4.0, 1.0, 1)

    def ledger(run: str, key: str | None) -> Ledger:
        return Ledger(path, budget, 1e-6, party="payment", run=run, step=None if key is None else (lambda: key))

    first = ledger("r1", "embed:2#0").charge([release], "payment.features@lender")
    assert ledger("r1", "embed:2#0").charge([release], "payment.features@lender") == pytest.approx(first)
    assert len(ledger("r1", None).entries) == 1
    ledger("r1", "embed:3#0").charge([release], "payment.features@lender")  # the next step
    ledger("r2", "embed:2#0").charge([release], "payment.features@lender")  # another run
    ledger("r1", None).charge([release], "payment.features@lender")  # no step key (a live service)
    ledger("r1", "embed:2#0").charge([embedding_release(3.0, 1.0, 1)], "payment.features@lender")  # other records
    entries = ledger("r1", None).entries
    assert len(entries) == 5 and entries[0]["step"] == "embed:2#0" and "step" not in entries[3]


def test_the_cli_resume_takes_no_other_settings(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedscore.cli import app

    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path), "--set", "training.rounds=2"])
    assert result.exit_code == 2 and "drop --set" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["federate"])
    assert result.exit_code == 2 and "--resume RUN_DIR" in result.output
    result = CliRunner().invoke(app, ["federate", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "no config.json" in result.output
