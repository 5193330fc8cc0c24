"""The typed protocol: kinds from one enum, typed bodies that survive the Flower codec, the config parsed once per
message, and one deadline-poll helper."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from flwr.app import ConfigRecord
from pydantic import ValidationError

from fedscore.budgets import default_budgets
from fedscore.clients.parties import make_party
from fedscore.local_parties import party_settings
from fedscore.server.coordinator import Coordinator, ProtocolViolation, raise_refusals
from fedscore.shared.config import FedConfig, load_config
from fedscore.shared.protocol.bodies import (
    AlignmentSizes,
    Curves,
    LedgerEntry,
    LedgerReport,
    SetupRequest,
    TableSize,
    Trained,
)
from fedscore.shared.protocol.flower_codec import decode, encode
from fedscore.shared.protocol.messages import (
    Envelope,
    Header,
    MessageKind,
    UnexpectedBody,
    UnknownKind,
    request,
)
from fedscore.shared.protocol.transport import InProcessTransport
from fedscore.shared.waiting import wait_until
from tests.conftest import SECRET

PRIVATE = ["training.rounds=2", "training.local_epochs=1", "training.batch_size=64", "baselines.enabled=false",
           "privacy.dpsgd_batch_size=256", "privacy.feature_epsilon=8"]


def _parties(tmp_path: Path, data: Path, config: FedConfig) -> dict:
    settings = party_settings(tmp_path / "run", data, SECRET, default_budgets(config))
    return {name: make_party(s) for name, s in settings.items()}


# -- kinds -----------------------------------------------------------------------------------------------------------
def test_the_wire_value_of_a_kind_is_its_string() -> None:
    assert MessageKind.ALIGN_MATCH == "align.match" and str(MessageKind.BLACKLIST_RESPOND) == "blacklist.respond"
    header = request(MessageKind.TRAIN, "lender", 3).header
    assert '"kind":"train"' in header.model_dump_json()
    assert request("embed", "payment").header.kind is MessageKind.EMBED


def test_the_coordinator_rejects_an_unknown_kind() -> None:
    with pytest.raises(UnknownKind, match=r"unknown message kind 'trian'; the protocol has setup, align.respond"):
        request("trian", "lender")
    # a reply that answers another kind than the one asked is a protocol violation, not a result
    asked = request(MessageKind.TRAIN, "lender", 0)
    wrong = Envelope(Header(kind=MessageKind.EMBED, round=0, sender="lender", recipient="server"))
    with pytest.raises(ProtocolViolation, match=r"asked lender for 'train', got 'embed' from lender"):
        raise_refusals([asked], [wrong])
    right = Envelope(Header(kind=MessageKind.TRAIN, round=0, sender="lender", recipient="server"))
    assert raise_refusals([asked], [right]) == [right]


def test_an_unknown_kind_does_not_decode_from_the_wire() -> None:
    content = encode(request(MessageKind.SETUP, "payment"))
    content.config_records["header"] = ConfigRecord({"json": str(content.config_records["header"]["json"]).replace(
        '"setup"', '"bogus"')})
    with pytest.raises(ValidationError, match=r"kind\n.*'setup', 'align.respond'"):
        decode(content)


def test_both_parties_reject_a_kind_they_do_not_serve(party_data: tuple[Path, dict], tmp_path: Path) -> None:
    data, _ = party_data
    parties = _parties(tmp_path, data, load_config(None, PRIVATE))
    for party, kind in (("payment", MessageKind.TRAIN), ("lender", MessageKind.EMBED),
                        ("payment", MessageKind.BLACKLIST_MATCH), ("lender", MessageKind.EMBED)):
        reply = parties[party].handle(request(kind, party))
        assert reply.header.error.startswith(f"{party}: unknown request {kind.value!r}; it serves setup"), reply
        assert reply.header.kind is kind and reply.header.sender == party and reply.payload == b""
    # setup without its typed body: refused with the body the party expected
    reply = parties["lender"].handle(request(MessageKind.SETUP, "lender"))
    assert "carries no body, expected SetupRequest" in reply.header.error


# -- bodies --------------------------------------------------------------------------------------------------------
def test_typed_bodies_round_trip_through_the_flower_codec() -> None:
    ledger = LedgerReport(budgets={"lender.labels@payment": 2.0}, entries=[LedgerEntry(
        guarantee="lender.labels@payment", mechanisms=[{"kind": "randomized_response", "epsilon": 2.0}],
        epsilon_after=2.0, note="randomized response", run="r-1")])
    sizes = AlignmentSizes(lender_rows=10, intersection=7, train=5, val=1, test=1)
    trained = Trained(curves=Curves(fpr=[0.0, 0.5, 1.0], tpr=[0.0, 0.75, 1.0], population=[0.0, 0.4, 1.0]))
    setup = SetupRequest(config=load_config(None, PRIVATE), run_id="r-1")
    cases = [
        Envelope(Header(kind=MessageKind.ALIGN_MATCH, sender="lender", recipient="server", body=sizes, ledger=ledger,
                        payload_kind="alignment_tokens"), payload=b"\x00\x01tokens"),
        Envelope(Header(kind=MessageKind.TRAIN, round=1, sender="lender", recipient="server", body=trained,
                        metrics={"test_auc": 0.8})),
        request(MessageKind.SETUP, "payment", body=setup),
        Envelope(Header(kind=MessageKind.SETUP, sender="payment", recipient="server", body=TableSize(rows=3,
                                                                                                    features=2))),
    ]
    for envelope in cases:
        back = decode(encode(envelope))
        assert back.header == envelope.header and back.payload == envelope.payload
        assert type(back.header.body) is type(envelope.header.body)
    assert decode(encode(cases[0])).header.expect(AlignmentSizes) == sizes
    assert decode(encode(cases[2])).header.expect(SetupRequest).config == setup.config
    with pytest.raises(UnexpectedBody, match=r"'train' carries Trained, expected AlignmentSizes"):
        cases[1].header.expect(AlignmentSizes)


def test_the_bodies_have_no_room_for_label_derived_numbers() -> None:
    """The lender-only baseline and the default rate are the lender's own evaluation: a reply cannot carry them."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lender_only"):
        AlignmentSizes(lender_rows=10, intersection=7, train=5, val=1, test=1,
                       lender_only={"model": "logistic", "metrics": {"auc": 0.71}})  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="default_rate"):
        TableSize(rows=3, features=2, default_rate=0.2)  # type: ignore[call-arg]


