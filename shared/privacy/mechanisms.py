"""Privacy mechanisms described as data: the one record the ledger, the accountant and the report all read.

Why records and not code: a guarantee is only checkable if what was released is written down in a form a third
party can recompute from. Each record says what it protects, who sees the output, under which neighbouring
relation, and the parameters an accountant needs. Every count is per user and must be the worst case over users
(the user released most often).

Units: `noise_multiplier` sigma is the noise std in units of the clip norm C (std = sigma * C); `sensitivity` is
the largest L2 distance between the outputs on two neighbouring datasets, also in units of C (1.0 for add/remove
of a record clipped to C, or for the label-gradient trick; 2.0 for replace-one of a record clipped to C).

Randomized response and what is computed from its output (`draw` / `computed_from`): a release computed only from
randomized-response labels (and data-independent randomness) is post-processing of them, and the tight bound for
the pair is a mixture, not a composition (accounting.py `rr_mixture_pld`). A RandomizedResponse record names its
draw; every release computed from that draw's output names it in `computed_from`. Naming a draw is a claim: every
release to the observer computed from it is charged with `computed_from` set, so the downstream records are the
whole of what the observer receives from those labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

Observer = Literal["payment", "lender", "outsider"]
Neighbouring = Literal["add_remove", "replace_one"]
OBSERVERS: tuple[Observer, ...] = ("payment", "lender", "outsider")

_PROTECTS = r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$"  # "<owner party>.<what>", e.g. "lender.labels"


def flip_probability(epsilon: float) -> float:
    """Randomized response's flip probability 1/(1+e^eps) (the one place it is written; no overflow at large eps)."""
    return math.exp(-epsilon) / (1.0 + math.exp(-epsilon))


def guarantee_key(protects: str, against: str) -> str:
    """The name a guarantee goes by in budgets and ledgers, e.g. "lender.labels@payment"."""
    return f"{protects}@{against}"


def split_guarantee_key(key: str) -> tuple[str, str]:
    """Inverse of `guarantee_key`; raises ValueError on anything else so a typo in a budget is caught early."""
    protects, sep, against = key.partition("@")
    if not sep or against not in OBSERVERS or "." not in protects:
        raise ValueError(f"guarantee key {key!r}: expected '<party>.<data>@<payment|lender|outsider>', "
                         "e.g. 'lender.labels@payment'")
    return protects, against


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    protects: str = Field(pattern=_PROTECTS, description="whose data, e.g. 'lender.labels', 'payment.features'")
    seen_by: Observer = Field(description="who receives the output; 'outsider' means it is published")

    @property
    def owner(self) -> str:
        """The party whose data this protects: it needs no guarantee against itself."""
        return self.protects.split(".", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        """The full record (round-trips through `mechanisms_from_dicts`); what the ledger stores."""
        return self.model_dump(mode="json")

    def visible_to(self, observer: str) -> bool:
        """Released to `observer` directly, or released publicly (outsider view), which every party also sees."""
        return self.seen_by in (observer, "outsider")

    def _check_observer(self) -> None:
        if self.seen_by == self.owner:
            raise ValueError(f"{self.protects} seen by {self.seen_by}: a party needs no protection from itself")


class GaussianRelease(_Record):
    """Each user's clipped vector (norm <= clip) released `count` times with N(0, (sigma*clip)^2) per coordinate.

    sampling="poisson" (each user in each of `count` releases with probability sample_rate) is only allowed for
    outsider-seen releases: between the two parties there is no amplification, both know who is in each exchange.
    """

    kind: Literal["gaussian"] = "gaussian"
    noise_multiplier: float = Field(ge=0, description="sigma: noise std / clip")
    sensitivity: float = Field(gt=0, description="max L2 change of one user's output, in units of clip")
    clip: float = Field(gt=0, description="L2 clip norm C of each user's row (absolute units)")
    count: int = Field(ge=1, description="times each user is released (worst case over users)")
    sampling: Literal["none", "poisson"] = "none"
    sample_rate: float = Field(1.0, gt=0, le=1)
    neighbouring: Neighbouring = "add_remove"
    computed_from: str = Field("", description="the randomized-response draw (RandomizedResponse.draw) whose "
                               "released labels this is computed from; '' = computed from the data itself")

    @model_validator(mode="after")
    def _consistent(self) -> GaussianRelease:
        self._check_observer()
        if self.sampling == "none" and self.sample_rate != 1.0:
            raise ValueError("sampling='none' needs sample_rate=1.0 (every user is in every release)")
        if self.sampling == "poisson" and self.seen_by != "outsider":
            raise ValueError(f"Poisson sampling amplification does not hold against {self.seen_by}: the parties "
                             "know who is in each exchange; use sampling='none'")
        return self

    @property
    def effective_noise_multiplier(self) -> float:
        """Noise std over sensitivity: the one number a non-sampled Gaussian's privacy depends on."""
        return self.noise_multiplier / self.sensitivity

    def report_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": "gaussian", "noise_multiplier": self.noise_multiplier,
                                 "sensitivity": self.sensitivity, "count": self.count, "sampling": self.sampling,
                                 "sample_rate": self.sample_rate}
        if self.computed_from:
            entry["computed_from"] = self.computed_from
        return entry


