"""The protocol as one table: every request of a training run, in order, with what it carries and where its reply's
payload goes next.

Why one table: the order used to be written four times (the coordinator's step arithmetic, each party's channel
order checks, the DP-SGD step counts and the ledger's planned gradient exchanges) and all four had to agree. Now
the coordinator loops over `plan(rounds)`, the channel asks it what a request must carry and what comes next, and
the privacy plans count its rows. A new step is one row in `plan`.

A run of R rounds (server/coordinator.py sends these; rows of one exchange go out in parallel):

| exchange | kind          | recipient | round | expects          | returns          | delivered as         |
|----------|---------------|-----------|-------|------------------|------------------|----------------------|
| 0        | setup         | payment   | -1    | -                | -                | -                    |
| 0        | setup         | lender    | -1    | -                | psi_request      | align.respond -1     |
| 1        | align.respond | payment   | -1    | psi_request      | psi_response     | align.match -1       |
| 2        | align.match   | lender    | -1    | psi_response     | alignment_tokens | embed 0              |
| 3 + 2r   | embed         | payment   | r     | alignment_tokens (r = 0), else gradients | embeddings | train r |
| 4 + 2r   | train         | lender    | r     | embeddings       | gradients (r < R-1), else - | embed r+1 (r < R-1) |

Chunks: `embeddings` and `gradients` cross in chunks of whole users under `exchange.chunk_bytes`
(shared/protocol/chunks.py), all of them in the one exchange of their row: a chunked row stays one row, and
`Step.chunk_count` says how many chunks it carries for a number of users (every other payload is one chunk).

The last round's `train` returns nothing: no embed follows to deliver gradients to, so R rounds make R-1 gradient
exchanges (and the payment holder takes R-1 rounds of DP-SGD). The blacklist check is its own short session
(`blacklist_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fedscore.shared.protocol.messages import MessageKind

K = MessageKind


class PayloadKind(StrEnum):
    """What an opaque party-to-party payload holds. On the wire (headers, checkpoints, sealed associated data): the
    string value, so files written before this enum existed read the same."""

    NONE = ""
    PSI_REQUEST = "psi_request"
    PSI_RESPONSE = "psi_response"
    ALIGNMENT_TOKENS = "alignment_tokens"
    EMBEDDINGS = "embeddings"
    GRADIENTS = "gradients"


CHUNKED = frozenset({PayloadKind.EMBEDDINGS, PayloadKind.GRADIENTS})  # one row per user: cross in chunks of users


@dataclass(frozen=True)
class Step:
    """One request of the protocol: what `recipient` is asked to do in `round`, the payload the request must carry
    (`expects`, relayed from the peer's previous reply), the payload its reply carries (`returns`) and the request
    that reply's payload is delivered in (`delivered_as`, None when the reply carries nothing)."""

    kind: MessageKind
    recipient: str
    round: int
    expects: PayloadKind
    returns: PayloadKind
    delivered_as: tuple[MessageKind, int] | None

    @property
    def chunked(self) -> bool:
        """Whether this row's reply payload crosses in chunks of users (several sealed chunks, one exchange)."""
        return self.returns in CHUNKED

    def chunk_count(self, users: int, row_bytes: int, cap: int, run_id: str = "") -> int:
        """Chunks this row's reply carries for `users` rows of `row_bytes` under a cap of `cap` bytes (0: no cap) in
        run `run_id` (its length is part of each sealed chunk's framing); 1 for a payload that is not per user, 0
        for a reply that carries none."""
        from fedscore.shared.protocol.chunks import CHUNK_OVERHEAD, chunk_count

        if self.returns is PayloadKind.NONE:
            return 0
        return chunk_count(users, row_bytes, cap, CHUNK_OVERHEAD + len(run_id)) if self.chunked else 1

    @property
    def exchange(self) -> tuple[MessageKind, int]:
        """Rows with the same (kind, round) are sent together, in one exchange (setup goes to both parties)."""
        return self.kind, self.round


def plan(rounds: int) -> list[Step]:
    """Every request of a training run of `rounds` rounds, in the order the coordinator sends them."""
    if rounds < 1:
        raise ValueError(f"a run has at least one round, got {rounds}")
    steps = [
        Step(K.SETUP, "payment", -1, PayloadKind.NONE, PayloadKind.NONE, None),
        Step(K.SETUP, "lender", -1, PayloadKind.NONE, PayloadKind.PSI_REQUEST, (K.ALIGN_RESPOND, -1)),
        Step(K.ALIGN_RESPOND, "payment", -1, PayloadKind.PSI_REQUEST, PayloadKind.PSI_RESPONSE,
             (K.ALIGN_MATCH, -1)),
        Step(K.ALIGN_MATCH, "lender", -1, PayloadKind.PSI_RESPONSE, PayloadKind.ALIGNMENT_TOKENS, (K.EMBED, 0)),
    ]
    for r in range(rounds):
        last = r == rounds - 1
        steps += [
            Step(K.EMBED, "payment", r, PayloadKind.ALIGNMENT_TOKENS if r == 0 else PayloadKind.GRADIENTS,
                 PayloadKind.EMBEDDINGS, (K.TRAIN, r)),
            Step(K.TRAIN, "lender", r, PayloadKind.EMBEDDINGS, PayloadKind.NONE if last else PayloadKind.GRADIENTS,
                 None if last else (K.EMBED, r + 1)),
        ]
    return steps


def blacklist_plan() -> list[Step]:
    """The private blacklist check (server/coordinator.py `check_blacklist`): lender (PSI client, applicants) ->
    payment (PSI server, fraud list) -> lender, which keeps the hits."""
    return [
        Step(K.BLACKLIST_REQUEST, "lender", -1, PayloadKind.NONE, PayloadKind.PSI_REQUEST,
             (K.BLACKLIST_RESPOND, -1)),
        Step(K.BLACKLIST_RESPOND, "payment", -1, PayloadKind.PSI_REQUEST, PayloadKind.PSI_RESPONSE,
             (K.BLACKLIST_MATCH, -1)),
        Step(K.BLACKLIST_MATCH, "lender", -1, PayloadKind.PSI_RESPONSE, PayloadKind.NONE, None),
    ]


BLACKLIST_KINDS = frozenset(step.kind for step in blacklist_plan())


def exchanges(steps: list[Step]) -> list[tuple[Step, ...]]:
    """`steps` grouped into what the coordinator sends at once (consecutive rows of one kind and round); the index
    of a group is the coordinator's checkpoint step number."""
    groups: list[tuple[Step, ...]] = []
    for step in steps:
        if groups and groups[-1][0].exchange == step.exchange:
            groups[-1] = (*groups[-1], step)
        else:
            groups.append((step,))
    return groups


def total_exchanges(rounds: int) -> int:
    """Sequential exchanges in a run: 3 + 2R (setup, two alignment steps, an embed and a train per round)."""
    return len(exchanges(plan(rounds)))


def find(recipient: str, kind: MessageKind, round_: int, rounds: int | None = None) -> Step | None:
    """The row for `recipient` being asked `kind` in `round_` (of a run of `rounds`; blacklist kinds need none), or
    None when there is no such request. Without `rounds`, a training row is looked up as if the run went on past
    `round_` (what it expects does not depend on R)."""
    steps = blacklist_plan() if kind in BLACKLIST_KINDS else plan(rounds if rounds is not None else max(round_, 0) + 2)
    return next((s for s in steps if (s.recipient, s.kind, s.round) == (recipient, kind, round_)), None)


def next_for(recipient: str, kind: MessageKind, round_: int, rounds: int) -> tuple[MessageKind, int]:
    """The request `recipient` accepts after serving `kind` in `round_`: its next row in the plan. After its last
    row, the same kind one round later, which the plan has not (so nothing more is served in this run)."""
    steps = [s for s in plan(rounds) if s.recipient == recipient]
    for i, step in enumerate(steps):
        if (step.kind, step.round) == (kind, round_) and i + 1 < len(steps):
            return steps[i + 1].kind, steps[i + 1].round
    return kind, round_ + 1


def phase(kind: MessageKind, round_: int) -> int:
    """Where a training request sits in the run, for telling a replayed request from an early one: setup 0, the
    alignment 1, round r at 2 + r (the two parties' requests of one phase share it)."""
    return {K.SETUP: 0, K.ALIGN_RESPOND: 1, K.ALIGN_MATCH: 1}.get(kind, 2 + round_)


def gradient_exchanges(rounds: int) -> int:
    """Gradient payloads the payment holder receives in a run of `rounds`: one per lender round but the last."""
    return sum(step.returns is PayloadKind.GRADIENTS for step in plan(rounds))


def dp_sgd_rounds(rounds: int) -> dict[str, int]:
    """Rounds of DP-SGD each part takes: the lender trains on every `train` row; the payment holder applies
    gradients in each embed that receives some (none in round 0, the last round's are never computed)."""
    steps = plan(rounds)
    return {"lender": sum(step.kind is K.TRAIN for step in steps),
            "payment": sum(step.kind is K.EMBED and step.expects is PayloadKind.GRADIENTS for step in steps)}
