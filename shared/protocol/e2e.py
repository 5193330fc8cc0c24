"""End-to-end encryption of party-to-party payloads: the coordinator relays ciphertext it cannot read or forge.

Why: the coordinator (and under Flower the SuperLink and ServerApp) is only half trusted by both parties. Every payload
one party sends the other (PSI messages, alignment tokens, embeddings, gradients) is sealed by the sender with a key
only the two parties can derive:

- each party has a long-term X25519 key pair in its home (`identity.key`, 0600, raw 32 bytes as hex;
  `identity.pub`, raw 32 bytes as hex), created on first use; the peer's public key is pinned in the party's own
  settings (`PartySettings.peer_public_key`) after the operators compare fingerprints out of band;
- per run and direction: key = HKDF-SHA256(X25519(own, peer), salt = "fedscore-e2e-v1" + run id,
  info = "<sender>-><recipient>"), so a run's keys are useless for any other run or for the other direction;
- ChaCha20-Poly1305 with a random 96-bit nonce; the associated data binds the message the recipient will receive it
  in (run id, kind, round, sender, recipient, payload kind), a per-direction sequence number and the chunk's place
  in its exchange (index and count: shared/protocol/chunks.py), so a payload or chunk tampered with, replayed,
  reordered, dropped, or moved to another kind, round, run or direction fails authentication.

Frame (the payload bytes the coordinator sees): b"FSE1" | u16 length of the run id | run id (UTF-8) | u64 sequence |
12-byte nonce | ciphertext with its 16-byte tag. The run id and sequence travel in clear so a receiver can say why it
refuses; both are authenticated through the associated data.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedscore.shared.party_home import PartyHome

MAGIC = b"FSE1"
_HEAD = struct.Struct(">H")
_SEQ = struct.Struct(">Q")
NONCE_BYTES = 12


class SealError(ValueError):
    """A payload that cannot be opened: not sealed, for another run, or failing authentication."""


# -- long-term identity ---------------------------------------------------------------------------------------------
def load_identity(home: Path) -> X25519PrivateKey:
    """The party's key pair from its home, created there (private key 0600) on first use."""
    party_home = PartyHome(home)
    # identity.key: mode 0600, 64 hex characters (raw X25519 private key); identity.pub: its public key, safe to share
    private_path, public_path = party_home.identity_key, party_home.identity_pub
    if not private_path.exists():
        key = X25519PrivateKey.generate()
        # exclusive: two processes starting at once never overwrite each other's key
        if not party_home.write_private(private_path, key.private_bytes_raw().hex() + "\n", exclusive=True):
            return load_identity(home)
        public_path.write_text(key.public_key().public_bytes_raw().hex() + "\n")
        return key
    if private_path.stat().st_mode & 0o077:
        raise SealError(f"{private_path}: readable by others (mode {private_path.stat().st_mode & 0o777:o}); "
                        "chmod 600 it")
    try:
        key = X25519PrivateKey.from_private_bytes(bytes.fromhex(private_path.read_text().strip()))
    except ValueError as exc:
        raise SealError(f"{private_path}: not a hex X25519 private key ({exc})") from None
    if not public_path.exists():
        public_path.write_text(key.public_key().public_bytes_raw().hex() + "\n")
    return key


def public_key_hex(home: Path) -> str:
    """The party's public key (hex), what its operator hands to the other party's operator."""
    return load_identity(home).public_key().public_bytes_raw().hex()


def parse_public_key(text: str) -> bytes:
    """A pinned public key given as hex (64 characters) or base64, as 32 raw bytes."""
    import base64
    import binascii

    text = text.strip()
    try:
        raw = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise SealError(f"pinned public key {text[:20]!r}...: neither 64 hex characters nor base64") from None
    if len(raw) != 32:
        raise SealError(f"pinned public key: {len(raw)} bytes, an X25519 public key has 32")
    return raw


