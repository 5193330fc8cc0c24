"""Private set intersection (ECDH-PSI) as pure, serialisable protocol steps, over one of two implementations.

`alignment.psi` in the run config picks the lender's protocol: "x25519" (fedscore.shared.alignment.x25519, X25519
from `cryptography`, SecretFlow's default; the default here) or "openmined" (OpenMined `openmined-psi` on P-256,
described below). The steps below dispatch: `lender_request` makes the chosen protocol's request, and the
payment holder's `payment_respond` and the lender's `lender_intersection` follow the request's tag and the
state's format, so the blacklist check and a run agree without further settings. The rest of this docstring is
about openmined-psi; x25519.py documents its own protocol (what each side learns is the same).

Alignment (the lender is the PSI client and learns the intersection; the payment holder is the PSI server):

1. lender:  `lender_request(ids)` -> (request payload, lender state). The state holds the lender's one-run secret
   key and stays with the lender (its state directory); it must never be put in a payload or a header.
2. payment: `payment_respond(request, ids)` -> payload = server setup (its own IDs, blinded with a fresh key and
   packed in a Golomb-compressed set) + the lender's request re-blinded with that key.
3. lender:  `lender_intersection(state, ids, payload)` -> sorted row indices of the lender's IDs that the payment
   holder also holds. An empty result is the caller's to reject (`require_intersection` -> `EmptyIntersection`).
4. the order both parties share (fedscore.shared.alignment.tokens): HMAC tokens of the intersection, sorted; the
   lender sends them, the payment holder finds its own rows in the same order.

What each side learns (ECDH-PSI is secure against semi-honest parties under the decisional Diffie-Hellman
assumption on P-256; each run uses fresh keys, so runs cannot be linked through the blinded values):

* lender: the intersection (which of its own IDs the payment holder also has) and |payment set| (the setup size
  grows with it; GCS holds one entry per payment ID). Nothing about the payment holder's other IDs.
* payment holder: |lender set| (one blinded point per lender ID in the request) and, after step 4, the
  intersection as rows of its own table -- which it needs to compute embeddings for those users. Nothing about the
  lender's other IDs.
* coordinator: only sizes -- |lender set| from the request (33 bytes per ID), |payment set| from the setup, and
  |intersection| from the token payload (16 bytes per aligned user). It sees no ID and no plain hash of one: the
  request and response hold hash-to-curve points raised to secret exponents, the setup holds hashes of points
  blinded with the payment key, and the tokens are HMACs under the secret the parties share and it lacks.

A PSI client can query any IDs it likes: a lender could pad its request with guessed IDs and learn which the
payment holder has. The payment holder sees the request size, and `payment_respond(max_request=...)` refuses
requests larger than it agreed to serve.

Blacklist check: the same three PSI steps (`lender_request` on the applicants, `payment_respond` with the payment
holder's fraud list as the server set, `lender_intersection` -> the rows of listed applicants). The lender learns
which of its applicants are on the list (and the list's size); the payment holder learns only the number of
applicants and never receives the result -- so the lender must not send the hits, or a count of them, back to
anyone. No token step follows.

Speed: each ID costs about four P-256 scalar multiplications in total (lender: hash-to-curve and blind, then
unblind; payment: blind its own, re-blind the lender's), i.e. roughly 200 CPU-seconds at 1M x 1M. Every step
runs in chunks on a thread pool (the library releases the GIL; each thread needs its own client/server object,
made from the same key, because one object is not thread-safe). Set FEDSCORE_PSI_WORKERS to cap the threads.

Errors: bad input data -> `DataError` (the ID checks live in fedscore.shared.alignment.ids); a payload that is
not what this step expects -> `PayloadError`. Both are ValueErrors, whose messages a party forwards to the
coordinator, so by default they name rows, never ID values.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import numpy as np
import private_set_intersection.python as _psi

from fedscore.shared.alignment import x25519
from fedscore.shared.alignment.ids import check_ids
from fedscore.shared.alignment.x25519 import PayloadError, default_workers
from fedscore.shared.data.tables import DataError

DataStructureName = Literal["gcs", "bloom", "raw"]
ProtocolName = Literal["x25519", "openmined"]
DEFAULT_PROTOCOL: ProtocolName = "x25519"
PROTOCOLS: tuple[ProtocolName, ...] = ("x25519", "openmined")
__all__ = ["DEFAULT_PROTOCOL", "PROTOCOLS", "EmptyIntersection", "PayloadError", "ProtocolName", "default_workers",
           "lender_intersection", "lender_request", "payment_prepare", "payment_respond", "require_intersection"]

# Golomb-compressed set (GCS) by default. Measured at 1M x 1M IDs, fpr 1e-9 (scripts/bench_psi.py): setup plus
# response 40.6 MB, against 44.0 MB for a Bloom filter and 70.0 MB for RAW points; CPU for the whole alignment
# 224 s, against 245 s for Bloom (a Bloom lookup computes ~50 hashes per ID, GCS one) and 227 s for RAW -- the
# elliptic-curve work dominates. A GCS/Bloom setup is one library call, though, so it runs on one core (~60 CPU-s
# at 1M), while a RAW setup splits across threads and is exact: with several free cores at the payment holder and
# ~30 MB more traffic per 1M IDs acceptable, data_structure="raw" has the shortest wall clock.
DEFAULT_DATA_STRUCTURE: DataStructureName = "gcs"
_DATA_STRUCTURES = {
    "gcs": _psi.DataStructure.GCS,
    "bloom": _psi.DataStructure.BLOOM_FILTER,
    "raw": _psi.DataStructure.RAW,
}

_REQUEST_MAGIC = b"FPQ1"  # lender -> payment: PSI request
_RESPONSE_MAGIC = b"FPR1"  # payment -> lender: setup + response
_STATE_FORMAT = "fedscore-psi-lender/1"
_MIN_CHUNK = 20_000  # below this a thread pool costs more than it saves

T = TypeVar("T")
R = TypeVar("R")


class EmptyIntersection(DataError):
    """The two parties have no user in common: nothing to train on."""


# -- outcome ----------------------------------------------------------------------------------------------------------
def require_intersection(rows: np.ndarray, what: str = "alignment") -> np.ndarray:
    """Return `rows` unchanged, or raise EmptyIntersection: the step after PSI needs at least one common user."""
    if len(rows) == 0:
        raise EmptyIntersection(f"{what}: the parties have no user in common (empty intersection)")
    return rows


# -- threading ----------------------------------------------------------------------------------------------------
def _chunks(items: Sequence[T], workers: int) -> list[Sequence[T]]:
    """A few chunks per worker so a worker slowed by other load does not hold the others up."""
    size = max(_MIN_CHUNK, math.ceil(len(items) / (4 * workers)))
    return [items[i:i + size] for i in range(0, len(items), size)] or [items]


def _map(fn: Callable[[T], R], chunks: Sequence[T], workers: int) -> list[R]:
    if workers <= 1 or len(chunks) <= 1:
        return [fn(c) for c in chunks]
    with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        return list(pool.map(fn, chunks))


# -- framing ------------------------------------------------------------------------------------------------------
def expect_magic(payload: bytes, magic: bytes, what: str) -> bytes:
    if not isinstance(payload, bytes | bytearray | memoryview) or bytes(payload[:len(magic)]) != magic:
        raise PayloadError(f"not a {what} payload (wrong step or corrupted)")
    return bytes(payload[len(magic):])


def _parse(message: Any, data: bytes, what: str) -> Any:
    try:
        message.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise PayloadError(f"corrupted {what}: {exc}") from exc
    return message


def _ids_digest(items: list[str]) -> str:
    """Digest of the lender's whole ID list, kept in its own state to catch a different list at step 3."""
    return hashlib.sha256(b"\x00".join(s.encode() for s in items)).hexdigest()


