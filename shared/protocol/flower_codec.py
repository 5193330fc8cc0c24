"""Envelope <-> Flower RecordDict. The only place that knows how our messages sit inside Flower's.

The header travels as JSON in a ConfigRecord; the opaque payload, a bundle of sealed chunks
(shared/protocol/chunks.py), as uint8 Arrays in one ArrayRecord: every chunk of an exchange travels in the one
Flower message (a message costs seconds), packed into Arrays of at most MAX_ARRAY_BYTES cut between chunks (each
under gRPC's 4 MiB default; one Array per chunk measured slower). A payload that is not a bundle is one Array.
`encode_raw` / `decode_raw` work on the header's JSON text and the payload bytes and
import only the standard library, numpy and chunks.py (no pydantic models, torch or opacus), so the ClientApp can
forward a message to its party worker cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedscore.shared.protocol.chunks import bundle_entries, is_bundle

if TYPE_CHECKING:
    from fedscore.shared.protocol.messages import Envelope

MESSAGE_TYPE = "query.fedscore"
PIECE_PREFIX = "bundle."
# the most bytes of sealed chunks one Array carries: under gRPC's 4 MiB default receive limit (the tightest anything
# on the path could set; flwr itself allows 2 GiB) and under Flower's 5 MiB array pieces, so each Array crosses as
# one object. Measured (BENCHMARKS, issue 20 item 2): one Array per chunk cost Flower ~0.15 s per extra Array
# (each is pushed and pulled as an object of its own), so chunks are packed, cut only between two chunks.
MAX_ARRAY_BYTES = 4 * 1024 * 1024 - 64 * 1024


def _array(data: bytes | memoryview) -> Array:
    return Array(ndarray=np.frombuffer(data, dtype=np.uint8) if len(data) else np.zeros(0, np.uint8))


def bundle_pieces(payload: bytes, limit: int = MAX_ARRAY_BYTES) -> list[memoryview]:
    """A bundle cut into consecutive slices of at most `limit` bytes, cut only between two chunk entries (a chunk
    larger than `limit`, possible only with no cap, is a slice of its own)."""
    view = memoryview(payload)
    cuts, start, size = [], 0, len(payload) - sum(len(e) for e in bundle_entries(payload))  # the bundle's head
    for entry in bundle_entries(payload):
        if size and size + len(entry) > limit:
            cuts.append(start + size)
            start, size = start + size, 0
        size += len(entry)
    return [view[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]


def payload_record(payload: bytes) -> ArrayRecord:
    """The payload as Arrays: a bundle of sealed chunks in slices cut between chunks (`bundle.000000`, ...), each
    at most MAX_ARRAY_BYTES unless one chunk is larger; anything else as one Array (`bytes`)."""
    if is_bundle(payload):
        return ArrayRecord({f"{PIECE_PREFIX}{i:06d}": _array(piece)
                            for i, piece in enumerate(bundle_pieces(payload))})
    return ArrayRecord({"bytes": _array(payload)})


def payload_bytes(record: ArrayRecord) -> bytes:
    """The inverse of `payload_record`."""
    names = sorted(name for name in record if name.startswith(PIECE_PREFIX))
    if names:
        return b"".join(record[name].numpy().tobytes() for name in names)
    return record["bytes"].numpy().tobytes()


def encode_raw(header_json: str, payload: bytes) -> RecordDict:
    return RecordDict({"header": ConfigRecord({"json": header_json}), "payload": payload_record(payload)})


def decode_raw(content: RecordDict, party: str = "") -> tuple[str, bytes]:
    """The header JSON and payload; in an addressed message (`encode_addressed`), the envelope for `party`."""
    if "header" not in content.config_records:
        if f"header.{party}" not in content.config_records:
            raise ValueError(f"this message carries no envelope for party {party!r}")
        return (str(content.config_records[f"header.{party}"]["json"]),
                payload_bytes(content.array_records[f"payload.{party}"]))
    return str(content.config_records["header"]["json"]), payload_bytes(content.array_records["payload"])


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
