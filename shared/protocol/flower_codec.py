"""Envelope <-> Flower RecordDict. The only place that knows how our messages sit inside Flower's.

The header travels as JSON in a ConfigRecord; the opaque payload as one uint8 Array (Flower chunks large arrays).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedscore.shared.protocol.messages import Envelope, Header

MESSAGE_TYPE = "query.fedscore"
WHOAMI_TYPE = "query.whoami"


def encode(envelope: Envelope) -> RecordDict:
    payload = np.frombuffer(envelope.payload, dtype=np.uint8) if envelope.payload else np.zeros(0, np.uint8)
    return RecordDict({
        "header": ConfigRecord({"json": envelope.header.model_dump_json()}),
        "payload": ArrayRecord({"bytes": Array(ndarray=payload)}),
    })


def decode(content: RecordDict) -> Envelope:
    header = Header.model_validate_json(str(content.config_records["header"]["json"]))
    payload = content.array_records["payload"]["bytes"].numpy().tobytes()
    return Envelope(header=header, payload=payload)