def fingerprint(public_key: bytes) -> str:
    """What operators compare out of band: the first 16 hex characters of sha256(public key), in groups of 4."""
    digest = hashlib.sha256(public_key).hexdigest()[:16]
    return " ".join(digest[i:i + 4] for i in range(0, 16, 4))


# -- one run's channel ----------------------------------------------------------------------------------------------
def _field(value: str | int) -> bytes:
    data = str(value).encode()
    return _HEAD.pack(len(data)) + data


@dataclass(frozen=True)
class Delivery:
    """Where a payload is going: the message the recipient will receive it in. Bound into the associated data."""

    run_id: str
    sender: str
    recipient: str
    kind: str
    round: int
    payload_kind: str
    seq: int
    chunk: int = 0  # this chunk's index in its exchange
    chunks: int = 1  # how many chunks the exchange has (binding it makes a dropped last chunk detectable)

    def associated_data(self) -> bytes:
        return b"fedscore-e2e-v2" + b"".join(_field(v) for v in (self.run_id, self.sender, self.recipient, self.kind,
                                                                 self.round, self.payload_kind, self.seq,
                                                                 self.chunk, self.chunks))


class Channel:
    """The two parties' keys for one run (or one blacklist session): one ChaCha20-Poly1305 key per direction."""

    def __init__(self, own: X25519PrivateKey, peer_public: bytes, own_name: str, peer_name: str, run_id: str) -> None:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
        self.own_name, self.peer_name, self.run_id = own_name, peer_name, run_id
        self.own_fingerprint = fingerprint(own.public_key().public_bytes_raw())
        self.peer_fingerprint = fingerprint(peer_public)
        self._send = ChaCha20Poly1305(self._derive(shared, own_name, peer_name))
        self._receive = ChaCha20Poly1305(self._derive(shared, peer_name, own_name))

    def _derive(self, shared: bytes, sender: str, recipient: str) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"fedscore-e2e-v1" + self.run_id.encode(),
                    info=f"{sender}->{recipient}".encode()).derive(shared)

    def seal(self, plaintext: bytes, delivery: Delivery) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        run = delivery.run_id.encode()
        return (MAGIC + _HEAD.pack(len(run)) + run + _SEQ.pack(delivery.seq) + nonce
                + self._send.encrypt(nonce, plaintext, delivery.associated_data()))

    def open(self, sealed: bytes, delivery: Delivery) -> bytes:
        """The plaintext, or SealError naming both fingerprints (a wrong pinned key and tampering look alike)."""
        _run, _seq, nonce, ciphertext = read_frame(sealed)
        try:
            return self._receive.decrypt(nonce, ciphertext, delivery.associated_data())
        except InvalidTag:
            raise SealError(
                f"{self.own_name}: the {delivery.payload_kind} payload for {delivery.kind} round "
                f"{delivery.round} fails authentication (chunk {delivery.chunk + 1} of {delivery.chunks}): "
                "tampered with, moved from another message, or sealed with "
                f"another key; compare the pinned keys out of band: this party's key {self.own_fingerprint}, "
                f"pinned {self.peer_name} key {self.peer_fingerprint}") from None


def read_frame(sealed: bytes) -> tuple[str, int, bytes, bytes]:
    """(run id, sequence, nonce, ciphertext) of a sealed payload, or SealError if it is not one."""
    if not sealed.startswith(MAGIC) or len(sealed) < len(MAGIC) + _HEAD.size:
        raise SealError("payload is not end-to-end sealed (plaintext from the peer is refused)")
    at = len(MAGIC)
    (length,) = _HEAD.unpack_from(sealed, at)
    at += _HEAD.size
    if len(sealed) < at + length + _SEQ.size + NONCE_BYTES + 16:
        raise SealError("sealed payload is truncated")
    run = sealed[at:at + length].decode(errors="replace")
    at += length
    (seq,) = _SEQ.unpack_from(sealed, at)
    at += _SEQ.size
    return run, seq, sealed[at:at + NONCE_BYTES], sealed[at + NONCE_BYTES:]
