"""The round logic. Read this file to follow one training run end to end.

1. setup: both parties load their own data and get the run config; the lender's reply carries its PSI request.
2. alignment, ECDH private set intersection (shared/alignment/psi.py): the lender's blinded IDs -> payment, which
   answers with its own blinded set -> the lender learns the intersection and returns the sorted HMAC tokens of it,
   which reach the payment holder with round 0's embed request. The coordinator relays opaque payloads, sees sizes.
3. rounds r = 0..R-1: payment `embed` (applying the previous round's gradients first) -> embeddings relayed to the
   lender; lender `train` -> gradients relayed to payment, validation/test metrics shared with the coordinator.
4. export: in its last step each party writes its own part of the model (ONNX, preprocessing inside) to its own
   state directory (the payment part is final after its last embed, the lender's after its last train).

The coordinator never decodes a payload: it moves `reply.payload` into the next request.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedscore.shared.config import FedConfig
from fedscore.shared.protocol.bodies import AlignmentSizes, SetupRequest, TableSize, Trained
from fedscore.shared.protocol.messages import Envelope, MessageKind, request
from fedscore.shared.protocol.transport import Transport


class PartyRefused(RuntimeError):
    """A party answered with an error; the run stops and the reason is reported with the party's name."""

    def __init__(self, party: str, kind: str, reason: str) -> None:
        kind = str(kind)  # a MessageKind prints as its wire value
        super().__init__(f"{party} refused {kind!r}: {reason}")
        self.party, self.kind, self.reason = party, kind, reason


class ProtocolViolation(RuntimeError):
    """A reply that does not answer the request it came back for (another kind, or from another party)."""


def raise_refusals(sent: tuple[Envelope, ...] | list[Envelope], replies: list[Envelope]) -> list[Envelope]:
    """The replies, or PartyRefused for the first party that answered with an error, or ProtocolViolation for the
    first reply that answers something else than what was asked."""
    for message, reply in zip(sent, replies, strict=True):
        asked, answered = message.header, reply.header
        if (answered.kind, answered.sender) != (asked.kind, asked.recipient):
            raise ProtocolViolation(f"asked {asked.recipient} for {asked.kind.value!r}, got {answered.kind.value!r} "
                                    f"from {answered.sender}")
        if answered.error:
            raise PartyRefused(asked.recipient, asked.kind, answered.error)
    return replies


def new_run_id(label: str) -> str:
    """Tags every ledger entry of one run: a readable label (the run folder's name) plus a random suffix."""
    return f"{label}-{secrets.token_hex(4)}"


@dataclass
class RunResult:
    transport: str
    run_id: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    alignment: dict[str, float] = field(default_factory=dict)
    lender_only: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    traffic: list[dict[str, Any]] = field(default_factory=list)  # what the coordinator saw: kinds and sizes
    ledgers: dict[str, Any] = field(default_factory=dict)  # each party's latest privacy ledger (records, no data)
    curves: dict[str, list[float]] = field(default_factory=dict)  # the lender's thinned test ROC/KS curves

    @property
    def final(self) -> dict[str, float]:
        return self.rounds[-1] if self.rounds else {}


Progress = Callable[[str, int, int], None]  # (stage, done, total)


