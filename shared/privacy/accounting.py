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

`recompute_from_report` rebuilds every epsilon from the report's own mechanism lists with dp-accounting's PLD
objects, independently of the event path above: what a third party with only the report would do.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from pydantic import BaseModel, ConfigDict

from fedscore.shared.privacy.mechanisms import (
    OBSERVERS,
    DpSgdRelease,
    GaussianRelease,
    Mechanism,
    Neighbouring,
    Observer,
    RandomizedResponse,
    flip_probability,
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


def _rr_noise_parameter(epsilon: float) -> float:
    """dp-accounting's RR outputs a uniform bucket with probability p; on 2 buckets the flip rate is p/2."""
    return 2.0 * flip_probability(epsilon)


def _dp_event(m: Mechanism, relation: Neighbouring) -> dp_accounting.DpEvent:
    """The dp-accounting event for one record. dp-accounting's replace-one Gaussian shifts both outputs by its
    noise multiplier's unit (distance 2), so our distance-`sensitivity` record maps to 2*sigma/sensitivity there."""
    if isinstance(m, RandomizedResponse):
        # Spelled out, not SelfComposedDpEvent: dp-accounting 0.6.0's PLD accountant drops the count of a
        # self-composed RandomizedResponseDpEvent (it composes it once), which would under-report.
        rr = dp_accounting.RandomizedResponseDpEvent(noise_parameter=_rr_noise_parameter(m.epsilon), num_buckets=2)
        return dp_accounting.ComposedDpEvent([rr] * m.count)
    scale = 2.0 if relation == "replace_one" else 1.0
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(scale * m.effective_noise_multiplier)
    if isinstance(m, DpSgdRelease) or m.sampling == "poisson":
        event = dp_accounting.PoissonSampledDpEvent(m.sample_rate, event)
    return dp_accounting.SelfComposedDpEvent(event, m.count)


def pld_epsilon(mechanisms: Sequence[Mechanism], delta: float, *,
                discretization: float = PLD_DISCRETIZATION) -> float:
    """Epsilon of the composition of all records at `delta`, by dp-accounting's PLD accountant (pessimistic)."""
    if not mechanisms:
        return 0.0
    relation = common_neighbouring(mechanisms)
    accountant = PLDAccountant(_RELATIONS[relation], value_discretization_interval=discretization)
    accountant.compose(dp_accounting.ComposedDpEvent([_dp_event(m, relation) for m in mechanisms]))
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
        """The report's schema: mechanisms in the recomputable form (no party-internal fields)."""
        return {"protects": self.protects, "against": self.against, "epsilon": self.epsilon, "delta": self.delta,
                "accountant": self.accountant, "neighbouring": self.neighbouring,
                "mechanisms": [m.report_entry() for m in self.mechanisms]}


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

def _entry_pld(entry: dict[str, Any], relation: Neighbouring) -> pld_lib.PrivacyLossDistribution | None:
    """PLD of one report entry straight from dp-accounting's PLD constructors (None: the entry is not private)."""
    kind = entry.get("kind")
    count = int(entry.get("count", 1))
    if kind == "randomized_response":
        if relation != "replace_one":
            raise ValueError("randomized response is accounted under replace_one only")
        return pld_lib.from_randomized_response(_rr_noise_parameter(float(entry["epsilon"])), 2).self_compose(count)
    if kind != "gaussian":
        raise ValueError(f"report entry of unknown kind {kind!r}")
    sigma, distance = float(entry["noise_multiplier"]), float(entry["sensitivity"])
    if sigma == 0:
        return None
    if entry.get("sampling", "none") == "none":
        # k non-sampled Gaussian releases are exactly one with std sigma / sqrt(k); only the distance matters
        return pld_lib.from_gaussian_mechanism(sigma / math.sqrt(count), sensitivity=distance)
    q = float(entry["sample_rate"])
    if relation == "add_remove":
        single = pld_lib.from_gaussian_mechanism(sigma, sensitivity=distance, sampling_prob=q)
    else:  # replace-one: dp-accounting shifts each side by `sensitivity`, i.e. half the distance
        single = pld_lib.from_gaussian_mechanism(
            sigma, sensitivity=distance / 2, sampling_prob=q,
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    return single.self_compose(count)


def recompute_from_report(report: dict[str, Any]) -> list[float]:
    """Every guarantee's epsilon recomputed from the report alone with dp-accounting's PLD, in report order."""
    epsilons = []
    for guarantee in report["guarantees"]:
        delta = float(guarantee.get("delta", report["delta"]))
        total = pld_lib.identity()
        private = True
        for entry in guarantee["mechanisms"]:
            part = _entry_pld(entry, guarantee["neighbouring"])
            if part is None:
                private = False
                continue
            total = total.compose(part)
        epsilons.append(float(total.get_epsilon_for_delta(delta)) if private else math.inf)
    return epsilons
