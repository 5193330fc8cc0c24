"""A party's public data schema: `DIR/<party>/schema.toml`, the only source of its preprocessing constants.

Why a file of declarations rather than statistics: whatever preprocessing constants a party uses end up in the
exported model (inside its ONNX graph and in the manifest). A mean or a median fitted over the training users is a
statistic of those users that no privacy guarantee covers. Bounds, levels and reference values that the data owner
declares from domain knowledge (a credit line is between 0 and 1,000,000; repayment status is one of -2..8) are
public: they describe the domain, not the people in it. So every constant the preprocessing needs is derived from
this file alone: clip to [lower, upper], transform, centre on the midpoint of the transformed bounds, divide by
half their range, plus a 0/1 indicator per declared level.

The file (TOML; the lender's also names its label):

    version = 1
    id = "id"
    label = { name = "label", levels = [0, 1] }   # lender only

    [[columns]]
    name = "LIMIT_BAL"
    type = "numeric"          # numeric | integer | category
    lower = 0
    upper = 1_000_000
    transform = "log"         # none | log (signed log1p) | onehot (value + one indicator per level)
    reference = 100_000       # optional: what reason codes compare against (default: midpoint / first level)
    impute = 0                # optional: public value used for a missing cell

Errors (unknown keys, lower >= upper, levels outside the bounds, a data column the schema does not declare, ...)
are DataErrors naming the file and the column.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Literal, Self

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedscore.shared.data.tables import DataError

SCHEMA_FILE = "schema.toml"
SCHEMA_HELP = ("declare public bounds for each column (see README, 'Data schema'); `fedscore data schema --table "
               "FILE --out schema.toml` drafts one for you to review")


class ColumnSchema(BaseModel):
    """One feature column: its public bounds (or levels), transform, and optional reference and impute values."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    type: Literal["numeric", "integer", "category"]
    lower: float | None = Field(None, description="public lower bound; values below are clipped to it")
    upper: float | None = Field(None, description="public upper bound; values above are clipped to it")
    levels: list[float] | None = Field(None, description="declared codes; each gets a 0/1 indicator with onehot")
    transform: Literal["none", "log", "onehot"] = "none"
    impute: float | None = Field(None, description="public value used for missing cells (else missing is an error)")
    reference: float | None = Field(None, description="the value reason codes compare against (declared, public)")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.levels is not None:
            if not self.levels or len(set(self.levels)) != len(self.levels):
                raise ValueError("levels must be a non-empty list of distinct values")
            if self.lower is None:
                self.lower = min(self.levels)
            if self.upper is None:
                self.upper = max(self.levels)
        if self.type == "category" and self.levels is None:
            raise ValueError("a category column needs its levels")
        if self.transform == "onehot" and self.levels is None:
            raise ValueError("transform onehot needs levels")
        if self.lower is None or self.upper is None:
            raise ValueError("lower and upper bounds are required (or levels, from which they follow)")
        if not (math.isfinite(self.lower) and math.isfinite(self.upper)) or self.lower >= self.upper:
            raise ValueError(f"bounds must be finite with lower < upper, got [{self.lower:g}, {self.upper:g}]")
        if self.levels is not None and not all(self.lower <= v <= self.upper for v in self.levels):
            raise ValueError(f"levels {self.levels} fall outside the bounds [{self.lower:g}, {self.upper:g}]")
        for key in ("reference", "impute"):
            value = getattr(self, key)
            if value is not None and not self.lower <= value <= self.upper:
                raise ValueError(f"{key} {value:g} is outside the bounds [{self.lower:g}, {self.upper:g}]")
        return self

    @property
    def bounds(self) -> tuple[float, float]:
        assert self.lower is not None and self.upper is not None  # set by the validator
        return self.lower, self.upper

    @property
    def reference_value(self) -> float:
        """The declared reference, else a public default: the first declared level, or the midpoint of the bounds."""
        if self.reference is not None:
            return self.reference
        if self.levels is not None and self.transform == "onehot":
            return self.levels[0]
        lower, upper = self.bounds
        return (lower + upper) / 2


class LabelSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["label"] = "label"
    levels: list[int] = Field(default_factory=lambda: [0, 1])

    @model_validator(mode="after")
    def _binary(self) -> Self:
        if sorted(self.levels) != [0, 1]:
            raise ValueError(f"the label's levels must be [0, 1] (1 = default), got {self.levels}")
        return self


