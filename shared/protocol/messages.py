"""What crosses between the coordinator and a party: a small typed header and an opaque payload.

The coordinator reads headers (message kind, round, sizes, the metrics a party chose to share) and relays payloads
it never decodes. Party-to-party payloads (embeddings, gradients, alignment tokens) are bytes to everyone but the
receiving party, so they can later be encrypted end to end without changing the coordinator.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

PARTIES = ("payment", "lender")


class Header(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="what the recipient is asked to do or what a reply answers, e.g. 'embed'")
    round: int = -1
    sender: str
    recipient: str
    payload_kind: str = Field("", description="'' when empty; else what the opaque payload holds")
    payload_bytes: int = 0
    metrics: dict[str, float] = Field(default_factory=dict, description="numbers the party chose to share")
    info: dict[str, str | int | float | bool] = Field(default_factory=dict)
    error: str = Field("", description="non-empty when the party refused or failed; the reason")


@dataclass
class Envelope:
    header: Header
    payload: bytes = b""

    def __post_init__(self) -> None:
        self.header.payload_bytes = len(self.payload)


def request(kind: str, recipient: str, round_: int = -1, payload: bytes = b"", payload_kind: str = "",
            info: dict[str, str | int | float | bool] | None = None) -> Envelope:
    header = Header(kind=kind, round=round_, sender="server", recipient=recipient,
                    payload_kind=payload_kind, info=info or {})
    return Envelope(header=header, payload=payload)


def pack_arrays(**arrays: np.ndarray) -> bytes:
    """Party-to-party payload: numpy arrays in one .npz blob (no pickle)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_arrays(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