class RandomizedResponse(_Record):
    """Binary labels flipped with probability 1/(1+e^eps): pure eps-DP for a changed label (replace-one).

    Add/remove has no meaning here (the counterparty knows which users exist), so only replace-one is allowed.
    """

    kind: Literal["randomized_response"] = "randomized_response"
    epsilon: float = Field(gt=0)
    count: int = Field(1, ge=1, description="fresh randomizations of the same label (normally 1: reuse it)")
    neighbouring: Literal["replace_one"] = "replace_one"
    draw: str = Field("", description="names this randomization (e.g. the run that drew it) so the releases "
                      "computed from its output can say so (`computed_from`); naming it claims those releases are "
                      "all the observer gets from the randomized labels, and the guarantee is their RR mixture "
                      "(accounting.py), never more than this record's epsilon; '' = arbitrary post-processing")
    computed_from: str = Field("", description="another draw whose released labels this randomizes again (a "
                               "downstream release like any other; '' = the clean labels)")

    @model_validator(mode="after")
    def _consistent(self) -> RandomizedResponse:
        self._check_observer()
        return self

    @property
    def flip_probability(self) -> float:
        return flip_probability(self.epsilon)

    def report_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": "randomized_response", "epsilon": self.epsilon}
        if self.count != 1:
            entry["count"] = self.count
        if self.draw:
            entry["draw"] = self.draw
        if self.computed_from:
            entry["computed_from"] = self.computed_from
        return entry


class DpSgdRelease(_Record):
    """Parameters trained with Opacus DP-SGD (per-sample clip C, noise sigma*C, Poisson batches) then released.

    Normally an outsider view: the noise protects what the parameters reveal, not the per-user messages of the
    protocol. Under add/remove one record moves the clipped gradient sum by C (sensitivity 1); under replace-one
    by 2C (sensitivity 2).

    Against a party (seen_by "payment" or "lender") only with `sampling_hidden`: the trainer's Poisson batches are
    drawn by its own CSPRNG and never leave it, so the observer does not know who was in each step and the
    subsampled Gaussian's amplification holds against it. The lender's top model is such a case: the payment holder
    sees it only through the gradients computed from it, and the lender's DP-SGD on its own machine samples users
    the payment holder never learns (its labels guarantee composes these steps, replace-one of a label: 2C).
    """

    kind: Literal["dp_sgd"] = "dp_sgd"
    noise_multiplier: float = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=1)
    seen_by: Observer = "outsider"
    neighbouring: Neighbouring = "add_remove"
    clip: float | None = Field(None, gt=0, description="max_grad_norm, for the record only")
    sampling_hidden: bool = Field(
        False, description="the observer never learns which users each Poisson batch held (drawn by the trainer's "
        "CSPRNG, never sent): required for a record seen by a party, whose amplification rests on it")
    computed_from: str = Field("", description="the randomized-response draw whose released labels this trains on "
                               "(see GaussianRelease.computed_from); '' = the data itself")

    @model_validator(mode="after")
    def _consistent(self) -> DpSgdRelease:
        self._check_observer()
        if self.seen_by != "outsider" and not self.sampling_hidden:
            raise ValueError(f"DP-SGD seen by {self.seen_by}: Poisson amplification holds against a party only if "
                             "it never learns the batches; set sampling_hidden=True only when that is so")
        return self

    @property
    def sensitivity(self) -> float:
        return 1.0 if self.neighbouring == "add_remove" else 2.0

    @property
    def count(self) -> int:
        return self.steps

    @property
    def effective_noise_multiplier(self) -> float:
        return self.noise_multiplier / self.sensitivity

    def report_entry(self) -> dict[str, Any]:
        """DP-SGD is exactly `steps` Poisson-sampled Gaussian releases: reported in that recomputable form."""
        entry: dict[str, Any] = {"kind": "gaussian", "noise_multiplier": self.noise_multiplier,
                                 "sensitivity": self.sensitivity, "count": self.steps, "sampling": "poisson",
                                 "sample_rate": self.sample_rate}
        if self.seen_by != "outsider":
            entry["sampling_hidden_from"] = self.seen_by
        if self.computed_from:
            entry["computed_from"] = self.computed_from
        return entry


