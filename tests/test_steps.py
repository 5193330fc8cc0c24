"""The protocol's table (shared/protocol/steps.py): what the coordinator sends is exactly the plan, the table is
consistent with itself, and everything that counts steps reads it (a new step is one row)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedscore.clients import channel
from fedscore.clients.parties import make_party
from fedscore.clients.state import STATE_TYPES, ChannelState, load_party_state
from fedscore.clients.state_store import read_state
from fedscore.local_parties import party_settings
from fedscore.server.coordinator import Coordinator
from fedscore.shared.config import load_config
from fedscore.shared.privacy import dp_sgd
from fedscore.shared.protocol import steps
from fedscore.shared.protocol.messages import MessageKind
from fedscore.shared.protocol.steps import PayloadKind, Step
from fedscore.shared.protocol.transport import InProcessTransport
from tests.conftest import FAST, SECRET, fresh_homes, make_party_data
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


ROUNDS = 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RecordingTransport]:
    """An in-process run on tiny data, every envelope recorded; its run folder."""
    root = tmp_path_factory.mktemp("steps")
    make_party_data(root / "data", population=600, seed=3)
    parties = {n: make_party(s) for n, s in party_settings(root / "run", root / "data", SECRET,
                                                          homes=fresh_homes(root)).items()}
    transport = RecordingTransport(parties)
    Coordinator(load_config(None, [*FAST, f"training.rounds={ROUNDS}", "baselines.enabled=false"]), transport).run()
    return root / "run", transport


def test_the_coordinator_sends_the_plan(tiny_run: tuple[Path, RecordingTransport]) -> None:
    """The requests the coordinator sends, in order, are the plan's rows (kind, recipient, round, payload kind),
    each reply returns what its row says, and each returned payload is the one the request it is delivered in
    carries."""
    _, transport = tiny_run
    rounds = ROUNDS

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


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("party", ["payment", "lender"])
def test_party_state_types_read_and_write_the_same_file(tiny_run: tuple[Path, RecordingTransport],
                                                        party: str) -> None:
    """A party's state.pt read as its type (clients/state.py) gives back exactly the dict the party saved: same
    keys in the same order, same values and types, the channel's counters included."""
    run_dir, _ = tiny_run
    path = run_dir / "parties" / party / "state.pt"
    raw = read_state(path)
    typed = load_party_state(path, party)
    assert isinstance(typed, STATE_TYPES[party]) and typed.extra == {}  # every key the party writes is a field
    assert typed.e2e is not None and typed.e2e.run == typed.run_id and typed.e2e.sent > 0
    assert _same(typed.to_dict(), raw)
    assert typed.e2e.to_dict() == raw["e2e"] and ChannelState.from_dict(raw["e2e"]) == typed.e2e