class DataSchema(BaseModel):
    """A party's declared columns, in the order its model takes them."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    id: Literal["id"] = "id"
    label: LabelSchema | None = None
    columns: list[ColumnSchema] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        names = [c.name for c in self.columns]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"column {duplicated[0]}: declared more than once")
        if self.id in names or (self.label is not None and self.label.name in names):
            raise ValueError("the id and label columns are declared by `id` and `label`, not as feature columns")
        return self

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> ColumnSchema:
        return self.columns[self.names.index(name)]

    def references(self) -> list[float]:
        return [c.reference_value for c in self.columns]


def _error_location(exc: ValidationError, raw: dict) -> str:
    """'column NAME' for the first error, when it is inside columns[i]; else the field path."""
    loc = exc.errors()[0]["loc"]
    if len(loc) >= 2 and loc[0] == "columns" and isinstance(loc[1], int):
        columns = raw.get("columns") or []
        name = columns[loc[1]].get("name") if loc[1] < len(columns) and isinstance(columns[loc[1]], dict) else None
        return f"column {name or f'#{loc[1] + 1}'}"
    return ".".join(str(part) for part in loc) or "schema"


def parse_schema(text: str, source: Path | str) -> DataSchema:
    """Parse and validate schema TOML; errors are DataErrors naming `source` and the column."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{source}: not valid TOML: {exc}") from exc
    try:
        return DataSchema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise DataError(f"{source}: {_error_location(exc, raw)}: {first['msg']} "
                        f"({'.'.join(str(p) for p in first['loc'])})") from exc


def load_schema(directory: Path) -> DataSchema:
    """DIR/<party>/schema.toml, or a DataError saying it is missing and how to make one."""
    path = Path(directory) / SCHEMA_FILE
    if not path.is_file():
        raise DataError(f"{path} missing: {SCHEMA_HELP}")
    return parse_schema(path.read_text(encoding="utf-8"), path)


def find_schema(directory: Path) -> DataSchema | None:
    path = Path(directory) / SCHEMA_FILE
    return parse_schema(path.read_text(encoding="utf-8"), path) if path.is_file() else None


def check_columns(schema: DataSchema, columns: list[str], table: Path | str, schema_source: Path | str) -> None:
    """The table's feature columns must be exactly the declared ones (in any order)."""
    undeclared = [c for c in columns if c not in schema.names]
    if undeclared:
        raise DataError(f"{table}: column {undeclared[0]}: not declared in {schema_source} ({SCHEMA_HELP})")
    missing = [c for c in schema.names if c not in columns]
    if missing:
        raise DataError(f"{table}: missing column(s) {', '.join(missing)} declared in {schema_source}")


def impute_frame(frame: pd.DataFrame, schema: DataSchema) -> dict[str, int]:
    """Fill missing cells of columns with a declared `impute` value, in place; returns how many per column."""
    filled: dict[str, int] = {}
    for column in schema.columns:
        if column.impute is not None and column.name in frame.columns:
            missing = frame[column.name].isna()
            if missing.any():
                filled[column.name] = int(missing.sum())
                frame[column.name] = frame[column.name].where(~missing, column.impute)
    return filled


def clip_report(schema: DataSchema, values: np.ndarray) -> dict[str, dict[str, int]]:
    """How many values of each column lie outside the declared bounds (they will be clipped): the owner's own log,
    never sent anywhere."""
    report: dict[str, dict[str, int]] = {}
    for j, column in enumerate(schema.columns):
        lower, upper = column.bounds
        below, above = int((values[:, j] < lower).sum()), int((values[:, j] > upper).sum())
        if below or above:
            report[column.name] = {"below_lower": below, "above_upper": above}
    return report


# ------------------------------------------------------------------------------------------------ writing TOML


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def schema_to_toml(schema: DataSchema, header: str = "") -> str:
    """Write a schema as TOML (no third-party writer needed: the format is small and flat)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += ["version = 1", f'id = "{schema.id}"']
    if schema.label is not None:
        levels = ", ".join(map(str, schema.label.levels))
        lines.append(f'label = {{ name = "{schema.label.name}", levels = [{levels}] }}')
    for column in schema.columns:
        lines += ["", "[[columns]]", f'name = "{column.name}"', f'type = "{column.type}"']
        lower, upper = column.bounds
        lines += [f"lower = {_num(lower)}", f"upper = {_num(upper)}"]
        if column.levels is not None:
            lines.append(f"levels = [{', '.join(_num(v) for v in column.levels)}]")
        lines.append(f'transform = "{column.transform}"')
        for key in ("reference", "impute"):
            value = getattr(column, key)
            if value is not None:
                lines.append(f"{key} = {_num(value)}")
    return "\n".join(lines) + "\n"


def write_schema(path: Path, schema: DataSchema, header: str = "") -> None:
    text = schema_to_toml(schema, header)
    parse_schema(text, path)  # what we write must read back
    Path(path).write_text(text, encoding="utf-8")
