"""The round logic. Read this file to follow one training run end to end.

1. setup: both parties load their own data and get the run config; the lender's reply carries its PSI request.
2. alignment, ECDH private set intersection (shared/alignment/psi.py): the lender's blinded IDs -> payment, which
   answers with its own blinded set -> the lender learns the intersection and returns the sorted HMAC tokens of it,
   which reach the payment holder with round 0's embed request. The coordinator relays opaque payloads, sees sizes.
3. rounds r = 0..R-1: payment `embed` (applying the previous round's gradients first) -> embeddings relayed to the
   lender; lender `train` -> gradients relayed to payment, validation/test metrics shared with the coordinator.
   The last round's `train` reply carries no gradients (no embed follows to deliver them to), so R rounds make R-1
   gradient exchanges; the coordinator keeps no payload it does not relay.
4. export: in its last step each party writes its own part of the model (ONNX, preprocessing inside) to its own
   state directory (the payment part is final after its last embed, the lender's after its last train).

The coordinator never decodes a payload: it moves `reply.payload` into the next request.

Resume after a crash: with a checkpoint folder (RUN_DIR) the coordinator writes, after every exchange (so at every
round boundary), which step comes next, the run id, the results so far and the one reply payload the next step
carries (`checkpoint.json` + `checkpoint-<step>.payload`, atomic). `Coordinator.resume` reloads it and re-sends the
next step marked `resend`: a party that had served it already returns the reply it sent then (clients/base.py).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from fedscore.shared.atomic import atomic_write, write_text_atomic
from fedscore.shared.config import FedConfig
from fedscore.shared.protocol import steps
from fedscore.shared.protocol.bodies import AlignmentSizes, SetupRequest, TableSize, Trained
from fedscore.shared.protocol.chunks import max_chunk_bytes
from fedscore.shared.protocol.messages import Envelope, MessageKind, request
from fedscore.shared.protocol.steps import PayloadKind
from fedscore.shared.protocol.transport import Transport
from fedscore.shared.run_folder import RunFolder


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
    timing: dict[str, float] = field(default_factory=dict)
    traffic: list[dict[str, Any]] = field(default_factory=list)  # what the coordinator saw: kinds and sizes
    ledgers: dict[str, Any] = field(default_factory=dict)  # each party's latest privacy ledger (records, no data)
    curves: dict[str, list[float]] = field(default_factory=dict)  # the lender's thinned test ROC/KS curves

    @property
    def final(self) -> dict[str, float]:
        return self.rounds[-1] if self.rounds else {}


Progress = Callable[[str, int, int], None]  # (stage, done, total)

CHECKPOINT_FILE = RunFolder.CHECKPOINT


class CheckpointError(RuntimeError):
    """No checkpoint to resume from, or one that does not fit this run."""


class Checkpoint(BaseModel):
    """The coordinator's state between two exchanges; the payload the next step carries sits beside it."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    next_step: int  # index into exchanges(plan(R)) (shared/protocol/steps.py): 0 setup, 1 align.respond, ...
    total_steps: int
    carry_kind: str = ""  # payload kind of the reply the next step moves on
    carry_file: str = ""  # its bytes, checkpoint-<step>.payload
    result: dict[str, Any]
    resumes: int = 0


