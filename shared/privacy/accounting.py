"""Turning mechanism records into (epsilon, delta) guarantees, with published accountants only.

One guarantee = one protected thing (e.g. "lender.labels") against one observer ("payment", "lender" or
"outsider"), per user, worst case over users (each record's count is the worst-case user's). Which records an
observer sees: those sent to it plus everything published (seen_by="outsider").

Accountants (we write none of our own):
- dp-accounting's PLD accountant (pessimistic, connect-the-dots), for everything; between the parties releases are
  never subsampled, so k releases of a Gaussian compose exactly (mu-GDP with mu = sqrt(k) * D / (sigma * C)).
- Opacus' PRV accountant for guarantees that contain Poisson-sampled releases (DP-SGD), the accountant the
  training used; the reported epsilon is never below PLD's (we report the larger of the two).
- Never the GDP/CLT accountant: it under-reports by up to 53% at these settings.

Mechanism (de)serialisation: each reported guarantee carries its dp-accounting DpEvent (`dp_event`), written
with dp-accounting's `DpEvent.to_named_tuple` and read back with `DpEvent.from_named_tuple` (dp_events.py: only
the named tuple <-> JSON glue and a class allowlist are ours). `recompute_from_report` rebuilds that event and
accounts it with dp-accounting's PLD accountant: what a third party with only the report and dp-accounting would
do. It recomputes the PLD epsilon; the reported one is the larger of PLD and PRV, so never below it. The check
that our entry -> event translation is right (scaling, sampling) is an independent PLD construction in the tests.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from pydantic import BaseModel, ConfigDict

from fedscore.shared.privacy.dp_events import event_from_json, event_to_json, guarantee_event
from fedscore.shared.privacy.mechanisms import (
    OBSERVERS,
    DpSgdRelease,
    GaussianRelease,
    Mechanism,
    Neighbouring,
    Observer,
    RandomizedResponse,
    guarantee_key,
)

ACCOUNTANT_PLD = "dp_accounting.pld"
ACCOUNTANT_PRV = "opacus.prv"
PLD_DISCRETIZATION = 1e-4  # dp-accounting's default: the value a third party recomputing would use

_RELATIONS = {
    "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


def common_neighbouring(mechanisms: Sequence[Mechanism]) -> Neighbouring:
    """All records of one guarantee must share its neighbouring relation: eps under mixed relations means nothing."""
    relations = {m.neighbouring for m in mechanisms}
    if len(relations) != 1:
        raise ValueError(f"one guarantee needs one neighbouring relation, got {sorted(relations) or 'none'}: "
                         "restate the records (e.g. DP-SGD under replace_one has sensitivity 2)")
    return relations.pop()


def pld_epsilon(mechanisms: Sequence[Mechanism], delta: float, *,
                discretization: float = PLD_DISCRETIZATION) -> float:
    """Epsilon of the composition of all records at `delta`, by dp-accounting's PLD accountant (pessimistic)."""
    if not mechanisms:
        return 0.0
    relation = common_neighbouring(mechanisms)
    return _event_epsilon(guarantee_event([m.report_entry() for m in mechanisms], relation), relation, delta,
                          discretization)


def _event_epsilon(event: dp_accounting.DpEvent, relation: Neighbouring, delta: float,
                   discretization: float = PLD_DISCRETIZATION) -> float:
    """Epsilon of one composed event at `delta` by dp-accounting's PLD accountant: the reported path and the
    third-party recomputation both end here."""
    accountant = PLDAccountant(_RELATIONS[relation], value_discretization_interval=discretization)
    if not accountant.supports(event):
        raise ValueError(f"dp-accounting's PLD accountant cannot account {event}")
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def prv_applies(mechanisms: Sequence[Mechanism]) -> bool:
    """Opacus' PRV knows only (Poisson-subsampled) Gaussians under add/remove; use it where DP-SGD is involved."""
    sampled = any(isinstance(m, DpSgdRelease) or (isinstance(m, GaussianRelease) and m.sampling == "poisson")
                  for m in mechanisms)
    return (sampled and not any(isinstance(m, RandomizedResponse) for m in mechanisms)
            and common_neighbouring(mechanisms) == "add_remove")


def prv_epsilon(mechanisms: Sequence[DpSgdRelease | GaussianRelease], delta: float) -> float:
    """Epsilon by Opacus' PRV accountant (its upper bound). Opacus is imported here: it costs seconds to load."""
    import warnings

    from opacus.accountants import PRVAccountant

    # PRV bounds its domain with an RDP pass, which warns when its best order is the largest alpha it tries; that
    # only loosens the domain bound, not the PRV epsilon we report
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
    if common_neighbouring(mechanisms) != "add_remove":
        raise ValueError("Opacus' PRV accountant covers add/remove neighbours only")
    history = []
    for m in mechanisms:
        if isinstance(m, RandomizedResponse):
            raise ValueError("Opacus' PRV accountant has no randomized response: use pld_epsilon")
        if m.effective_noise_multiplier == 0:
            return math.inf
        history.append((m.effective_noise_multiplier, m.sample_rate, m.count))
    accountant = PRVAccountant()
    accountant.history = history
    with np.errstate(divide="ignore", invalid="ignore"):  # log(1 - q) at q = 1: harmless, Opacus handles it
        return float(accountant.get_epsilon(delta))