# -- the config, once per message --------------------------------------------------------------------------------------
class CountingTransport(InProcessTransport):
    """Counts FedConfig JSON validations while each message is handled."""

    def __init__(self, parties: dict, calls: list[int]) -> None:
        super().__init__(parties)
        self.calls = calls
        self.parsed: list[tuple[MessageKind, str, int]] = []

    def exchange(self, messages: list[Envelope]) -> list[Envelope]:
        replies = []
        for message in messages:
            before = len(self.calls)
            replies += super().exchange([message])
            self.parsed.append((message.header.kind, message.header.recipient, len(self.calls) - before))
        return replies


@pytest.mark.slow
def test_the_config_is_parsed_once_per_handled_message(party_data: tuple[Path, dict], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = party_data
    config = load_config(None, PRIVATE)
    calls: list[int] = []
    validate = FedConfig.model_validate_json.__func__  # type: ignore[attr-defined]

    def counting(cls: type[FedConfig], *args: object, **kwargs: object) -> FedConfig:
        calls.append(1)
        return validate(cls, *args, **kwargs)

    monkeypatch.setattr(FedConfig, "model_validate_json", classmethod(counting))
    transport = CountingTransport(_parties(tmp_path, data, config), calls)
    result = Coordinator(config, transport).run()
    assert len(result.rounds) == 2 and result.curves and set(result.ledgers) == {"payment", "lender"}
    per_kind = Counter()
    for kind, party, count in transport.parsed:
        assert count <= 1, (kind, party, count)
        per_kind[kind] += count
    # every train (DP-SGD, label-gradient checks, metrics) and every embed after round 0 reads the config once
    assert per_kind[MessageKind.TRAIN] == 2 and per_kind[MessageKind.EMBED] == 2
    assert per_kind[MessageKind.SETUP] == 2  # the state changed at setup: parsed afresh, once


# -- waiting ---------------------------------------------------------------------------------------------------------
def test_wait_until_returns_the_first_truthy_answer_or_raises_the_given_error() -> None:
    answers = iter([None, 0, [], "ready"])
    assert wait_until(lambda: next(answers), 5, 0.001, "never") == "ready"
    seen = []
    with pytest.raises(RuntimeError, match=r"^only [1-9][0-9]* looks within 0 s$"):
        wait_until(lambda: seen.append(1), 0.01, 0.004, lambda: f"only {len(seen)} looks", RuntimeError)
    with pytest.raises(TimeoutError, match="no reply within"):
        wait_until(lambda: False, 0, 0.001, "no reply")

    def dead() -> bool:
        raise ProcessLookupError("helper died")

    with pytest.raises(ProcessLookupError, match="helper died"):
        wait_until(dead, 5, 1, "never")