# -- PSI steps ----------------------------------------------------------------------------------------------------
def _openmined_request(ids: Sequence[object], *, workers: int | None = None) -> tuple[bytes, bytes]:
    """Step 1 (lender): blind each of its IDs with a fresh secret key.

    Returns (payload to relay to the payment holder, private state for step 3). The payload holds one 33-byte
    P-256 point per ID, in the order of `ids`. The state blob (JSON, ~200 bytes) holds the key, the number of IDs
    and a digest of the list; keep it with the lender only -- with the key, anyone holding the request could
    test guessed IDs against it.
    """
    items = check_ids(ids, "lender IDs")
    workers = workers or default_workers()
    key = _psi.client.CreateWithNewKey(True).GetPrivateKeyBytes()

    def blind(chunk: Sequence[str]) -> bytes:
        return _psi.client.CreateFromKey(key, True).CreateRequest(list(chunk)).SerializeToString()

    # Serialised protobufs concatenate into their merge: the repeated field keeps chunk order, the flag is the same.
    payload = _REQUEST_MAGIC + b"".join(_map(blind, _chunks(items, workers), workers))
    state = json.dumps({"format": _STATE_FORMAT, "key": key.hex(), "n": len(items),
                        "ids_sha256": _ids_digest(items)}).encode()
    return payload, state