class Coordinator:
    def __init__(self, config: FedConfig, transport: Transport, progress: Progress | None = None,
                 run_id: str = "") -> None:
        self.config = config
        # both parties tag their ledger entries with it and bind their channel keys to it: never reused
        self.run_id = run_id or new_run_id("run")
        self.transport = transport
        self.progress = progress or (lambda stage, done, total: None)
        self.result = RunResult(transport=transport.name, run_id=self.run_id)

    def _exchange(self, *messages: Envelope) -> list[Envelope]:
        started = time.perf_counter()
        replies = self.transport.exchange(list(messages))
        seconds = time.perf_counter() - started  # wall time of the whole exchange (parallel messages share it)
        for sent, reply in zip(messages, replies, strict=True):
            self.result.traffic.append({"kind": sent.header.kind.value, "round": sent.header.round,
                                        "to": sent.header.recipient, "sent_bytes": len(sent.payload),
                                        "reply_bytes": len(reply.payload), "seconds": seconds})
            if reply.header.ledger is not None:
                self.result.ledgers[sent.header.recipient] = reply.header.ledger.model_dump()
            if isinstance(reply.header.body, Trained) and reply.header.body.curves is not None:
                self.result.curves = reply.header.body.curves.model_dump()
        return raise_refusals(messages, replies)

    def run(self) -> RunResult:
        """Setup, alignment, rounds; each step that depends on the previous one rides on it, so a run is 3 + 2R
        sequential exchanges (a Flower message costs seconds): the lender's PSI request comes back with its setup
        reply, the alignment tokens go to the payment holder with round 0's embed request, and each party exports
        its part in its last step."""
        start = time.perf_counter()
        rounds = self.config.training.rounds
        total_steps = 3 + 2 * rounds
        self.progress("setup", 0, total_steps)
        setup = SetupRequest(config=self.config, run_id=self.run_id)
        payment_setup, lender_setup = self._exchange(request(MessageKind.SETUP, "payment", body=setup),
                                                     request(MessageKind.SETUP, "lender", body=setup))
        self.result.timing["setup_s"] = time.perf_counter() - start

        # alignment, ECDH PSI: lender's blinded IDs (from its setup reply) -> payment -> lender, who learns the
        # intersection and returns the sorted HMAC tokens of it (delivered to payment with round 0's embed)
        self.progress("alignment", 1, total_steps)
        t0 = time.perf_counter()
        (psi_response,) = self._exchange(request(MessageKind.ALIGN_RESPOND, "payment", payload=lender_setup.payload,
                                                 payload_kind=lender_setup.header.payload_kind))
        (match,) = self._exchange(request(MessageKind.ALIGN_MATCH, "lender", payload=psi_response.payload,
                                          payload_kind=psi_response.header.payload_kind))
        sizes = match.header.expect(AlignmentSizes)
        self.result.alignment = {
            "method": "ecdh-psi",
            "payment_rows": float(payment_setup.header.expect(TableSize).rows),
            **{k: float(getattr(sizes, k)) for k in ("lender_rows", "intersection", "train", "val", "test")},
        }
        if sizes.lender_only is not None:
            self.result.lender_only = {**sizes.lender_only.metrics, "model": sizes.lender_only.model}
        self.result.timing["alignment_s"] = time.perf_counter() - t0

        # rounds: embeddings to the lender, gradients back; round 0 carries the alignment tokens instead
        to_payment = match
        t0 = time.perf_counter()
        for round_ in range(rounds):
            step = 3 + 2 * round_
            self.progress(f"round {round_ + 1}/{rounds}: payment embeds", step - 1, total_steps)
            (embedded,) = self._exchange(request(MessageKind.EMBED, "payment", round_, payload=to_payment.payload,
                                                 payload_kind=to_payment.header.payload_kind))
            self.progress(f"round {round_ + 1}/{rounds}: lender trains", step, total_steps)
            (to_payment,) = self._exchange(request(MessageKind.TRAIN, "lender", round_, payload=embedded.payload,
                                                   payload_kind=embedded.header.payload_kind))
            self.result.rounds.append({"round": round_, **to_payment.header.metrics})
        self.result.timing["rounds_s"] = time.perf_counter() - t0
        self.result.timing["protocol_s"] = time.perf_counter() - start
        self.progress("done", total_steps, total_steps)
        return self.result


def check_blacklist(transport: Transport) -> dict[str, int]:
    """The private blacklist check, its own step: lender (PSI client, applicants) -> payment (PSI server, fraud list)
    -> lender, which keeps the hits. The coordinator sees the two payload sizes only."""

    def ask(message: Envelope) -> Envelope:
        return raise_refusals([message], transport.exchange([message]))[0]

    psi_request = ask(request(MessageKind.BLACKLIST_REQUEST, "lender"))
    psi_response = ask(request(MessageKind.BLACKLIST_RESPOND, "payment", payload=psi_request.payload,
                               payload_kind=psi_request.header.payload_kind))
    ask(request(MessageKind.BLACKLIST_MATCH, "lender", payload=psi_response.payload,
                payload_kind=psi_response.header.payload_kind))
    return {"request_bytes": len(psi_request.payload), "response_bytes": len(psi_response.payload)}
