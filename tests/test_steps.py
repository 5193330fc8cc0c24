"""The protocol's table (shared/protocol/steps.py): what the coordinator sends is exactly the plan, the table is
consistent with itself, and everything that counts steps reads it (a new step is one row)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedscore.clients import channel
from fedscore.clients.parties import make_party
from fedscore.runs import party_settings
from fedscore.server.coordinator import Coordinator
from fedscore.shared.config import load_config
from fedscore.shared.privacy import dp_sgd
from fedscore.shared.protocol import steps
from fedscore.shared.protocol.messages import MessageKind
from fedscore.shared.protocol.steps import PayloadKind, Step
from fedscore.shared.protocol.transport import InProcessTransport
from tests.conftest import FAST, SECRET, make_party_data
from tests.test_protocol import RecordingTransport

K = MessageKind


@pytest.mark.parametrize("rounds", [1, 2, 5])
def test_the_table_is_consistent(rounds: int) -> None:
    """Every payload a reply returns is delivered in exactly one later row that expects it, and every payload a
    row expects comes from exactly one earlier reply; R rounds make 3 + 2R exchanges and R-1 gradient exchanges."""
    plan = steps.plan(rounds)
    for i, row in enumerate(plan):
        providers = [p for p in plan[:i] if p.delivered_as == row.exchange and p.recipient != row.recipient]
        assert len(providers) == (0 if row.expects is PayloadKind.NONE else 1), row
        if providers:
            assert providers[0].returns == row.expects
        if row.delivered_as is not None:
            assert row.returns is not PayloadKind.NONE
            assert [r for r in plan[i + 1:] if r.exchange == row.delivered_as and r.recipient != row.recipient]
        else:
            assert row.returns is PayloadKind.NONE
    assert steps.total_exchanges(rounds) == 3 + 2 * rounds
    assert steps.gradient_exchanges(rounds) == dp_sgd.gradient_exchanges(rounds) == rounds - 1
    assert dp_sgd.dp_sgd_rounds(rounds) == {"lender": rounds, "payment": rounds - 1}
    assert plan[-1].kind is K.TRAIN and plan[-1].returns is PayloadKind.NONE  # the last round sends no gradients
    assert PayloadKind.NONE == "" and PayloadKind.ALIGNMENT_TOKENS == "alignment_tokens"  # the wire strings


def test_the_coordinator_sends_the_plan(tmp_path: Path) -> None:
    """An in-process run on tiny data: the requests the coordinator sends, in order, are the plan's rows (kind,
    recipient, round, payload kind), each reply returns what its row says, and each returned payload is the one
    the request it is delivered in carries."""
    data = tmp_path / "data"
    make_party_data(data, population=600, seed=3)
    parties = {n: make_party(s) for n, s in party_settings(tmp_path / "run", data, SECRET).items()}
    transport = RecordingTransport(parties)
    rounds = 3
    Coordinator(load_config(None, [*FAST, f"training.rounds={rounds}", "baselines.enabled=false"]), transport).run()

    sent = [m for m in transport.seen if m.header.sender == "server"]
    replies = {(m.header.kind, m.header.round, m.header.sender): m for m in transport.seen
               if m.header.sender != "server"}
    plan = steps.plan(rounds)
    assert [(m.header.kind, m.header.recipient, m.header.round, m.header.payload_kind) for m in sent] == \
        [(s.kind, s.recipient, s.round, s.expects) for s in plan]
    for row in plan:
        reply = replies[(row.kind, row.round, row.recipient)]
        assert not reply.header.error
        assert reply.header.payload_kind == row.returns and bool(reply.payload) == (row.returns != "")
        if row.delivered_as is not None:
            kind, round_ = row.delivered_as
            (target,) = [m for m in sent if (m.header.kind, m.header.round) == (kind, round_)]
            assert target.payload == reply.payload


def test_a_new_step_is_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """One row appended to the table (a final embed that applies the last round's gradients) changes every count
    and order check that reads it: the coordinator's exchanges, the payment holder's DP-SGD rounds, the channel's
    next expected request and what it must carry."""
    original = steps.plan

    def extended(rounds: int) -> list[Step]:
        return [*original(rounds), Step(K.EMBED, "payment", rounds, PayloadKind.GRADIENTS, PayloadKind.NONE, None)]

    monkeypatch.setattr(steps, "plan", extended)
    rounds = 2
    assert steps.total_exchanges(rounds) == 3 + 2 * rounds + 1
    assert dp_sgd.dp_sgd_rounds(rounds) == {"lender": rounds, "payment": rounds}
    assert steps.next_for("payment", K.EMBED, rounds - 1, rounds) == (K.EMBED, rounds)
    assert channel.expected_payload("payment", K.EMBED, rounds) == PayloadKind.GRADIENTS
    transport = InProcessTransport({})
    assert Coordinator(load_config(None, [*FAST, f"training.rounds={rounds}"]), transport).total_steps == \
        3 + 2 * rounds + 1