def _openmined_respond(request: bytes, ids: Sequence[object], fpr: float = 1e-9, *,
                          data_structure: DataStructureName = DEFAULT_DATA_STRUCTURE, max_request: int | None = None,
                       workers: int | None = None) -> bytes:
    """Step 2 (payment): blind its own IDs into a setup and re-blind the lender's request, with a fresh key.

    `fpr` bounds the probability that the lender's whole query gets any false positive (the library divides it by
    the request size); a false positive would surface at the token step, where `rows_for_tokens` refuses a token
    that is not the payment holder's. Nothing is kept: the key is used once and dropped.
    """
    items = check_ids(ids, "payment IDs")
    if data_structure not in _DATA_STRUCTURES:
        raise ValueError(f"data_structure must be one of {sorted(_DATA_STRUCTURES)}, not {data_structure!r}")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    parsed = _parse(_psi.Request(), expect_magic(request, _REQUEST_MAGIC, "PSI request"), "PSI request")
    n_request = len(parsed.encrypted_elements)
    if n_request == 0 or not parsed.reveal_intersection:
        raise PayloadError("PSI request is empty or does not ask for the intersection")
    if max_request is not None and n_request > max_request:
        raise PayloadError(f"PSI request has {n_request} IDs, more than the {max_request} agreed")
    workers = workers or default_workers()
    key = _psi.server.CreateWithNewKey(True).GetPrivateKeyBytes()
    kind = _DATA_STRUCTURES[data_structure]

    def setup(chunk: Sequence[str]) -> bytes:
        server = _psi.server.CreateFromKey(key, True)
        return server.CreateSetupMessage(fpr, n_request, list(chunk), kind).SerializeToString()

    def reblind(chunk: Sequence[bytes]) -> bytes:
        part = _psi.Request(reveal_intersection=True)
        part.encrypted_elements.extend(chunk)
        try:
            return _psi.server.CreateFromKey(key, True).ProcessRequest(part).SerializeToString()
        except RuntimeError as exc:  # points that do not decode
            raise PayloadError(f"PSI request holds invalid points: {exc}") from exc

    elements = list(parsed.encrypted_elements)
    chunks = _chunks(elements, workers)
    # A GCS or Bloom setup is one library call over all IDs; a RAW setup is just the sorted blinded points, so it
    # can be built in chunks (same key) and merged -- the client binary-searches it, hence the sort.
    setup_chunks = _chunks(items, workers) if data_structure == "raw" else [items]
    if workers <= 1:
        setups, parts = [setup(c) for c in setup_chunks], [reblind(c) for c in chunks]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            setup_futures = [pool.submit(setup, c) for c in setup_chunks]  # first: the longest task starts early
            parts = list(pool.map(reblind, chunks))
            setups = [f.result() for f in setup_futures]
    if len(setups) == 1:
        setup_bytes = setups[0]
    else:
        merged = _psi.ServerSetup()
        merged.ParseFromString(b"".join(setups))  # concatenation = merge: the points of every chunk
        points = sorted(merged.raw.encrypted_elements)  # bytes order = the library's (memcmp) order
        del merged.raw.encrypted_elements[:]
        merged.raw.encrypted_elements.extend(points)
        setup_bytes = merged.SerializeToString()
    return _RESPONSE_MAGIC + struct.pack(">Q", len(setup_bytes)) + setup_bytes + b"".join(parts)


def _load_state(state: bytes) -> dict[str, Any]:
    try:
        blob = json.loads(state)
        if blob.get("format") != _STATE_FORMAT:
            raise ValueError(f"format {blob.get('format')!r}")
        return {"key": bytes.fromhex(blob["key"]), "n": int(blob["n"]), "ids_sha256": str(blob["ids_sha256"])}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PayloadError(f"not a lender PSI state blob: {exc}") from exc


