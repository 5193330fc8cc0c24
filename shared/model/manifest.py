"""The model bundle's manifest: what `RUN_DIR/model` holds, how each part is fed, and the SHA-256 of every file.

Kept free of torch so scorers (batch, the online services, third parties) can read and check a bundle with
pydantic and hashlib alone. `load_manifest` refuses a bundle whose files do not hash to what the manifest says.

What a manifest may hold is deliberately narrow (extra="forbid"): nothing in model/ may be a statistic of training
users that no privacy guarantee covers. So there are no metrics here (they are evaluation figures computed with clean
labels; they stay in RUN_DIR/metrics.json), no training-embedding mean (the payment side's reason-code reference is
the zero embedding, a public constant), and the lender reference is the one declared in the lender's schema.toml.
Format 2 is the first with these rules; a format-1 bundle is refused and must be re-exported.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedscore.shared.atomic import write_text_atomic
from fedscore.shared.scoring.scorecard import ScorecardParams

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = "2"  # 2: no metrics, no embedding baseline; declared references
PAYMENT_FILE = "payment_part.onnx"
LENDER_FILE = "lender_part.onnx"
PART_NAMES = ("payment", "lender")

PAYMENT_INPUT = "payment_features"
LENDER_INPUT = "lender_features"
EMBEDDING = "embedding"
PROBABILITY = "probability"
LOGIT = "logit"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large files do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------- manifest


class PartManifest(BaseModel):
    """One ONNX part as the manifest records it: enough to feed it correctly without opening the graph."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="file name inside the bundle folder (no directories)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[str]
    input_dtypes: dict[str, str] = Field(description="input name -> element type, e.g. 'float32'")
    input_shapes: dict[str, list[str | int]] = Field(default_factory=dict, description="'batch' is dynamic")
    feature_names: list[str] = Field(description="raw feature columns of the features input, in order")
    log_columns: list[str] = Field(default_factory=list, description="get signed log1p inside the graph")
    outputs: list[str]

    @field_validator("file")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # a manifest must not be able to point a loader at files outside its own folder
        if not value or value in (".", "..") or Path(value).name != value or "\\" in value:
            raise ValueError(f"part file must be a plain file name inside the bundle folder, got {value!r}")
        return value


class ModelManifest(BaseModel):
    """What a scoring bundle contains and how it was made; written next to the two ONNX parts."""

    model_config = ConfigDict(extra="forbid")

    format_version: Literal["2"] = FORMAT_VERSION
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    parts: dict[str, PartManifest]
    embedding_dim: int = Field(ge=1)
    training_config: dict[str, Any] = Field(default_factory=dict)
    privacy: list[dict[str, Any]] = Field(default_factory=list, description="guarantees spent; may be empty")
    scorecard: ScorecardParams = Field(default_factory=ScorecardParams)
    payment_feature_definition: dict[str, Any] | None = Field(
        None, description="how the payment holder computes its features from transactions (FEATURE_DEFINITION)")
    lender_reference: list[float] | None = Field(
        None, description="a typical applicant's raw lender features as declared in the lender's schema.toml "
        "(public values, not statistics of applicants): what reason codes compare to")

    @field_validator("parts")
    @classmethod
    def _both_parts(cls, value: dict[str, PartManifest]) -> dict[str, PartManifest]:
        if set(value) != set(PART_NAMES):
            raise ValueError(f"parts must be exactly {list(PART_NAMES)}, got {sorted(value)}")
        return value


def write_manifest(directory: Path, manifest: ModelManifest) -> Path:
    """Write `manifest.json` atomically (temp file + rename), so a reader never sees half a manifest; world-readable,
    as the bundle is meant to be handed on."""
    target = Path(directory) / MANIFEST_NAME
    write_text_atomic(target, manifest.model_dump_json(indent=2) + "\n", mode=0o644)
    return target


def load_manifest(directory: Path, parties: tuple[str, ...] | None = None) -> ModelManifest:
    """Read and validate `manifest.json`, then check every part file (or only those of `parties`: the payment
    holder's copy holds its own part alone) against its sha256.

    Raises ValueError naming the file for a missing/invalid manifest, a missing part or a hash mismatch.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{path}: manifest not found")
    try:
        manifest = ModelManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"{path}: invalid manifest: {exc}") from exc
    for name, part in manifest.parts.items():
        if parties is not None and name not in parties:
            continue
        file = directory / part.file
        if not file.is_file():
            raise ValueError(f"{file}: {name} part listed in {MANIFEST_NAME} is missing")
        actual = sha256_file(file)
        if actual != part.sha256:
            raise ValueError(f"{file}: sha256 mismatch for the {name} part (manifest {part.sha256}, file {actual}); "
                             "the file was modified or replaced after export")
    return manifest
