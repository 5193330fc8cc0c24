"""Chunked payloads: how embeddings and gradients cross in pieces of whole users under a byte cap.

Why: a payload holding every user's row grows with the portfolio (1M users x 8 numbers is 32 MB, in one message,
one allocation, one transcript file); a transport's message limit (gRPC's default 4 MiB) is then a matter of
time. Each chunk is a contiguous run of users, sealed on its own with its own sequence number
(clients/channel.py), so a chunk dropped, replayed or moved is refused by name. All chunks of one exchange still
travel together: in one envelope (a *bundle*, below) and, under Flower, in one message whose RecordDict holds one
Array per chunk (shared/protocol/flower_codec.py), because each Flower message costs seconds.

Two layers, both free of our heavier imports (the Flower ClientApp imports this through flower_codec):

- the *bundle*, what an envelope's payload is once sealed: b"FSB1" | u32 count | count x (u32 index | u32 count |
  u64 length | sealed frame). The index and count travel in clear so a receiver can say which chunk is missing or
  out of place; both are bound into each frame's associated data (shared/protocol/e2e.py `Delivery`), so they
  cannot be edited;
- the *row chunk*, one chunk's plaintext: an .npz with `start` (int64, the first user's position in the exchange)
  and the rows under the payload's name (`embeddings` or `gradients`).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator

import numpy as np

BUNDLE_MAGIC = b"FSB1"
_COUNT = struct.Struct(">I")
_ENTRY = struct.Struct(">IIQ")  # chunk index, chunk count, frame length
CHUNK_ENTRY = _ENTRY.size  # a chunk's bytes in a bundle beyond its sealed frame
# what a sealed row chunk takes beyond its rows: the .npz framing of two arrays (~600 bytes with numpy's zip64
# extras), the sealed frame's own (magic, run id length, sequence, nonce, tag: 42 bytes + the run id) and its
# bundle entry (16 bytes); the run id's length is added where it is known
CHUNK_OVERHEAD = 1024


class ChunkError(ValueError):
    """A bundle or row chunk that cannot be read as one: truncated, miscounted, or rows out of place."""


# -- bundles --------------------------------------------------------------------------------------------------------
def is_bundle(payload: bytes) -> bool:
    return payload.startswith(BUNDLE_MAGIC)


def join_bundle(frames: list[bytes]) -> bytes:
    """The bundle of `frames`, in order (the index and count of each in its entry)."""
    n = len(frames)
    return BUNDLE_MAGIC + _COUNT.pack(n) + b"".join(_ENTRY.pack(i, n, len(f)) + f for i, f in enumerate(frames))


def bundle_entries(payload: bytes) -> list[bytes]:
    """Each entry of a bundle as raw bytes (entry header and frame): what the Flower codec puts one per Array."""
    if not is_bundle(payload) or len(payload) < len(BUNDLE_MAGIC) + _COUNT.size:
        raise ChunkError("payload is not a bundle of sealed chunks")
    (count,) = _COUNT.unpack_from(payload, len(BUNDLE_MAGIC))
    at, entries = len(BUNDLE_MAGIC) + _COUNT.size, []
    for _ in range(count):
        if len(payload) < at + _ENTRY.size:
            raise ChunkError(f"bundle truncated: {len(entries)} of {count} chunk entries present")
        length = _ENTRY.unpack_from(payload, at)[2]
        end = at + _ENTRY.size + length
        if len(payload) < end:
            raise ChunkError(f"bundle truncated inside chunk entry {len(entries)} of {count}")
        entries.append(payload[at:end])
        at = end
    if at != len(payload):
        raise ChunkError(f"bundle has {len(payload) - at} bytes after its {count} chunk entries")
    return entries


def bundle_from_entries(entries: list[bytes]) -> bytes:
    """The inverse of `bundle_entries` (the Flower codec's decoding)."""
    return BUNDLE_MAGIC + _COUNT.pack(len(entries)) + b"".join(entries)


def max_chunk_bytes(payload: bytes) -> int:
    """The largest chunk entry of a bundle (what one Flower Array carries), or the payload's size if it is none:
    a size the coordinator may record like any other (it reads framing, never a frame)."""
    if not is_bundle(payload):
        return len(payload)
    try:
        return max((len(entry) for entry in bundle_entries(payload)), default=0)
    except ChunkError:
        return len(payload)


def read_entry(entry: bytes) -> tuple[int, int, bytes]:
    """(index, count, sealed frame) of one bundle entry."""
    if len(entry) < _ENTRY.size:
        raise ChunkError("chunk entry truncated")
    index, count, length = _ENTRY.unpack_from(entry)
    frame = entry[_ENTRY.size:]
    if len(frame) != length:
        raise ChunkError(f"chunk entry {index}: {len(frame)} bytes, its header says {length}")
    return index, count, frame


def read_bundle(payload: bytes) -> list[tuple[int, int, bytes]]:
    """(index, count, sealed frame) of every entry, in the order they arrived (checked by the channel)."""
    return [read_entry(entry) for entry in bundle_entries(payload)]


# -- row chunks -----------------------------------------------------------------------------------------------------
def rows_per_chunk(cap: int, row_bytes: int, overhead: int = CHUNK_OVERHEAD) -> int | None:
    """Users per chunk so a sealed chunk stays within `cap` bytes; None when `cap` is 0 (no cap: one chunk)."""
    if cap == 0:
        return None
    rows = (cap - overhead) // max(row_bytes, 1)
    if rows < 1:
        raise ChunkError(f"a chunk cap of {cap} bytes leaves no room for one user's row of {row_bytes} bytes "
                         f"after {overhead} bytes of framing: raise exchange.chunk_bytes")
    return rows


def chunk_ranges(n: int, per_chunk: int | None) -> list[tuple[int, int]]:
    """[start, stop) of each chunk of `n` users; always at least one chunk (an empty exchange is one empty chunk,
    so the receiver still learns the width and that nothing is missing)."""
    if per_chunk is None or n == 0:
        return [(0, n)]
    return [(start, min(start + per_chunk, n)) for start in range(0, n, per_chunk)]


def chunk_count(n: int, row_bytes: int, cap: int, overhead: int = CHUNK_OVERHEAD) -> int:
    """How many chunks an exchange of `n` users with rows of `row_bytes` takes under `cap`."""
    return len(chunk_ranges(n, rows_per_chunk(cap, row_bytes, overhead)))


def pack_row_chunks(name: str, values: np.ndarray, cap: int, overhead: int = CHUNK_OVERHEAD) -> list[bytes]:
    """`values` (one row per user) as row chunks under `cap` bytes each once sealed."""
    values = np.ascontiguousarray(values)
    row_bytes = int(values.itemsize * int(np.prod(values.shape[1:], dtype=np.int64)))
    out = []
    for start, stop in chunk_ranges(len(values), rows_per_chunk(cap, row_bytes, overhead)):
        buffer = io.BytesIO()
        np.savez(buffer, start=np.int64(start), **{name: values[start:stop]})
        out.append(buffer.getvalue())
    return out


def unpack_row_chunk(name: str, chunk: bytes) -> tuple[int, np.ndarray]:
    """(start, rows) of one row chunk."""
    try:
        with np.load(io.BytesIO(chunk), allow_pickle=False) as data:
            return int(data["start"]), data[name]
    except (ValueError, KeyError, OSError) as exc:
        raise ChunkError(f"a {name} chunk is not an .npz with 'start' and {name!r} ({exc})") from None


def iter_row_chunks(name: str, chunks: list[bytes]) -> Iterator[tuple[int, np.ndarray]]:
    """(start, rows) of each chunk, checked to follow on from the one before (the first starts at 0)."""
    expected = 0
    for i, chunk in enumerate(chunks):
        start, rows = unpack_row_chunk(name, chunk)
        if start != expected:
            raise ChunkError(f"{name} chunk {i} of {len(chunks)} starts at user {start}, expected {expected}")
        # a NaN or infinity would pass every clip (a clamp keeps NaN) and reach a model or a fit: refused here
        where = f"{name} chunk {i} of {len(chunks)}"
        if rows.dtype.kind not in "fiu":
            raise ChunkError(f"{where} holds not numbers value(s) (rows from user {start})")
        if not np.isfinite(rows).all():
            raise ChunkError(f"{where} holds {int((~np.isfinite(rows)).sum())} non-finite value(s) (rows from user "
                             f"{start})")
        expected = start + len(rows)
        yield start, rows


def gather_rows(name: str, chunks: list[bytes]) -> np.ndarray:
    """Every chunk's rows, concatenated in order."""
    parts = [rows for _, rows in iter_row_chunks(name, chunks)]
    if not parts:
        raise ChunkError(f"no {name} chunks")
    return np.concatenate(parts) if len(parts) > 1 else parts[0]
