"""What one exported model version may answer online, as the payment party recorded it at export in its home.

Why a record in the party home and not in the bundle: the bundle goes to the lender, the intersection and the noise
level are the payment holder's own facts. For the payment part whose sha256 is S, the export writes:

* `home/served/S.ids`  UTF-8, one payment user ID per line: the aligned intersection this version may answer;
* `home/served/S.json` {"feature_sigma": float | null, "embedding_clip": float, "feature_neighbouring":
  "replace_one" | "add_remove", "delta": float, "replayable_noise": bool}.

Without them the service cannot know whom it may answer or how much noise training assumed, so it refuses to start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedscore.shared.party_home import PartyHome


class ServedError(ValueError):
    """The party home has no usable record for this model version; the message names the file."""


class ServedMeta(BaseModel):
    """`served/S.json`: how the released embeddings of this version were protected in training."""

    model_config = ConfigDict(extra="forbid")

    feature_sigma: Annotated[float, Field(gt=0)] | None = Field(
        description="noise multiplier of the embedding release; None = no noise")
    embedding_clip: float = Field(gt=0)
    feature_neighbouring: Literal["replace_one", "add_remove"]
    delta: float = Field(gt=0, lt=1)
    replayable_noise: bool
    run: str = Field("", description="the training run that exported this version")


@dataclass(frozen=True)
class ServedVersion:
    """The intersection one model version may answer and its protection, for the payment part `sha256`."""

    sha256: str
    ids: frozenset[str]
    meta: ServedMeta
    ids_file: Path


def served_files(home: Path, sha256: str) -> tuple[Path, Path]:
    """(ids file, meta file) for the payment part with this sha256."""
    folder = PartyHome(home).served
    return folder / f"{sha256}.ids", folder / f"{sha256}.json"


def write_served(home: Path, sha256: str, ids: list[str], meta: ServedMeta) -> None:
    """What the payment party's export records in its home (ids first: a version without its meta is refused)."""
    from fedscore.shared.atomic import write_text_atomic

    ids_file, meta_file = served_files(home, sha256)
    write_text_atomic(ids_file, "".join(f"{i}\n" for i in ids))
    write_text_atomic(meta_file, meta.model_dump_json(indent=1))


def load_served(home: Path, sha256: str) -> ServedVersion:
    """Read and check both files; ServedError names the missing or broken one."""
    ids_file, meta_file = served_files(home, sha256)
    if not ids_file.is_file():
        raise ServedError(f"no intersection recorded for this model version in {home} (missing {ids_file}); train "
                          "with this party home or pass --party-home")
    if not meta_file.is_file():
        raise ServedError(f"{meta_file}: missing (how this model version's embeddings were protected); train with "
                          "this party home or pass --party-home")
    try:
        ids = frozenset(line for line in ids_file.read_text(encoding="utf-8").splitlines() if line)
    except (OSError, UnicodeDecodeError) as exc:
        raise ServedError(f"{ids_file}: unreadable ({exc})") from None
    try:
        meta = ServedMeta.model_validate_json(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as exc:
        raise ServedError(f"{meta_file}: invalid ({' '.join(str(exc).split())})") from None
    if not ids:
        raise ServedError(f"{ids_file}: empty; this model version may answer nobody")
    return ServedVersion(sha256=sha256, ids=ids, meta=meta, ids_file=ids_file)
