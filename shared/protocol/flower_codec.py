"""Envelope <-> Flower RecordDict. The only place that knows how our messages sit inside Flower's.

The header travels as JSON in a ConfigRecord; the opaque payload as one uint8 Array (Flower chunks large arrays).
`encode_raw` / `decode_raw` work on the header's JSON text and the payload bytes and import nothing of ours, so the
ClientApp can forward a message to its party worker without loading pydantic models, torch or opacus.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

if TYPE_CHECKING:
    from fedscore.shared.protocol.messages import Envelope

MESSAGE_TYPE = "query.fedscore"


def encode_raw(header_json: str, payload: bytes) -> RecordDict:
    array = np.frombuffer(payload, dtype=np.uint8) if payload else np.zeros(0, np.uint8)
    return RecordDict({"header": ConfigRecord({"json": header_json}),
                       "payload": ArrayRecord({"bytes": Array(ndarray=array)})})


def decode_raw(content: RecordDict, party: str = "") -> tuple[str, bytes]:
    """The header JSON and payload; in an addressed message (`encode_addressed`), the envelope for `party`."""
    if "header" not in content.config_records:
        if f"header.{party}" not in content.config_records:
            raise ValueError(f"this message carries no envelope for party {party!r}")
        return (str(content.config_records[f"header.{party}"]["json"]),
                content.array_records[f"payload.{party}"]["bytes"].numpy().tobytes())
    return (str(content.config_records["header"]["json"]),
            content.array_records["payload"]["bytes"].numpy().tobytes())


def is_for(content: RecordDict, party: str) -> bool:
    """Whether this message holds an envelope for `party` (a plain message holds one for its recipient)."""
    return "header" in content.config_records or f"header.{party}" in content.config_records


def identity_reply(party: str) -> RecordDict:
    """What a node answers to an addressed message with no envelope for its party: only which party it serves."""
    return RecordDict({"whoami": ConfigRecord({"party": party})})


def identity(content: RecordDict) -> str:
    """The party an identity-only reply names, or '' for a reply carrying an envelope."""
    record = content.config_records.get("whoami")
    return str(record["party"]) if record is not None else ""


def encode_addressed(envelopes: list[Envelope]) -> RecordDict:
    """One message holding one envelope per recipient party, each node opening the one addressed to it: how the
    first exchange reaches nodes whose party the ServerApp does not know yet (it cannot read node configs)."""
    content = RecordDict()
    for envelope in envelopes:
        single = encode(envelope)
        content[f"header.{envelope.header.recipient}"] = single.config_records["header"]
        content[f"payload.{envelope.header.recipient}"] = single.array_records["payload"]
    return content


def encode(envelope: Envelope) -> RecordDict:
    return encode_raw(envelope.header.model_dump_json(), envelope.payload)


def decode(content: RecordDict) -> Envelope:
    from fedscore.shared.protocol.messages import Envelope, Header

    header_json, payload = decode_raw(content)
    return Envelope(header=Header.model_validate_json(header_json), payload=payload)
