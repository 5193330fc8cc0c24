"""Per-column preprocessing a party keeps with its model part, derived from its public schema only.

Described as data (columns, clip bounds, which get a signed log, centre, scale, which columns also get one-hot
levels) so it can be written to a manifest; `as_module()` is the same transform in torch, so the exported ONNX
graph carries it and scoring needs nothing from this package.

Training starts from `Scaler.from_schema`: clip bounds, transforms and levels come from what the data owner declared
(shared/data/schema.py). Under differential privacy the centre and scale are then refined by `dp_standardised`:
per-column means and stds released with Gaussian noise and charged to the party's ledger. Nothing else is fitted
on the rows, so the exported graph holds no statistic of users that no record covers. `Scaler.fit` (data-fitted
mean/std) remains for tests and for drafting a schema on the owner's own machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from fedscore.shared.data.schema import DataSchema
    from fedscore.shared.privacy.secure_random import NoiseSource


def signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


@dataclass
class Scaler:
    columns: list[str]
    log_columns: list[str]
    mean: list[float]  # the centre subtracted after the log (from_schema: midpoint of the transformed bounds)
    std: list[float]  # the scale divided by (from_schema: half the transformed range)
    # column -> the integer levels that each get a 0/1 indicator after the scaled value (status codes, bands)
    levels: dict[str, list[float]] = field(default_factory=dict)
    # raw values are clipped to [lower, upper] first (declared public bounds); None = no clipping
    lower: list[float] | None = None
    upper: list[float] | None = None

    @classmethod
    def from_schema(cls, schema: DataSchema) -> Scaler:
        """Every constant from the declared bounds and levels: clip, transform, centre on the midpoint of the
        transformed bounds, divide by half their range (so in-bounds values land in [-1, 1])."""
        centre, scale = [], []
        for column in schema.columns:
            lower, upper = column.bounds
            if column.transform == "log":
                lower, upper = float(signed_log1p(np.array(lower))), float(signed_log1p(np.array(upper)))
            centre.append((lower + upper) / 2)
            scale.append((upper - lower) / 2)
        return cls(columns=schema.names, log_columns=[c.name for c in schema.columns if c.transform == "log"],
                   mean=centre, std=scale,
                   levels={c.name: list(c.levels) for c in schema.columns if c.transform == "onehot" and c.levels},
                   lower=[c.bounds[0] for c in schema.columns], upper=[c.bounds[1] for c in schema.columns])

    @classmethod
    def fit(cls, columns: list[str], values: np.ndarray, log_columns: list[str],
            levels: dict[str, list[float]] | None = None) -> Scaler:
        logged = cls._log(columns, values, log_columns)
        std = logged.std(axis=0)
        std[std < 1e-12] = 1.0
        return cls(columns=list(columns), log_columns=list(log_columns),
                   mean=logged.mean(axis=0).tolist(), std=std.tolist(), levels=dict(levels or {}))

    @staticmethod
    def _log(columns: list[str], values: np.ndarray, log_columns: list[str]) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64).copy()
        for j, column in enumerate(columns):
            if column in log_columns:
                values[:, j] = signed_log1p(values[:, j])
        return values

    @property
    def output_names(self) -> list[str]:
        return [*self.columns, *(f"{c}=={v:g}" for c, levels in self.levels.items() for v in levels)]

    def clip(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if self.lower is None or self.upper is None:
            return values
        return np.clip(values, np.array(self.lower), np.array(self.upper))

    def transform(self, values: np.ndarray) -> np.ndarray:
        values = self.clip(values)
        logged = self._log(self.columns, values, self.log_columns)
        scaled = (logged - np.array(self.mean)) / np.array(self.std)
        indicators = [(values[:, self.columns.index(c)] == v).astype(np.float64)[:, None]
                      for c, levels in self.levels.items() for v in levels]
        return np.hstack([scaled, *indicators]).astype(np.float32)

    def as_module(self) -> nn.Module:
        return ScalerModule(self)

    def to_dict(self) -> dict:
        return asdict(self)


class ScalerModule(nn.Module):
    """`Scaler.transform` in torch ops (min, max, sign, log1p, abs, sub, div, eq): exportable to ONNX."""

    def __init__(self, scaler: Scaler) -> None:
        super().__init__()
        self.clips = scaler.lower is not None and scaler.upper is not None
        if self.clips:
            self.register_buffer("lower", torch.tensor(scaler.lower, dtype=torch.float32))
            self.register_buffer("upper", torch.tensor(scaler.upper, dtype=torch.float32))
        log_mask = [c in scaler.log_columns for c in scaler.columns]
        self.register_buffer("log_mask", torch.tensor(log_mask, dtype=torch.bool))
        self.register_buffer("mean", torch.tensor(scaler.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(scaler.std, dtype=torch.float32))
        pairs = [(scaler.columns.index(c), v) for c, levels in scaler.levels.items() for v in levels]
        self.register_buffer("level_column", torch.tensor([j for j, _ in pairs], dtype=torch.long))
        self.register_buffer("level_value", torch.tensor([v for _, v in pairs], dtype=torch.float32))
        self.has_levels = bool(pairs)  # decided here, not in forward, so tracing sees no data-dependent branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clips:
            x = torch.maximum(torch.minimum(x, self.upper), self.lower)
        logged = torch.where(self.log_mask, torch.sign(x) * torch.log1p(torch.abs(x)), x)
        scaled = (logged - self.mean) / self.std
        if not self.has_levels:
            return scaled
        indicators = (x[:, self.level_column] == self.level_value).to(x.dtype)
        return torch.cat([scaled, indicators], dim=1)


def heavy_tailed_columns(columns: list[str], values: np.ndarray, ratio: float = 20.0) -> list[str]:
    """Columns whose range dwarfs their spread (money amounts): these get a signed log before scaling.
    Looks at the data: for drafting a schema the owner then reviews, never for training."""
    out = []
    for j, column in enumerate(columns):
        col = values[:, j]
        spread = np.percentile(col, 75) - np.percentile(col, 25)
        if np.ptp(col) > ratio * max(spread, 1e-9) and np.abs(col).max() > 100:
            out.append(column)
    return out


def dp_standardised(scaler: Scaler, values: np.ndarray, noise_multiplier: float,
                    source: NoiseSource) -> tuple[Scaler, float]:
    """The schema scaler, re-centred and re-scaled by differentially private per-column means and stds.

    Why: bounds-only scaling leaves features squeezed and off-centre (a log amount spans a fraction of its declared
    range), which DP-SGD feels as noise. Each user's schema-scaled row z (clipped, so every value lies in [-1, 1])
    contributes (z, z^2), whose L2 norm is at most sqrt(2k) for k columns: one Gaussian release of the two sums with
    noise std sigma * sqrt(2k) covers both (add/remove of a user, the row count being disclosed anyway). Returns the
    new scaler and that clip; the caller charges `scaler_statistics_release(sigma, clip)` before anything leaves.
    Indicator columns are not touched.
    """
    k = len(scaler.columns)
    z = scaler.transform(values)[:, :k].astype(np.float64)
    n = max(len(z), 1)
    clip = math.sqrt(2 * k)
    noisy = np.concatenate([z.sum(0), (z ** 2).sum(0)]) + source.normal((2 * k,), noise_multiplier * clip,
                                                                        torch.float64).numpy()
    mean = np.clip(noisy[:k] / n, -1.0, 1.0)
    std = np.sqrt(np.clip(noisy[k:] / n - mean ** 2, MIN_DP_STD ** 2, 1.0))  # a floor: public, never a statistic
    centre, scale = np.asarray(scaler.mean), np.asarray(scaler.std)
    return replace(scaler, mean=(centre + mean * scale).tolist(), std=(std * scale).tolist()), clip


MIN_DP_STD = 0.02  # in schema units (half the declared range): a near-constant column is not blown up by noise
