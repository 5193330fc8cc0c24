"""ECDH-PSI over X25519 (`cryptography`, i.e. OpenSSL), the protocol SecretFlow runs by default.

Precedent: secretflow/psi, `psi/cryptor/sodium_curve25519_cryptor.cc` (`SodiumCurve25519Cryptor::EccMask`: one
curve25519 scalar multiplication per item, the item's SHA-256 as the u-coordinate, `IEccCryptor::HashToCurve` in
`ecc_cryptor.cc`) and its ECDH-PSI, which compares the first `kFinalCompareBytes` = 12 bytes of the doubly masked
values and "uses sort as shuffle". Why not openmined-psi (fedscore.shared.alignment.psi, still selectable): its
P-256 scalar multiplication costs ~125 us of CPU here against ~45 us for X25519 `exchange`, and at 1M x 500k that
decides whether PSI fits in 90 s on 2 cores (BENCHMARKS.md, "PSI at 1M x 500k").

Steps (the lender learns the intersection, the payment holder only the lender's set size), with a and b fresh
X25519 keys from the OS (`X25519PrivateKey.generate()`, never seeded) and H the hash of x25519_ops.hash_to_curve:

1. lender:  A = {X25519(a, H(x))} for its IDs, sorted (sorting pseudorandom values is a uniform shuffle to anyone
   without `a`; the lender keeps the permutation in its state) -> `lender_request`.
2. payment: B = {X25519(b, A_i)} in A's order, cut to `compare_bytes` each, and C = {X25519(b, H(y))} for its own
   IDs, sorted -> `payment_respond`. C does not depend on the request, so the payment holder may compute it
   beforehand (`payment_prepare`, run at setup while the lender computes A); only B waits for the request.
3. lender:  D = {X25519(a, C_j)} cut the same way; its IDs whose B is in D are the intersection
   -> `lender_intersection`. Both sides are H()^(ab): X25519 clamps each key to a multiple of the cofactor, and
   the x-only ladder commutes on the curve and on its twist alike.

What each side learns (semi-honest, DDH on Curve25519 and its twist): the lender, the intersection and |C| = the
payment holder's set size; the payment holder, |A| = the lender's set size. No H(y) crosses unmasked, and the
coordinator, which relays both messages, sees only masked points and their counts. Each run has fresh keys, so
runs cannot be linked through masked values.

Checks on receipt (each refusal is a `PayloadError` naming the message, the field and the count or position):
the message tag, the declared counts against the byte length, counts within the agreed bounds (`max_request`,
`max_response`), 32-byte points sorted ascending without repeats (what an honest sender produces), no point of
small order, and a comparison length whose false-positive bound stays under FPR_LIMIT.

False positives: a lender ID outside the intersection is reported only if its 12-byte value equals one of the
payment holder's; the chance of any such collision is at most |A| x |C| / 2^96 (6e-18 at 500k x 1M). One would
surface at the token step anyway (tokens.rows_for_tokens refuses a token the payment holder does not hold).

Speed: 2 (|A| + |C|) X25519 operations in all (3M at 1M x 500k, ~45 us each); each batch is split into chunks
run by a pool of worker processes (FEDSCORE_PSI_WORKERS, default: the usable CPUs), since `exchange` holds the GIL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedscore.shared.alignment import x25519_ops
from fedscore.shared.alignment.ids import check_ids
from fedscore.shared.alignment.x25519_ops import POINT_BYTES, PointError

REQUEST_MAGIC = b"FXQ1"  # lender -> payment: A
RESPONSE_MAGIC = b"FXR1"  # payment -> lender: B (cut) and C
_STATE_MAGIC = b"FXS1"  # the lender's own state: key, ID digest, permutation
_PREPARED_MAGIC = b"FXP1"  # the payment holder's own precomputed C and its key
_STATE_FORMAT = "fedscore-psi-x25519-lender/1"
_REQUEST_HEAD = struct.Struct(">Q")  # |A|
_RESPONSE_HEAD = struct.Struct(">IQQ")  # compare bytes, |B|, |C|
_U32 = struct.Struct(">I")
COMPARE_BYTES = 12  # SecretFlow's kFinalCompareBytes: 96 bits
MIN_COMPARE_BYTES = 8
FPR_LIMIT = 1e-9  # the lender refuses a comparison length whose collision bound |A| |C| / 2^(8 cut) exceeds this
_MIN_CHUNK = 10_000  # below this per chunk, a worker process costs more than it saves (~0.3 s to start one)


class PayloadError(ValueError):
    """A payload or state blob that is not what this step expects. (fedscore.shared.alignment.psi re-exports the
    same class, so callers catch one PayloadError whichever protocol ran.)"""


# -- parallel work ----------------------------------------------------------------------------------------------
def default_workers() -> int:
    """Workers per PSI step (processes here, threads for openmined-psi): FEDSCORE_PSI_WORKERS if set, else the
    CPUs this process may use."""
    configured = os.environ.get("FEDSCORE_PSI_WORKERS", "").strip()
    if configured:
        return max(1, int(configured))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _spans(n: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) chunks: a few per worker so one slowed by other load does not hold the rest up."""
    size = max(_MIN_CHUNK, math.ceil(n / (4 * workers)))
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _run(jobs: list[tuple[str, tuple[Any, ...]]], workers: int) -> list[bytes]:
    """Each job's result, in order: inline for one job or one worker, else on `workers` worker processes
    (x25519_ops.worker_main: each its own interpreter, started afresh, so nothing of a party process -- its
    threads, its locks, its main script -- is copied or re-run), each taking the next job when done with one."""
    try:
        if workers <= 1 or len(jobs) <= 1:
            return [x25519_ops.FUNCTIONS[name](*args) for name, args in jobs]
        return _run_in_processes(jobs, min(workers, len(jobs)))
    except PointError as exc:
        raise PayloadError(str(exc)) from None


