"""The randomness every guarantee rests on: a ChaCha20 keystream keyed from the operating system.

Why not torch.Generator: a generator seeded from `seed` (or from anything the counterparty or a bundle holder
knows) makes a mechanism replayable. An audit rebuilt the randomized-response flip mask from the run's seed and
recovered every clean label. So every draw a guarantee rests on (randomized-response flips, Gaussian noise, DP-SGD's
Poisson sampling, online noise) comes from `NoiseSource`, whose 256-bit key is read from `os.urandom`, used in
memory only and never stored or logged. Opacus' own `secure_mode` needs torchcsprng, which does not exist for
current torch, so we supply the noise ourselves (`SecureDPOptimizer` in dp_training).

Gaussian draws resist the floating-point attack (Mironov 2012; Jin et al. 2021) the way Opacus' secure mode does:
each value is the sum of four independent draws of std sigma, divided by two (std sigma again), so the low-order
bits of one Box-Muller output no longer reveal where it came from.

`NoiseSource.replayable(seed, *labels)` exists for tests only (`privacy.replayable_noise=true`): its key is derived
from public values, so every guarantee of a run that uses it is VOID, and the report, manifest, CLI and services say
so.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_WORDS_PER_CALL_LIMIT = 1 << 24  # 128 MiB of keystream per call, at most: callers draw per round, not per dataset
_FLOAT_ATTACK_DRAWS = 4  # sum of 4 draws / 2, as Opacus' secure mode (2n draws, n = 2)


class NoiseSource:
    """A cryptographically secure stream of uniform, Bernoulli and Gaussian draws (ChaCha20 keystream).

    One source per mechanism and round is fine; the keystream is never reused (a 32-bit block counter from 0 plus a
    random 96-bit nonce per instance), and the key never leaves this object.
    """

    def __init__(self, key: bytes | None = None, *, replayable: bool = False) -> None:
        if key is None:
            key = os.urandom(32)
        if len(key) != 32:
            raise ValueError("NoiseSource needs a 32-byte key")
        # cryptography's 16-byte ChaCha20 "nonce" is a 32-bit block counter (first 4 bytes) and a 96-bit nonce: the
        # counter starts at 0, so one source can draw 2^32 blocks (256 GiB). A random counter start made a run fail
        # at random ("counter would overflow") once a source drew more blocks than were left before 2^32.
        nonce = hashlib.sha256(b"fedscore-nonce" + key).digest()[:12] if replayable else os.urandom(12)
        self._encryptor = Cipher(algorithms.ChaCha20(key, bytes(4) + nonce), mode=None).encryptor()
        self.replayable = replayable

    @classmethod
    def replayable_from(cls, seed: int, *labels: str) -> NoiseSource:
        """TEST ONLY: a stream anyone who knows `seed` and the labels can replay. Voids every guarantee."""
        key = hashlib.sha256("\x1f".join(["fedscore-replayable", str(seed), *labels]).encode()).digest()
        return cls(key, replayable=True)

    # -- raw draws -------------------------------------------------------------------------------------------------
    def _words(self, n: int) -> np.ndarray:
        """n uniformly random uint64 words."""
        if n < 0 or n > _WORDS_PER_CALL_LIMIT:
            raise ValueError(f"draw of {n} words: split it into smaller draws")
        return np.frombuffer(self._encryptor.update(bytes(8 * n)), dtype="<u8").copy()

    def uniform(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """U[0, 1) in float64 with 53 random bits per value."""
        shape = tuple(shape)
        n = math.prod(shape)
        values = (self._words(n) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
        return torch.from_numpy(values).reshape(shape)

    def bernoulli(self, shape: tuple[int, ...] | torch.Size, p: float) -> torch.Tensor:
        """Independent booleans, True with probability p."""
        if not 0 <= p <= 1:
            raise ValueError(f"probability must be in [0, 1], got {p}")
        return self.uniform(shape) < p

    def _standard_normal(self, n: int) -> np.ndarray:
        """n standard normals by Box-Muller over uniforms in (0, 1]."""
        pairs = (n + 1) // 2
        u = (self._words(2 * pairs) >> np.uint64(11)).astype(np.float64)
        u1 = (u[:pairs] + 1.0) * (1.0 / (1 << 53))  # (0, 1]: log is finite
        u2 = u[pairs:] * (1.0 / (1 << 53))
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * math.pi * u2
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]

    def normal(self, shape: tuple[int, ...] | torch.Size, std: float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """N(0, std^2) per coordinate, each the sum of 4 draws / 2 (resists the floating-point attack)."""
        if not std >= 0 or not math.isfinite(std):
            raise ValueError(f"noise std must be finite and >= 0, got {std}")
        shape = tuple(shape)
        n = math.prod(shape)
        total = np.zeros(n, dtype=np.float64)
        for _ in range(_FLOAT_ATTACK_DRAWS):
            total += self._standard_normal(n)
        scaled = total * (std / math.sqrt(_FLOAT_ATTACK_DRAWS))
        return torch.from_numpy(scaled).reshape(shape).to(dtype)


def noise_source(replayable: bool, seed: int, *labels: str) -> NoiseSource:
    """The source a mechanism draws from: OS-keyed, unless the run is in the (VOID) replayable test mode."""
    return NoiseSource.replayable_from(seed, *labels) if replayable else NoiseSource()
