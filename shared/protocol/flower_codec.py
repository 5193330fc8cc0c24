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
WHOAMI_TYPE = "query.whoami"


def encode_raw(header_json: str, payload: bytes) -> RecordDict:
    array = np.frombuffer(payload, dtype=np.uint8) if payload else np.zeros(0, np.uint8)
    return RecordDict({"header": ConfigRecord({"json": header_json}),
                       "payload": ArrayRecord({"bytes": Array(ndarray=array)})})


def decode_raw(content: RecordDict) -> tuple[str, bytes]:
    return (str(content.config_records["header"]["json"]),
            content.array_records["payload"]["bytes"].numpy().tobytes())


def encode(envelope: Envelope) -> RecordDict:
    return encode_raw(envelope.header.model_dump_json(), envelope.payload)


def decode(content: RecordDict) -> Envelope:
    from fedscore.shared.protocol.messages import Envelope, Header

    header_json, payload = decode_raw(content)
    return Envelope(header=Header.model_validate_json(header_json), payload=payload)
