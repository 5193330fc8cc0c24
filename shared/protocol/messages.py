"""What crosses between the coordinator and a party: a small typed header and an opaque payload.

The coordinator reads headers (message kind, round, sizes, the typed body and metrics a party chose to share) and
relays payloads it never decodes. Party-to-party payloads (embeddings, gradients, alignment tokens) are sealed end to
end by the sending party (shared/protocol/e2e.py, clients/channel.py): ciphertext to everyone but the receiver.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedscore.shared.protocol.bodies import Body, LedgerReport

PARTIES = ("payment", "lender")


class MessageKind(StrEnum):
    """Every request the protocol has; a reply carries the kind it answers. On the wire: the string value.

    Dependent steps ride on each other (server/coordinator.py): the lender's setup reply carries its PSI request,
    round 0's embed request carries the alignment tokens, and each party exports in its last step."""

    SETUP = "setup"
    ALIGN_RESPOND = "align.respond"
    ALIGN_MATCH = "align.match"
    EMBED = "embed"
    TRAIN = "train"
    BLACKLIST_REQUEST = "blacklist.request"
    BLACKLIST_RESPOND = "blacklist.respond"
    BLACKLIST_MATCH = "blacklist.match"


class UnknownKind(ValueError):
    """A message kind the protocol does not have (a typo, or a peer speaking another version)."""


def message_kind(value: str) -> MessageKind:
    """`value` as a MessageKind, or UnknownKind naming the kinds there are."""
    try:
        return MessageKind(value)
    except ValueError:
        raise UnknownKind(f"unknown message kind {value!r}; the protocol has {', '.join(MessageKind)}") from None


class UnexpectedBody(ValueError):
    """A header whose body is not the type its reader needs for this kind of message."""


B = TypeVar("B", bound=BaseModel)


class Header(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: MessageKind = Field(description="what the recipient is asked to do or what a reply answers")
    round: int = -1
    sender: str
    recipient: str
    payload_kind: str = Field("", description="'' when empty; else what the opaque payload holds")
    payload_bytes: int = 0
    chunks: int = Field(0, description="sealed chunks the payload holds (shared/protocol/chunks.py); 0 when none")
    metrics: dict[str, float] = Field(default_factory=dict, description="numbers the party chose to share")
    body: Body | None = Field(None, description="the typed record this kind of message carries, if any")
    ledger: LedgerReport | None = Field(None, description="replies: the sender's lifetime ledger, once it has one")
    error: str = Field("", description="non-empty when the party refused or failed; the reason")
    resend: bool = Field(False, description="requests: a resumed coordinator re-sends the last step it has no "
                         "reply for; a party that already served exactly this request returns the reply it sent "
                         "then (nothing runs or is released again), else serves it as usual (clients/base.py)")

    def expect(self, body_type: type[B]) -> B:
        """The body, checked to be a `body_type`: a reader states what it needs instead of probing keys."""
        if not isinstance(self.body, body_type):
            got = type(self.body).__name__ if self.body is not None else "no body"
            raise UnexpectedBody(f"{self.sender}: {self.kind.value!r} carries {got}, expected {body_type.__name__}")
        return self.body


@dataclass
class Envelope:
    """A header and its payload. Inside a party only, `parts` holds a payload's plaintext chunks: what a handler
    returns for the channel to seal one by one, and what the channel hands a handler once each chunk is opened (on
    the wire the payload is the sealed bundle, clients/channel.py)."""

    header: Header
    payload: bytes = b""
    parts: list[bytes] | None = None

    def __post_init__(self) -> None:
        self.header.payload_bytes = len(self.payload)


def request(kind: MessageKind | str, recipient: str, round_: int = -1, payload: bytes = b"", payload_kind: str = "",
            body: Body | None = None) -> Envelope:
    header = Header(kind=message_kind(kind), round=round_, sender="server", recipient=recipient,
                    payload_kind=payload_kind, body=body)
    return Envelope(header=header, payload=payload)


def pack_arrays(**arrays: np.ndarray) -> bytes:
    """Party-to-party payload: numpy arrays in one .npz blob (no pickle)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_arrays(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