class Coordinator:
    def __init__(self, config: FedConfig, transport: Transport, progress: Progress | None = None,
                 run_id: str = "", checkpoint_dir: Path | None = None) -> None:
        self.config = config
        # both parties tag their ledger entries with it and bind their channel keys to it: never reused
        self.run_id = run_id or new_run_id("run")
        self.transport = transport
        self.progress = progress or (lambda stage, done, total: None)
        self.result = RunResult(transport=transport.name, run_id=self.run_id)
        self.checkpoint_dir = checkpoint_dir
        self.step = 0
        self.carry: tuple[bytes, str] = (b"", "")  # the last reply's payload and kind, moved into the next step
        self.resend = False  # the next exchange re-sends a step whose reply may have been lost (resume)
        self.resumes = 0
        self.plan = steps.exchanges(steps.plan(config.training.rounds))  # the protocol's table, one entry per exchange

    @classmethod
    def resume(cls, config: FedConfig, transport: Transport, checkpoint_dir: Path,
               progress: Progress | None = None) -> Coordinator:
        """A coordinator that continues the run checkpointed in `checkpoint_dir`: same run id, results so far, and
        the next step re-sent (marked `resend`)."""
        path = checkpoint_dir / CHECKPOINT_FILE
        if not path.exists():
            raise CheckpointError(f"{path}: no coordinator checkpoint: this run never started, nothing to resume")
        checkpoint = Checkpoint.model_validate_json(path.read_text())
        total = steps.total_exchanges(config.training.rounds)
        if checkpoint.total_steps != total:
            raise CheckpointError(f"{path}: checkpoint of a run with {checkpoint.total_steps} steps, the config "
                                  f"plans {total}")
        if checkpoint.next_step >= total:
            raise CheckpointError(f"{path}: run {checkpoint.run_id!r} already finished all its steps")
        coordinator = cls(config, transport, progress, checkpoint.run_id, checkpoint_dir)
        coordinator.result = RunResult(**checkpoint.result)
        coordinator.result.transport = transport.name
        coordinator.step = checkpoint.next_step
        payload = (checkpoint_dir / checkpoint.carry_file).read_bytes() if checkpoint.carry_file else b""
        coordinator.carry = (payload, checkpoint.carry_kind)
        coordinator.resend = True
        coordinator.resumes = checkpoint.resumes + 1
        return coordinator

    def _save_checkpoint(self) -> None:
        """Atomically: the carried payload under a name of its own step first, then the JSON naming it, then the
        older payloads go; a crash between any two leaves a consistent checkpoint."""
        if self.checkpoint_dir is None:
            return
        carry_file = f"checkpoint-{self.step}.payload" if self.carry[0] else ""
        if carry_file:
            atomic_write(self.checkpoint_dir / carry_file, lambda handle: handle.write(self.carry[0]))
        checkpoint = Checkpoint(run_id=self.run_id, next_step=self.step, total_steps=self.total_steps,
                                carry_kind=self.carry[1], carry_file=carry_file,
                                result=json.loads(json.dumps(dataclasses.asdict(self.result))), resumes=self.resumes)
        write_text_atomic(self.checkpoint_dir / CHECKPOINT_FILE, checkpoint.model_dump_json(indent=1))
        for old in self.checkpoint_dir.glob("checkpoint-*.payload"):
            if old.name != carry_file:
                old.unlink(missing_ok=True)

    @property
    def total_steps(self) -> int:
        """3 + 2R sequential exchanges: the plan's rows grouped into what is sent at once."""
        return len(self.plan)

    def _exchange(self, *messages: Envelope) -> list[Envelope]:
        if self.resend:
            for message in messages:
                message.header.resend = True
        started = time.perf_counter()
        replies = self.transport.exchange(list(messages))
        seconds = time.perf_counter() - started  # wall time of the whole exchange (parallel messages share it)
        for sent, reply in zip(messages, replies, strict=True):
            self.result.traffic.append({"kind": sent.header.kind.value, "round": sent.header.round,
                                        "to": sent.header.recipient, "sent_bytes": len(sent.payload),
                                        "reply_bytes": len(reply.payload), "reply_chunks": reply.header.chunks,
                                        "reply_max_chunk_bytes": max_chunk_bytes(reply.payload), "seconds": seconds})
            if reply.header.ledger is not None:
                self.result.ledgers[sent.header.recipient] = reply.header.ledger.model_dump()
            if isinstance(reply.header.body, Trained) and reply.header.body.curves is not None:
                self.result.curves = reply.header.body.curves.model_dump()
        replies = raise_refusals(messages, replies)
        self.resend = False
        return replies

    def run(self) -> RunResult:
        """Setup, alignment, rounds; each step that depends on the previous one rides on it, so a run is 3 + 2R
        sequential exchanges (a Flower message costs seconds): the lender's PSI request comes back with its setup
        reply, the alignment tokens go to the payment holder with round 0's embed request, and each party exports
        its part in its last step. With a checkpoint folder, every step is checkpointed once its reply is in."""
        start = time.perf_counter()
        if self.step == 0:
            self._save_checkpoint()  # the run id is on disk before any party hears of it
        while self.step < self.total_steps:
            kind = self.plan[self.step][0].kind
            stage = ("setup_s" if kind is MessageKind.SETUP else "rounds_s" if kind in (MessageKind.EMBED,
                     MessageKind.TRAIN) else "alignment_s")
            t0 = time.perf_counter()
            self._run_step(self.step)
            timing = self.result.timing
            timing[stage] = timing.get(stage, 0.0) + time.perf_counter() - t0
            self.step += 1
            self._save_checkpoint()
        self.result.timing["protocol_s"] = self.result.timing.get("protocol_s", 0.0) + time.perf_counter() - start
        self.progress("done", self.total_steps, self.total_steps)
        return self.result

    def _run_step(self, step: int) -> None:
        """Send exchange `step` of the plan (shared/protocol/steps.py): each row's request carries the payload the
        previous exchange's reply moved on (if the row expects one), and the reply whose payload the plan delivers
        onward becomes the next carry."""
        total, rounds = self.total_steps, self.config.training.rounds
        payload, payload_kind = self.carry
        rows = self.plan[step]
        kind, round_ = rows[0].exchange
        if kind is MessageKind.SETUP:
            self.progress("setup", 0, total)
        elif kind is MessageKind.ALIGN_RESPOND:
            self.progress("alignment", 1, total)
        elif kind is MessageKind.EMBED:
            self.progress(f"round {round_ + 1}/{rounds}: payment embeds", step - 1, total)
        elif kind is MessageKind.TRAIN:
            self.progress(f"round {round_ + 1}/{rounds}: lender trains", step - 1, total)
        setup = SetupRequest(config=self.config, run_id=self.run_id) if kind is MessageKind.SETUP else None
        replies = self._exchange(*(
            request(row.kind, row.recipient, row.round, body=setup) if row.expects is PayloadKind.NONE else
            request(row.kind, row.recipient, row.round, payload=payload, payload_kind=payload_kind, body=setup)
            for row in rows))
        by_party = {row.recipient: reply for row, reply in zip(rows, replies, strict=True)}
        if kind is MessageKind.SETUP:
            self.result.alignment = {"payment_rows": float(by_party["payment"].header.expect(TableSize).rows)}
        elif kind is MessageKind.ALIGN_MATCH:
            sizes = by_party["lender"].header.expect(AlignmentSizes)
            self.result.alignment = {
                "method": "ecdh-psi", "payment_rows": self.result.alignment["payment_rows"],
                **{k: float(getattr(sizes, k)) for k in ("lender_rows", "intersection", "train", "val", "test")},
            }
        elif kind is MessageKind.TRAIN:  # gradients back to the payment holder (moved on below), metrics to us
            self.result.rounds.append({"round": round_, **by_party["lender"].header.metrics})
        # a payload is kept (and checkpointed) only for the step that delivers it: after the last step there is none
        # (the lender's last `train` reply carries nothing; were it to, it would be dropped here, never written)
        onward = [reply for row, reply in zip(rows, replies, strict=True) if row.delivered_as is not None]
        self.carry = (onward[0].payload, onward[0].header.payload_kind) if onward else (b"", "")


def check_blacklist(transport: Transport) -> dict[str, int]:
    """The private blacklist check, its own step: lender (PSI client, applicants) -> payment (PSI server, fraud list)
    -> lender, which keeps the hits. The coordinator sees the two payload sizes only."""

    def ask(message: Envelope) -> Envelope:
        return raise_refusals([message], transport.exchange([message]))[0]

    carry, sizes = (b"", ""), []
    for row in steps.blacklist_plan():
        payload, payload_kind = carry if row.expects is not PayloadKind.NONE else (b"", "")
        reply = ask(request(row.kind, row.recipient, payload=payload, payload_kind=payload_kind))
        if row.delivered_as is not None:
            carry = (reply.payload, reply.header.payload_kind)
            sizes.append(len(reply.payload))
    return {"request_bytes": sizes[0], "response_bytes": sizes[1]}