def _openmined_intersection(state: bytes, ids: Sequence[object], payload: bytes, *,
                            workers: int | None = None) -> np.ndarray:
    """Step 3 (lender): unblind the response and look it up in the setup.

    Returns the sorted row indices (int64) of `ids` that the payment holder also holds. `ids` must be the very list
    given to `lender_request` (checked against the digest in `state`), since the indices refer to its order.
    """
    saved = _load_state(state)
    items = check_ids(ids, "lender IDs")
    if len(items) != saved["n"] or _ids_digest(items) != saved["ids_sha256"]:
        raise PayloadError("lender IDs differ from those the PSI request was made from")
    body = expect_magic(payload, _RESPONSE_MAGIC, "PSI response")
    if len(body) < 8:
        raise PayloadError("truncated PSI response")
    (setup_len,) = struct.unpack(">Q", body[:8])
    if setup_len > len(body) - 8:
        raise PayloadError("truncated PSI response")
    setup = _parse(_psi.ServerSetup(), body[8:8 + setup_len], "PSI setup")
    response = _parse(_psi.Response(), body[8 + setup_len:], "PSI response")
    elements = list(response.encrypted_elements)
    if len(elements) != saved["n"]:
        raise PayloadError(f"PSI response has {len(elements)} entries for {saved['n']} requested IDs")
    workers = workers or default_workers()
    key = saved["key"]
    chunks = _chunks(range(len(elements)), workers)

    def unblind(rows: Sequence[int]) -> list[int]:
        part = _psi.Response()
        part.encrypted_elements.extend(elements[rows[0]:rows[-1] + 1])
        try:
            found = _psi.client.CreateFromKey(key, True).GetIntersection(setup, part)
        except RuntimeError as exc:
            raise PayloadError(f"PSI response does not decode: {exc}") from exc
        return [rows[0] + i for i in found]

    found = [i for part in _map(unblind, chunks, workers) for i in part]
    return np.unique(np.asarray(found, dtype=np.int64))


# -- the steps, whichever protocol -------------------------------------------------------------------------------
def lender_request(ids: Sequence[object], *, protocol: ProtocolName = DEFAULT_PROTOCOL,
                   workers: int | None = None) -> tuple[bytes, bytes]:
    """Step 1 (lender): the chosen protocol's request and the lender's private state for step 3."""
    if protocol == "x25519":
        return x25519.lender_request(ids, workers=workers)
    if protocol == "openmined":
        return _openmined_request(ids, workers=workers)
    raise ValueError(f"PSI protocol must be one of {list(PROTOCOLS)}, not {protocol!r}")


def payment_prepare(ids: Sequence[object], *, protocol: ProtocolName = DEFAULT_PROTOCOL,
                    workers: int | None = None) -> bytes | None:
    """The part of step 2 that needs no request (payment, at setup, while the lender makes its request): the
    payment holder's own masked IDs and the key they were masked with (x25519); None for openmined-psi, whose
    setup depends on the request's size. The blob holds a secret key: it stays in the payment holder's state."""
    if protocol == "x25519":
        return x25519.payment_prepare(ids, workers=workers)
    if protocol == "openmined":
        return None
    raise ValueError(f"PSI protocol must be one of {list(PROTOCOLS)}, not {protocol!r}")


def payment_respond(request: bytes, ids: Sequence[object], fpr: float = 1e-9, *,
                    data_structure: DataStructureName = DEFAULT_DATA_STRUCTURE, max_request: int | None = None,
                    prepared: bytes | None = None, protocol: ProtocolName | None = None,
                    workers: int | None = None) -> bytes:
    """Step 2 (payment), in the protocol of the request's tag. `protocol`, when given (a run's config), must be
    the request's: a request in another protocol is refused. `fpr` and `data_structure` are openmined-psi's;
    `prepared` (payment_prepare's blob) is x25519's and is ignored for an openmined request."""
    is_x25519 = isinstance(request, bytes | bytearray | memoryview) and x25519.is_request(request)
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"PSI protocol must be one of {list(PROTOCOLS)}, not {protocol!r}")
    if protocol is not None and (protocol == "x25519") != is_x25519:
        raise PayloadError(f"PSI request is not an {protocol} request (alignment.psi = {protocol!r} in the run "
                           "config)")
    if is_x25519:
        return x25519.payment_respond(request, ids, prepared=prepared, max_request=max_request, workers=workers)
    return _openmined_respond(request, ids, fpr, data_structure=data_structure, max_request=max_request,
                              workers=workers)


def lender_intersection(state: bytes, ids: Sequence[object], payload: bytes, *, max_response: int | None = None,
                        workers: int | None = None) -> np.ndarray:
    """Step 3 (lender), in the protocol its state was made for: sorted row indices (int64) of `ids` the payment
    holder also holds. `max_response` (x25519 only) bounds the payment holder's set size."""
    if isinstance(state, bytes | bytearray | memoryview) and x25519.is_state(state):
        return x25519.lender_intersection(state, ids, payload, max_response=max_response, workers=workers)
    return _openmined_intersection(state, ids, payload, workers=workers)
