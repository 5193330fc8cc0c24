"""What a header carries besides routing: one typed body per message, and the ledger report every reply includes.

Why typed: these used to travel as JSON strings inside a free-form `info` dict, so every reader re-parsed them and a
misspelt key failed at the far end, if at all. A header now validates its body when it is built or decoded, and the
reader asks for the body type it expects (`Header.expect`). None of these holds data about a user: only sizes,
aggregate metrics the lender chose to share, the run config and mechanism records. Party-to-party data stays in the
opaque payload, which the coordinator never decodes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedscore.shared.config import FedConfig


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- requests ------------------------------------------------------------------------------------------------------
class SetupRequest(_Record):
    """setup: the run config both parties train with, and the run id that tags their ledger entries."""

    type: Literal["setup"] = "setup"
    config: FedConfig
    run_id: str = ""


# -- replies -------------------------------------------------------------------------------------------------------
class TableSize(_Record):
    """setup reply: the size of the party's table (disclosed by design; the report shows it). Nothing computed from
    labels: the lender's default rate is its own evaluation and stays in its folder (clients/lender/party.py)."""

    type: Literal["table"] = "table"
    rows: int
    features: int


class AlignmentSizes(_Record):
    """align.match reply (lender): sizes of its set, of the intersection and of the keyed split (released counts;
    the lender-only baseline it may fit is its own evaluation, never in this reply)."""

    type: Literal["alignment"] = "alignment"
    lender_rows: int
    intersection: int
    train: int
    val: int
    test: int


class Embedded(_Record):
    """embed reply (payment): how many users the embeddings in the payload cover; in round 0 how many of its rows
    it aligned to the lender's tokens (the tokens ride on that request); in the last round the part it exported."""

    type: Literal["embedded"] = "embedded"
    users: int
    aligned: int | None = None
    exported: str | None = Field(None, description="file name of the part written to the party's state directory")


class Curves(_Record):
    """The lender's test ROC/KS curves, thinned (shared/metrics.py `curves`): aggregates, no per-user score."""

    fpr: list[float]
    tpr: list[float]
    population: list[float]


class Trained(_Record):
    """train reply (lender): the round's metrics travel in `Header.metrics`; after the last round the curves and the
    part it exported."""

    type: Literal["trained"] = "trained"
    curves: Curves | None = None
    exported: str | None = Field(None, description="file name of the part written to the party's state directory")


Body = Annotated[SetupRequest | TableSize | AlignmentSizes | Embedded | Trained, Field(discriminator="type")]


# -- on every reply ------------------------------------------------------------------------------------------------
class LedgerEntry(_Record):
    """One charge of a party's lifetime ledger, in the form the privacy report reads (no data, no timestamps)."""

    guarantee: str
    mechanisms: list[dict[str, Any]] = Field(description="mechanism records (shared/privacy/mechanisms.py), as stored")
    epsilon_after: float
    note: str = ""
    run: str = ""


class LedgerReport(_Record):
    """What a party has released over its lifetime and the budgets it holds, so the report can compose them."""

    budgets: dict[str, float]
    entries: list[LedgerEntry]
