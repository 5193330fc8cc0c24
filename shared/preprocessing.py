"""Per-column scaling a party fits on its own rows and keeps with its model part (so export and scoring match).

Described as data (columns, which get a signed log, mean, std) so it can be written to a manifest and rebuilt in
an ONNX graph without this package.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


@dataclass
class Scaler:
    columns: list[str]
    log_columns: list[str]
    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, columns: list[str], values: np.ndarray, log_columns: list[str]) -> Scaler:
        logged = cls._log(columns, values, log_columns)
        std = logged.std(axis=0)
        std[std < 1e-12] = 1.0
        return cls(columns=list(columns), log_columns=list(log_columns),
                   mean=logged.mean(axis=0).tolist(), std=std.tolist())

    @staticmethod
    def _log(columns: list[str], values: np.ndarray, log_columns: list[str]) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64).copy()
        for j, column in enumerate(columns):
            if column in log_columns:
                values[:, j] = signed_log1p(values[:, j])
        return values

    def transform(self, values: np.ndarray) -> np.ndarray:
        logged = self._log(self.columns, values, self.log_columns)
        return ((logged - np.array(self.mean)) / np.array(self.std)).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)


def heavy_tailed_columns(columns: list[str], values: np.ndarray, ratio: float = 20.0) -> list[str]:
    """Columns whose range dwarfs their spread (money amounts): these get a signed log before scaling."""
    out = []
    for j, column in enumerate(columns):
        col = values[:, j]
        spread = np.percentile(col, 75) - np.percentile(col, 25)
        if np.ptp(col) > ratio * max(spread, 1e-9) and np.abs(col).max() > 100:
            out.append(column)
    return out