def account(mechanisms: Sequence[Mechanism], delta: float) -> tuple[float, str]:
    """(epsilon, accountant name) for one guarantee's records: PRV where DP-SGD is involved, never below PLD."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not mechanisms:
        return 0.0, "none"
    return _account(tuple(mechanisms), delta)


@functools.lru_cache(maxsize=256)
def _account(mechanisms: tuple[Mechanism, ...], delta: float) -> tuple[float, str]:
    """Records are frozen, so the same list always has the same epsilon: a report or ledger asks repeatedly."""
    pld = pld_epsilon(mechanisms, delta)
    if prv_applies(mechanisms):
        prv = prv_epsilon(mechanisms, delta)  # type: ignore[arg-type]  # prv_applies excludes RR
        if prv >= pld:
            return prv, ACCOUNTANT_PRV
    return pld, ACCOUNTANT_PLD


def epsilon_for(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """The epsilon `account` reports for these records."""
    return account(mechanisms, delta)[0]


class Guarantee(BaseModel):
    """One reported guarantee: who is protected, against whom, under which neighbours, from which releases."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protects: str
    against: Observer
    neighbouring: Neighbouring
    mechanisms: list[Mechanism]
    epsilon: float
    delta: float
    accountant: str

    @property
    def key(self) -> str:
        return guarantee_key(self.protects, self.against)

    def to_dict(self) -> dict[str, Any]:
        """The report's schema: mechanisms readable (no party-internal fields) and as dp-accounting's DpEvent."""
        return {"protects": self.protects, "against": self.against, "epsilon": self.epsilon, "delta": self.delta,
                "accountant": self.accountant, "neighbouring": self.neighbouring,
                "mechanisms": [m.report_entry() for m in self.mechanisms],
                "dp_event": event_to_json(guarantee_event([m.report_entry() for m in self.mechanisms],
                                                          self.neighbouring))}


def check_guarantee_records(protects: str, against: str, mechanisms: Iterable[Mechanism]) -> None:
    """Refuse records that do not belong to this guarantee, so nothing is charged or reported under a wrong name."""
    if against not in OBSERVERS:
        raise ValueError(f"against must be one of {OBSERVERS}, got {against!r}")
    if protects.split(".", 1)[0] == against:
        raise ValueError(f"{protects} against {against}: a party needs no guarantee against itself")
    for m in mechanisms:
        if m.protects != protects:
            raise ValueError(f"a release protecting {m.protects} charged to a guarantee for {protects}")
        if not m.visible_to(against):
            raise ValueError(f"a release seen by {m.seen_by} is not part of what {against} sees")


def account_guarantee(protects: str, against: Observer, mechanisms: Sequence[Mechanism], delta: float) -> Guarantee:
    """Build the Guarantee for these records (validated to belong to it)."""
    mechanisms = list(mechanisms)
    check_guarantee_records(protects, against, mechanisms)
    if not mechanisms:
        raise ValueError(f"no releases for {guarantee_key(protects, against)}")
    epsilon, accountant = account(mechanisms, delta)
    return Guarantee(protects=protects, against=against, neighbouring=common_neighbouring(mechanisms),
                     mechanisms=mechanisms, epsilon=epsilon, delta=delta, accountant=accountant)


# -- third-party recomputation ----------------------------------------------------------------------------------

def recompute_from_report(report: dict[str, Any]) -> list[float]:
    """Every guarantee's epsilon recomputed from the report alone, in report order: its `dp_event` rebuilt with
    dp-accounting's own deserialiser and composed by dp-accounting's PLD accountant.

    The event must be the one the guarantee's readable `mechanisms` entries translate to (a report whose two forms
    disagree is refused), so what a reader sees listed is what was accounted.
    """
    epsilons = []
    for guarantee in report["guarantees"]:
        relation = guarantee["neighbouring"]
        event = event_from_json(guarantee["dp_event"])
        if event != guarantee_event(guarantee["mechanisms"], relation):
            raise ValueError(f"{guarantee['protects']} against {guarantee['against']}: dp_event does not match "
                             "the listed mechanisms")
        epsilons.append(_event_epsilon(event, relation, float(guarantee.get("delta", report["delta"]))))
    return epsilons
