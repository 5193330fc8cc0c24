"""The X25519 work of one chunk, as plain functions a worker process runs (fedscore.shared.alignment.x25519).

Kept in a module of its own that imports only hashlib and `cryptography`: a spawned worker imports this and
nothing heavier (no pandas, no openmined-psi), so a pool starts in a fraction of a second. `cryptography`'s
X25519 `exchange` holds the GIL (two threads measured no faster than one), hence processes, not threads.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

POINT_BYTES = 32
# Domain separation: an ID's curve input is SHA-256 of this prefix and its UTF-8 text, so the values a PSI run
# masks are never the plain SHA-256 of an ID that some other system might also compute.
HASH_PREFIX = b"fedscore-psi-x25519/1\x00"


class PointError(ValueError):
    """A received value X25519 refuses: a point of small order, whose product with any key is the neutral
    element (all-zero output). `index` is its position in the message it came in."""

    def __init__(self, what: str, index: int) -> None:
        super().__init__(f"{what}: value {index} is a point of small order (X25519 gives all zeros); refused")
        self.what, self.index = what, index

    def __reduce__(self) -> tuple[type, tuple[str, int]]:  # crosses back from a worker process
        return PointError, (self.what, self.index)


def hash_to_curve(items: list[str]) -> list[bytes]:
    """Each ID's 32-byte X25519 input: SHA-256 of the prefix and the ID, read as a u-coordinate. As in
    SecretFlow's SodiumCurve25519Cryptor: every 32-byte string is the u-coordinate of a point on Curve25519 or on
    its twist, and both have a large prime-order subgroup (the twist is secure by design), so no map to the
    curve proper is needed."""
    return [hashlib.sha256(HASH_PREFIX + item.encode("utf-8")).digest() for item in items]


def mask_points(key: bytes, points: bytes, keep: int, offset: int, what: str) -> bytes:
    """X25519(key, p) for each 32-byte p in `points`, each result cut to its first `keep` bytes, concatenated.
    Raises PointError (naming the value's position, `offset` + i, in `what`) for a point of small order."""
    secret = X25519PrivateKey.from_private_bytes(key)
    out = bytearray(len(points) // POINT_BYTES * keep)
    for i in range(len(points) // POINT_BYTES):
        try:
            shared = secret.exchange(X25519PublicKey.from_public_bytes(points[i * POINT_BYTES:(i + 1) * POINT_BYTES]))
        except ValueError as exc:  # OpenSSL refuses an all-zero result
            raise PointError(what, offset + i) from exc
        out[i * keep:(i + 1) * keep] = shared[:keep]
    return bytes(out)


def hash_and_mask(key: bytes, items: list[str], offset: int, what: str) -> bytes:
    """X25519(key, H(id)) for each ID, 32 bytes each, concatenated (the first ECDH step of either party)."""
    return mask_points(key, b"".join(hash_to_curve(items)), POINT_BYTES, offset, what)


FUNCTIONS = {"mask_points": mask_points, "hash_and_mask": hash_and_mask}


_LENGTH = 8  # each message on the worker's pipes: an 8-byte big-endian length, then a pickle


def read_message(stream: BinaryIO) -> object | None:
    """One length-prefixed pickle from `stream`, or None at its end. Only ever between a parent and the worker it
    started, over that worker's private pipes."""
    head = stream.read(_LENGTH)
    if len(head) < _LENGTH:
        return None
    size = int.from_bytes(head, "big")
    return pickle.loads(stream.read(size))


def write_message(stream: BinaryIO, value: object) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(_LENGTH, "big") + data)
    stream.flush()


def worker_main() -> None:
    """A worker process (x25519._run starts it as `python -m fedscore.shared.alignment.x25519_ops`): answers each
    (function name, args) read from stdin with ("ok", result) or ("point", (what, index)) on stdout, until stdin
    closes. Jobs come one at a time, so a worker slowed by other load simply takes fewer. Its own interpreter, not
    a multiprocessing child: multiprocessing's spawn re-runs the parent's main script (which breaks a script
    without a __main__ guard), and a fork would copy a party process's threads' locks."""
    while (job := read_message(sys.stdin.buffer)) is not None:
        name, args = job
        try:
            out: tuple[str, object] = ("ok", FUNCTIONS[name](*args))
        except PointError as exc:
            out = ("point", (exc.what, exc.index))
        write_message(sys.stdout.buffer, out)


if __name__ == "__main__":
    worker_main()
