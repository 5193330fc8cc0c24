"""Keyed hashes of IDs: the alignment tokens and the train/validation/test assignment.

Both parties hold the same secret (agreed between them, never given to the coordinator), so each derives the
same token for the same user and the same split for that user without exchanging anything more. The coordinator,
lacking the key, cannot link a token to an ID.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST = 0, 1, 2


def keyed_tokens(ids: list[str], secret: bytes) -> np.ndarray:
    """HMAC-SHA256 of each ID, first 16 bytes, as an array of 16-byte strings (sortable, comparable)."""
    digests = [hmac.new(secret, i.encode(), hashlib.sha256).digest()[:16] for i in ids]
    return np.array(digests, dtype="S16")


def assign_splits(tokens: np.ndarray, test_fraction: float, val_fraction: float, secret: bytes) -> np.ndarray:
    """0 train / 1 validation / 2 test, from a second keyed hash of the token (independent of the ordering)."""
    u = np.array(
        [int.from_bytes(hmac.new(secret, b"split:" + t, hashlib.sha256).digest()[:8], "big") / 2.0**64
         for t in tokens.tolist()],
        dtype=np.float64,
    )
    split = np.full(len(tokens), SPLIT_TRAIN, dtype=np.int8)
    split[u < test_fraction + val_fraction] = SPLIT_VAL
    split[u < test_fraction] = SPLIT_TEST
    return split