Mechanism = Annotated[GaussianRelease | RandomizedResponse | DpSgdRelease, Field(discriminator="kind")]
_MECHANISMS: TypeAdapter[list[Mechanism]] = TypeAdapter(list[Mechanism])


def mechanisms_from_dicts(items: Sequence[dict[str, Any]]) -> list[Mechanism]:
    """Parse full records (as written by `to_dict`), e.g. from a ledger file."""
    return _MECHANISMS.validate_python(list(items))


def label_gradient_release(noise_multiplier: float, clip: float, count: int,
                           computed_from: str = "") -> GaussianRelease:
    """The lender's per-user gradients g_i = (p_i - y_i) J_i + noise (see noise.clipped_label_gradients).

    Changing y_i moves g_i by at most clip (|delta(p - y)| <= 1, |J_i| <= clip): sensitivity 1, replace-one. This
    holds only if p_i and J_i do not depend on the label (a model trained with DP-SGD, whose steps are charged as
    well); otherwise, or without noise, charge it with noise_multiplier 0: not DP, so an RR mixture falls back to
    randomized response's own epsilon. `computed_from` names the randomized-response draw the labels come from.
    """
    return GaussianRelease(noise_multiplier=noise_multiplier, sensitivity=1.0, clip=clip, count=count,
                           protects="lender.labels", seen_by="payment", neighbouring="replace_one",
                           computed_from=computed_from)


def embedding_release(noise_multiplier: float, clip: float, count: int,
                      neighbouring: Neighbouring = "add_remove") -> GaussianRelease:
    """The payment holder's per-user embeddings, each clipped to `clip`, sent to the lender `count` times.

    add_remove: a user's record against a null record (sensitivity 1); replace_one: against any other record (2).
    """
    return GaussianRelease(noise_multiplier=noise_multiplier, sensitivity=1.0 if neighbouring == "add_remove" else 2.0,
                           clip=clip, count=count, protects="payment.features", seen_by="lender",
                           neighbouring=neighbouring)


def scaler_statistics_release(noise_multiplier: float, clip: float, protects: str = "joint.records",
                              seen_by: Observer = "outsider",
                              neighbouring: Neighbouring = "add_remove") -> GaussianRelease:
    """A party's per-column sums and sums of squares (each user's row bounded by `clip`), released once with
    Gaussian noise: the standardisation constants that ship in its model part (preprocessing.dp_standardised).
    Published with the model, so every party sees it too."""
    return GaussianRelease(noise_multiplier=noise_multiplier, sensitivity=1.0 if neighbouring == "add_remove" else 2.0,
                           clip=clip, count=1, protects=protects, seen_by=seen_by, neighbouring=neighbouring)