def _run_in_processes(jobs: list[tuple[str, tuple[Any, ...]]], workers: int) -> list[bytes]:
    results: list[bytes | None] = [None] * len(jobs)
    pending = iter(range(len(jobs)))
    lock, failed = threading.Lock(), threading.Event()
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(workers)]
        procs = [subprocess.Popen([sys.executable, "-m", "fedscore.shared.alignment.x25519_ops"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log) for log in logs]

        def drive(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                while not failed.is_set():  # one worker's refusal stops the others at their next job
                    with lock:
                        i = next(pending, None)
                    if i is None:
                        return
                    x25519_ops.write_message(proc.stdin, jobs[i])
                    answer = x25519_ops.read_message(proc.stdout)
                    if answer is None:
                        log.seek(0)
                        raise RuntimeError(f"X25519 PSI worker process died (exit code {proc.wait()}): "
                                           f"{log.read().decode(errors='replace')[-2000:]}")
                    status, value = answer
                    if status == "point":
                        raise PointError(*value)
                    results[i] = value
            except BaseException:
                failed.set()
                raise
            finally:
                proc.stdin.close()  # the worker exits at the end of its input

        done = False
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:  # one thread per worker, feeding it jobs
                for future in [pool.submit(drive, p, log) for p, log in zip(procs, logs, strict=True)]:
                    future.result()
            done = True
        finally:
            for proc in procs:
                try:
                    proc.wait(timeout=30 if done else 0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return [r if r is not None else b"" for r in results]


def _new_key() -> bytes:
    """A fresh X25519 private key from the OS's CSPRNG (OpenSSL's RAND_bytes), raw 32 bytes."""
    return X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _hash_jobs(key: bytes, items: list[str], workers: int, what: str) -> list[tuple[str, tuple[Any, ...]]]:
    return [("hash_and_mask", (key, items[s:e], s, what)) for s, e in _spans(len(items), workers)]


def _mask_jobs(key: bytes, points: bytes, keep: int, workers: int,
               what: str) -> list[tuple[str, tuple[Any, ...]]]:
    n = len(points) // POINT_BYTES
    return [("mask_points", (key, points[s * POINT_BYTES:e * POINT_BYTES], keep, s, what))
            for s, e in _spans(n, workers)]


# -- framing and checks -----------------------------------------------------------------------------------------
def _as_array(data: bytes, width: int) -> np.ndarray:
    return np.frombuffer(data, dtype=f"S{width}") if data else np.empty(0, dtype=f"S{width}")


def _sorted_unique(points: bytes, what: str) -> None:
    """An honest sender's points are sorted ascending and distinct (distinct IDs, a bijective map): anything else
    is a malformed or replayed message."""
    values = _as_array(points, POINT_BYTES)
    if len(values) > 1:
        bad = np.flatnonzero(values[1:] <= values[:-1])
        if len(bad):
            raise PayloadError(f"{what}: points are not sorted ascending without repeats (first at value "
                               f"{int(bad[0]) + 1} of {len(values)})")


def _ids_digest(items: list[str]) -> bytes:
    return hashlib.sha256(b"\x00".join(s.encode() for s in items)).digest()


def _body(payload: bytes, magic: bytes, what: str) -> bytes:
    if not isinstance(payload, bytes | bytearray | memoryview) or bytes(payload[:len(magic)]) != magic:
        raise PayloadError(f"not an X25519 {what} payload (wrong step, other protocol, or corrupted)")
    return bytes(payload[len(magic):])


def is_request(payload: bytes) -> bool:
    return bytes(payload[:len(REQUEST_MAGIC)]) == REQUEST_MAGIC


def is_state(state: bytes) -> bool:
    return bytes(state[:len(_STATE_MAGIC)]) == _STATE_MAGIC


# -- protocol steps ---------------------------------------------------------------------------------------------
def lender_request(ids: Sequence[object], *, workers: int | None = None) -> tuple[bytes, bytes]:
    """Step 1 (lender): A, one 32-byte masked point per ID, sorted. Returns (payload, private state): the state
    holds the key `a`, the permutation back to the ID order and a digest of the ID list; it stays with the lender."""
    items = check_ids(ids, "lender IDs")
    workers = workers or default_workers()
    key = _new_key()
    masked = b"".join(_run(_hash_jobs(key, items, workers, "lender IDs"), workers))
    values = _as_array(masked, POINT_BYTES)
    order = np.argsort(values, kind="stable")
    head = json.dumps({"format": _STATE_FORMAT, "key": key.hex(), "n": len(items),
                       "ids_sha256": _ids_digest(items).hex()}).encode()
    state = _STATE_MAGIC + _U32.pack(len(head)) + head + order.astype("<u4").tobytes()
    payload = REQUEST_MAGIC + _REQUEST_HEAD.pack(len(items)) + values[order].tobytes()
    return payload, state


def payment_prepare(ids: Sequence[object], *, workers: int | None = None) -> bytes:
    """Step 2's half that needs no request (payment): a fresh key `b` and C = its own IDs masked, sorted. The blob
    holds the key: it stays with the payment holder (its state) and is used for one response only."""
    items = check_ids(ids, "payment IDs")
    workers = workers or default_workers()
    key = _new_key()
    masked = b"".join(_run(_hash_jobs(key, items, workers, "payment IDs"), workers))
    return _PREPARED_MAGIC + key + _ids_digest(items) + np.sort(_as_array(masked, POINT_BYTES)).tobytes()


def _read_request(request: bytes, max_request: int | None) -> bytes:
    body = _body(request, REQUEST_MAGIC, "PSI request")
    if len(body) < _REQUEST_HEAD.size:
        raise PayloadError(f"X25519 PSI request: {len(body)} bytes, too short for its header")
    (n,) = _REQUEST_HEAD.unpack_from(body)
    points = body[_REQUEST_HEAD.size:]
    if n == 0:
        raise PayloadError("X25519 PSI request: no points (the lender's set is empty)")
    if len(points) != n * POINT_BYTES:
        raise PayloadError(f"X25519 PSI request: declares {n} points of {POINT_BYTES} bytes but carries "
                           f"{len(points)} bytes")
    if max_request is not None and n > max_request:
        raise PayloadError(f"X25519 PSI request has {n} IDs, more than the {max_request} agreed")
    _sorted_unique(points, "X25519 PSI request")
    return points


def payment_respond(request: bytes, ids: Sequence[object], *, prepared: bytes | None = None,
                    max_request: int | None = None, compare_bytes: int = COMPARE_BYTES,
                    workers: int | None = None) -> bytes:
    """Step 2 (payment): B = the request masked with `b`, cut to `compare_bytes`, in the request's order, and C.

    With `prepared` (from `payment_prepare` on the same IDs) C and the key come from there and only B is computed;
    without, both are computed here, on one pool. Nothing is kept: the key is used for this response only.
    """
    if not MIN_COMPARE_BYTES <= compare_bytes <= POINT_BYTES:
        raise ValueError(f"compare_bytes must be in [{MIN_COMPARE_BYTES}, {POINT_BYTES}], got {compare_bytes}")
    points = _read_request(request, max_request)
    items = check_ids(ids, "payment IDs")
    workers = workers or default_workers()
    if prepared is not None:
        blob = _body(prepared, _PREPARED_MAGIC, "prepared PSI response")
        key, digest, c_points = blob[:32], blob[32:64], blob[64:]
        if len(key) != 32 or digest != _ids_digest(items) or len(c_points) != len(items) * POINT_BYTES:
            raise PayloadError("prepared X25519 PSI response was made from other IDs than the payment holder's")
        b_part = b"".join(_run(_mask_jobs(key, points, compare_bytes, workers, "X25519 PSI request"), workers))
    else:
        key = _new_key()
        b_jobs = _mask_jobs(key, points, compare_bytes, workers, "X25519 PSI request")
        c_jobs = _hash_jobs(key, items, workers, "payment IDs")
        results = _run(c_jobs + b_jobs, workers)  # C first: its chunks need no request parsing and start at once
        c_points = np.sort(_as_array(b"".join(results[:len(c_jobs)]), POINT_BYTES)).tobytes()
        b_part = b"".join(results[len(c_jobs):])
    n_b, n_c = len(points) // POINT_BYTES, len(c_points) // POINT_BYTES
    return RESPONSE_MAGIC + _RESPONSE_HEAD.pack(compare_bytes, n_b, n_c) + b_part + c_points


def _load_state(state: bytes) -> tuple[dict[str, Any], np.ndarray]:
    try:
        body = _body(state, _STATE_MAGIC, "lender PSI state")
        (head_len,) = _U32.unpack_from(body)
        head = json.loads(body[4:4 + head_len])
        if head.get("format") != _STATE_FORMAT:
            raise ValueError(f"format {head.get('format')!r}")
        saved = {"key": bytes.fromhex(head["key"]), "n": int(head["n"]), "ids_sha256": str(head["ids_sha256"])}
        order = np.frombuffer(body[4 + head_len:], dtype="<u4").astype(np.int64)
        if len(order) != saved["n"]:
            raise ValueError("permutation length")
        return saved, order
    except (ValueError, TypeError, KeyError, AttributeError, struct.error) as exc:
        raise PayloadError(f"not an X25519 lender PSI state blob: {exc}") from exc


def lender_intersection(state: bytes, ids: Sequence[object], payload: bytes, *, max_response: int | None = None,
                        workers: int | None = None) -> np.ndarray:
    """Step 3 (lender): mask C with `a` into D and look each of its own B values up in D.

    Returns the sorted row indices (int64) of `ids` the payment holder also holds. `ids` must be the list given to
    `lender_request` (checked against the digest in `state`). `max_response` bounds |C| (the payment holder's
    announced set size, when known): a response beyond it is refused.
    """
    saved, order = _load_state(state)
    items = check_ids(ids, "lender IDs")
    if len(items) != saved["n"] or _ids_digest(items).hex() != saved["ids_sha256"]:
        raise PayloadError("lender IDs differ from those the PSI request was made from")
    body = _body(payload, RESPONSE_MAGIC, "PSI response")
    if len(body) < _RESPONSE_HEAD.size:
        raise PayloadError(f"X25519 PSI response: {len(body)} bytes, too short for its header")
    cut, n_b, n_c = _RESPONSE_HEAD.unpack_from(body)
    if not MIN_COMPARE_BYTES <= cut <= POINT_BYTES:
        raise PayloadError(f"X25519 PSI response: comparison length {cut} bytes, outside "
                           f"[{MIN_COMPARE_BYTES}, {POINT_BYTES}]")
    if n_b != saved["n"]:
        raise PayloadError(f"X25519 PSI response has {n_b} masked request values for {saved['n']} requested IDs")
    if n_c == 0:
        raise PayloadError("X25519 PSI response: no payment points (the payment holder's set is empty)")
    if max_response is not None and n_c > max_response:
        raise PayloadError(f"X25519 PSI response has {n_c} payment points, more than the {max_response} announced")
    if n_b * n_c / 2.0 ** (8 * cut) > FPR_LIMIT:
        raise PayloadError(f"X25519 PSI response: a {cut}-byte comparison over {n_b} x {n_c} values has a "
                           f"false-positive bound above {FPR_LIMIT:g}")
    expected = _RESPONSE_HEAD.size + n_b * cut + n_c * POINT_BYTES
    if len(body) != expected:
        raise PayloadError(f"X25519 PSI response: declares {n_b} values of {cut} bytes and {n_c} points of "
                           f"{POINT_BYTES} bytes ({expected} bytes with the header) but carries {len(body)} bytes")
    b_values = _as_array(body[_RESPONSE_HEAD.size:_RESPONSE_HEAD.size + n_b * cut], cut)
    c_points = body[_RESPONSE_HEAD.size + n_b * cut:]
    _sorted_unique(c_points, "X25519 PSI response")
    workers = workers or default_workers()
    d_values = _as_array(b"".join(_run(_mask_jobs(saved["key"], c_points, cut, workers, "X25519 PSI response"),
                                       workers)), cut)
    hits = np.isin(b_values, d_values)
    return np.sort(order[hits])
