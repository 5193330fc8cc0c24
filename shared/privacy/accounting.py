"""Turning mechanism records into (epsilon, delta) guarantees, with published accountants only.

One guarantee = one protected thing (e.g. "lender.labels") against one observer ("payment", "lender" or
"outsider"), per user, worst case over users (each record's count is the worst-case user's). Which records an
observer sees: those sent to it plus everything published (seen_by="outsider").

Accountants (we write none of our own):
- dp-accounting's PLD accountant (pessimistic, connect-the-dots), for everything. Between the parties releases are
  never subsampled, and unsampled Gaussians compose EXACTLY to one Gaussian: k releases of sensitivity D and noise
  sigma * D are one of multiplier sigma / sqrt(k), and releases of different sigmas (one neighbouring relation)
  one with 1 / sigma_eff^2 = sum_i count_i / sigma_i^2, each sigma_i in units of its own sensitivity (mu-GDP,
  mu^2 = sum of mu_i^2: a Gaussian pair's privacy loss is itself Gaussian, so this is an identity, not the GDP
  accountant's central-limit approximation, which we never use). So every guarantee's unsampled Gaussians are ONE
  GaussianDpEvent (dp_events.guarantee_event), composed last with the rest (DP-SGD, randomized response), whose
  PLD is remembered: a charge that adds Gaussian releases (an online answer) costs one Gaussian PLD and one
  convolution whatever the count, where one composition per release grew with it (the Gaussian's PLD still grows
  with its mu, i.e. with sqrt(count): 0.5-0.8 s CPU at mu 2, ~4 s near `MU_CEILING`; BENCHMARKS "The ledger").
- A guarantee whose Gaussians compose past `MU_CEILING` is reported as infinite (an upper bound) rather than built:
  its PLD would not fit in memory, and no budget reaches it.
- Opacus' PRV accountant for guarantees that contain Poisson-sampled releases (DP-SGD), the accountant the
  training used; the reported epsilon is never below PLD's (we report the larger of the two).
- Never the GDP/CLT accountant: it under-reports by up to 53% at these settings.

Mechanism (de)serialisation: each reported guarantee carries its dp-accounting DpEvent (`dp_event`), written
with dp-accounting's `DpEvent.to_named_tuple` and read back with `DpEvent.from_named_tuple` (dp_events.py: only
the named tuple <-> JSON glue and a class allowlist are ours). `recompute_from_report` rebuilds that event and
accounts it with dp-accounting's PLD accountant: what a third party with only the report and dp-accounting would
do. It recomputes the PLD epsilon; the reported one is the larger of PLD and PRV, so never below it. The check
that our entry -> event translation is right (scaling, sampling) is an independent PLD construction in the tests.

Randomized response in front (composition "rr_mixture"): when a guarantee holds a RandomizedResponse record that
names its draw and releases computed from that draw's output (`computed_from`), everything those releases show is
post-processing of randomized response. If (A, B) dominates the downstream releases for one changed released label,
RR (flip probability q) turns it into ((1-q)A + qB, qA + (1-q)B) for one changed clean label: (A, B) is a garbling
of any real pair it dominates (Blackwell), and garbling commutes with the label-level mixture. We compose the
downstream events with dp-accounting's PLD accountant (replace-one PLDs are symmetric), read a pair back from its
probability mass function (`_symmetric_pair`: each loss l > 0 as A: pmf(l), B: e^-l pmf(l), with its mirror; A's
infinity mass where B has none, and its mirror; the rest where A = B), mix, and rebuild the PLD with the rounding of
dp-accounting's `from_two_probability_mass_functions` (`_pld_from_pair`, in numpy; a test checks they agree). The
mixture is capped by the plain composition of randomized response itself (post-processing never costs more); a
non-DP downstream gives exactly that. With a named draw and nothing computed from it yet, nothing is spent: the
randomized labels themselves never leave the lender. The report's `dp_event` stays the plain composition of all
entries (dp-accounting has no mixture event); `composition: "rr_mixture"` tells `recompute_from_report` to mix,
from the same entries, with the same code.

Attack ceiling (`attack_ceiling`): the composed pair bounds every test between a user's two labels. The
likelihood-ratio test is the most powerful (Neyman-Pearson), so its ROC AUC, P(L_A > L_B) + P(tie)/2 over the
privacy loss L, is the best AUC any attack reaches; the best balanced accuracy is (1 + TV)/2 with TV = delta(0).
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

from fedscore.shared.privacy.dp_events import (
    event_from_json,
    event_to_json,
    gaussian_mu,
    guarantee_event,
    rr_noise_parameter,
    split_event,
)
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


def pld_epsilon(mechanisms: Sequence[Mechanism], delta: float, *,
                discretization: float = PLD_DISCRETIZATION) -> float:
    """Epsilon of all records at `delta` by dp-accounting's PLD (pessimistic): their composition, with the RR
    mixture where randomized response is in front of releases computed from its output (see the module doc)."""
    if not mechanisms:
        return 0.0
    relation = common_neighbouring(mechanisms)
    return entries_epsilon([m.report_entry() for m in mechanisms], relation, delta, discretization)


# -- randomized response in front: the mixture ------------------------------------------------------------------

COMPOSITION_PLAIN = "plain"
COMPOSITION_RR_MIXTURE = "rr_mixture"

Entry = dict[str, Any]


def rr_blocks(entries: Sequence[Entry]) -> tuple[list[tuple[Entry, list[Entry]]], list[Entry]]:
    """([(randomized-response entry, the entries computed from its draw)], every other entry).

    A block is one RR entry with a `draw` name no other RR entry uses and count 1 (a label randomized afresh is
    not post-processing of one draw), with every entry naming that draw in `computed_from`. Naming the draw claims
    that those entries are all the observer receives from the randomized labels (the lender charges each before it
    leaves), so a block with nothing downstream yet costs nothing: the released labels themselves never leave. An
    RR entry without a draw name stands for arbitrary post-processing (randomized response's own epsilon). Entries
    naming a draw that is not such a block compose plainly: still a valid bound (each is DP for the clean label on
    its own, since one clean label moves at most one released label).
    """
    names = [e.get("draw", "") for e in entries if e.get("kind") == "randomized_response"]
    heads = {e["draw"]: e for e in entries if e.get("kind") == "randomized_response" and e.get("draw")
             and names.count(e["draw"]) == 1 and int(e.get("count", 1)) == 1 and not e.get("computed_from")}
    downstream: dict[str, list[Entry]] = {name: [] for name in heads}
    for e in entries:
        if e.get("computed_from") in heads:
            downstream[e["computed_from"]].append(e)
    blocks = [(heads[name], items) for name, items in downstream.items()]
    inside = {id(e) for head, items in blocks for e in (head, *items)}
    return blocks, [e for e in entries if id(e) not in inside]


def composition_of(entries: Sequence[Entry]) -> str:
    """How a guarantee's entries compose: "rr_mixture" if any randomized response has releases computed from it."""
    return COMPOSITION_RR_MIXTURE if rr_blocks(entries)[0] else COMPOSITION_PLAIN


_PLD_CACHE: dict[str, pld_lib.PrivacyLossDistribution | None] = {}
_PLD_CACHE_SIZE = 64


def _event_pld(event: dp_accounting.DpEvent, relation: Neighbouring,
               discretization: float) -> pld_lib.PrivacyLossDistribution | None:
    """The PLD dp-accounting's accountant builds for `event`, or None if the event is not DP (a zero noise).
    Remembered by the event's repr (events hold lists, so they do not hash): a ledger and a report ask for the
    same downstream repeatedly, and a subsampled Gaussian takes seconds to build."""
    key = f"{event!r}|{relation}|{discretization!r}"
    if key not in _PLD_CACHE:
        if len(_PLD_CACHE) >= _PLD_CACHE_SIZE:
            _PLD_CACHE.pop(next(iter(_PLD_CACHE)))
        _PLD_CACHE[key] = _build_event_pld(event, relation, discretization)
    return _PLD_CACHE[key]


def _build_event_pld(event: dp_accounting.DpEvent, relation: Neighbouring,
                     discretization: float) -> pld_lib.PrivacyLossDistribution | None:
    accountant = PLDAccountant(_RELATIONS[relation], value_discretization_interval=discretization)
    if not accountant.supports(event):
        raise ValueError(f"dp-accounting's PLD accountant cannot account {event}")
    accountant.compose(event)
    # dp-accounting 0.6.0 has no public getter for the composed PLD or the non-DP flag (pinned in pyproject)
    if accountant._contains_non_dp_event:
        return None
    return accountant._pld


def _symmetric_pair(pmf: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A pair of distributions (A, B) whose hockey-stick curves, both directions, equal those of one symmetric PLD
    mass function for every eps >= 0, as (A, B, privacy loss) per atom; None if the masses do not fit in one
    distribution (then the caller falls back to a plain bound).

    Why not B = e^-l pmf(l) over the whole mass function: dp-accounting's pessimistic PLDs move truncated and
    rounded mass up, so their negative-loss part is not a distribution's (e^-l pmf(l) can sum far above 1). Only
    losses l > 0 enter delta(eps) for eps >= 0, so each is kept (A: pmf(l), B: e^-l pmf(l)) with its mirror (A and
    B swapped); the infinity mass likewise; the mass left over sits where A = B (loss 0). By symmetry this pair's
    curve for eps < 0 follows from its curve for eps >= 0, as the mechanism's does: it dominates every pair the PLD
    bounds (Blackwell), so mixing it and composing its PLD is sound.
    """
    dense = pmf.to_dense_pmf()
    losses = (np.arange(dense.size) + dense._lower_loss) * dense._discretization
    probs = np.asarray(dense._probs, dtype=np.float64)
    infinity = float(dense._infinity_mass)
    positive = (losses > 0) & (probs > 0)
    p, loss = probs[positive], losses[positive]
    mirrored = p * np.exp(-loss)
    rest = 1.0 - float(p.sum() + mirrored.sum()) - 2.0 * infinity
    if rest < -1e-9:
        return None
    upper = np.concatenate([p, mirrored, [infinity, 0.0, max(rest, 0.0)]])
    lower = np.concatenate([mirrored, p, [0.0, infinity, max(rest, 0.0)]])
    privacy_loss = np.concatenate([loss, -loss, [math.inf, -math.inf, 0.0]])
    return upper, lower, privacy_loss


def _pld_from_pair(upper: np.ndarray, lower: np.ndarray,
                   discretization: float) -> pld_lib.PrivacyLossDistribution:
    """dp-accounting's `from_two_probability_mass_functions` (symmetric, pessimistic: each atom's loss rounded up,
    A's mass there; A's mass where B has none is infinity mass) done with numpy over up to millions of atoms, then
    dp-accounting's own `create_from_rounded_probability`. A test checks both give the same PLD."""
    keep = upper > 0
    upper, lower = upper[keep], lower[keep]
    infinity = float(upper[lower <= 0].sum())
    finite = lower > 0
    loss = np.log(upper[finite]) - np.log(lower[finite])
    index = np.ceil(loss / discretization).astype(np.int64)
    offset = int(index.min()) if len(index) else 0
    masses = np.bincount(index - offset, weights=upper[finite])
    rounded = {int(k) + offset: float(m) for k, m in enumerate(masses) if m > 0}
    return pld_lib.PrivacyLossDistribution.create_from_rounded_probability(rounded, infinity, discretization)


def rr_mixture_pld(epsilon: float, downstream: pld_lib.PrivacyLossDistribution | None,
                   discretization: float = PLD_DISCRETIZATION) -> pld_lib.PrivacyLossDistribution:
    """The PLD of randomized response (eps) followed by releases whose PLD (for one changed released label) is
    `downstream`, both directions mixed; None downstream (not DP) gives randomized response's own PLD."""
    rr = pld_lib.from_randomized_response(rr_noise_parameter(epsilon), 2,
                                          value_discretization_interval=discretization)
    if downstream is None:
        return rr
    if not downstream._symmetric:  # dp-accounting's replace-one events are all symmetric
        return rr
    pair = _symmetric_pair(downstream._pmf_remove)
    if pair is None:
        return rr
    q = flip_probability(epsilon)
    upper, lower, _ = pair
    return _pld_from_pair((1 - q) * upper + q * lower, q * upper + (1 - q) * lower, discretization)


def _plain_pld(entries: Sequence[Entry], relation: Neighbouring,
               discretization: float) -> pld_lib.PrivacyLossDistribution | None:
    """The PLD of these entries' plain composition, None if not DP: what dp-accounting's PLD accountant computes
    for `guarantee_event(entries)`, step for step (the same constructors, in the same order), so the reported
    epsilon equals a third party's recomputation from the report.

    Why split: `guarantee_event` puts the one Gaussian all unsampled Gaussian entries compose to last, after the
    rest (DP-SGD steps, randomized response). The accountant's state after the rest is remembered (`_event_pld`),
    so a charge that only adds Gaussian releases (every online answer) costs one Gaussian PLD and one
    convolution, whatever the count, instead of recomposing DP-SGD's subsampled Gaussians (seconds) each time."""
    rest, gaussian = split_event(entries, relation)
    if gaussian is not None and (gaussian.noise_multiplier == 0 or beyond_ceiling(gaussian, relation)):
        return None  # not DP, or beyond what a PLD can hold in memory: reported as infinite (see MU_CEILING)
    composed = _event_pld(rest, relation, discretization)
    if composed is None or gaussian is None:
        return composed
    return composed.compose(pld_lib.from_gaussian_mechanism(  # as PLDAccountant._maybe_compose builds it
        standard_deviation=gaussian.noise_multiplier, value_discretization_interval=discretization,
        neighboring_relation=_RELATIONS[relation]))


def entries_pld(entries: Sequence[Entry], relation: Neighbouring,
                discretization: float = PLD_DISCRETIZATION) -> pld_lib.PrivacyLossDistribution | None:
    """The PLD of a guarantee's report entries (RR mixtures where they apply, the rest composed), None if not DP."""
    blocks, rest = rr_blocks(entries)
    if not blocks:
        return _plain_pld(entries, relation, discretization)
    parts: list[pld_lib.PrivacyLossDistribution | None] = []
    if rest:
        parts.append(_plain_pld(rest, relation, discretization))
    for head, items in blocks:
        downstream = _plain_pld(items, relation, discretization)
        parts.append(rr_mixture_pld(float(head["epsilon"]), downstream, discretization))
    if any(p is None for p in parts):
        return None
    composed = parts[0]
    for p in parts[1:]:
        composed = composed.compose(p)  # type: ignore[union-attr]
    return composed


def entries_epsilon(entries: Sequence[Entry], relation: Neighbouring, delta: float,
                    discretization: float = PLD_DISCRETIZATION) -> float:
    """Epsilon at `delta` of a guarantee's report entries: the reported path and `recompute_from_report` both end
    here (or, for a plain composition, in dp-accounting's accountant on the same event, which gives the same
    number). With RR mixtures, never above the plain composition of the randomized responses and the other
    entries (everything downstream is post-processing of its randomized response)."""
    blocks, rest = rr_blocks(entries)
    if not blocks:
        return _pld_epsilon(_plain_pld(entries, relation, discretization), delta)
    mixed = _pld_epsilon(entries_pld(entries, relation, discretization), delta)
    plain = _pld_epsilon(_plain_pld([head for head, _ in blocks] + rest, relation, discretization), delta)
    return min(mixed, plain)


def _pld_epsilon(pld: pld_lib.PrivacyLossDistribution | None, delta: float) -> float:
    return math.inf if pld is None else float(pld.get_epsilon_for_delta(delta))


# A guarantee whose unsampled Gaussians compose to a Gaussian of mu > MU_CEILING (epsilon about 95 at delta 1e-5)
# is reported as infinite, an upper bound, instead of being built as a PLD: a Gaussian's PLD grows linearly with mu
# (measured at the default discretisation: 1.1M atoms and 0.3 GB at mu 5, eps 33; 22M atoms and 3.4 GB at mu 50,
# eps 1460), so one user's 10^6th online answer would exhaust memory. No budget worth the name gets there: the
# guarantee refuses every charge past it (an infinite epsilon is over every budget).
MU_CEILING = 10.0


def beyond_ceiling(gaussian: dp_accounting.GaussianDpEvent | None, relation: Neighbouring) -> bool:
    """Whether this merged Gaussian is past `MU_CEILING` (not DP, noise 0, is not: the accountant flags it)."""
    return gaussian is not None and gaussian.noise_multiplier > 0 and gaussian_mu(gaussian, relation) > MU_CEILING


def gaussian_epsilon(gaussian: dp_accounting.GaussianDpEvent, relation: Neighbouring, delta: float) -> float:
    """The exact (analytic, Balle and Wang 2018) epsilon of ONE dp-accounting GaussianDpEvent under this relation:
    a lower bound of any composition that contains it, which lets a budget refuse without building a PLD."""
    mu = gaussian_mu(gaussian, relation)
    return math.inf if math.isinf(mu) else float(dp_accounting.get_epsilon_gaussian(1.0 / mu, delta))


def epsilon_lower_bound(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """A lower bound of `account`'s epsilon for these records, in microseconds: the exact epsilon of their unsampled
    Gaussians alone (one Gaussian, see dp_events.guarantee_event). Composition never lowers epsilon at a fixed
    delta (dropping releases is post-processing), and the PLD and PRV accountants are pessimistic, so a budget below
    it refuses without composing anything; a randomized-response mixture is not a composition, so records with a
    named draw get 0 (no shortcut)."""
    if not mechanisms:
        return 0.0
    relation = common_neighbouring(mechanisms)
    entries = [m.report_entry() for m in mechanisms]
    if rr_blocks(entries)[0]:
        return 0.0
    _, gaussian = split_event(entries, relation)
    if gaussian is None:
        return 0.0
    return gaussian_epsilon(gaussian, relation, delta)


def attack_ceiling(pld: pld_lib.PrivacyLossDistribution | None) -> dict[str, float] | None:
    """The best any attack can do at telling a user's two neighbouring inputs apart, from the privacy profile:
    AUC of the likelihood-ratio test (optimal by Neyman-Pearson: its ROC lies above every test's), P(L_A > L_B) +
    P(L_A = L_B)/2 on the pair `_symmetric_pair` reads from the PLD, and balanced accuracy (1 + TV)/2, TV =
    delta(0). Not DP (None), or a PLD that is no pair's, gives 1 and 1. Symmetric PLDs only (replace-one, the
    relation of every guarantee against a party): an add/remove PLD's two directions would need their pointwise
    maximum first, so it gets None (no ceiling reported) rather than a figure that could be too low."""
    if pld is None:
        return {"auc": 1.0, "balanced_accuracy": 1.0}
    if not pld._symmetric:
        return None
    auc = 0.0
    for pmf in [pld._pmf_remove]:
        pair = _symmetric_pair(pmf)
        if pair is None:
            return {"auc": 1.0, "balanced_accuracy": 1.0}
        upper, lower, loss = pair
        order = np.argsort(loss, kind="stable")
        values, a, b = loss[order], upper[order], lower[order]
        starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
        a_tied, b_tied = np.add.reduceat(a, starts), np.add.reduceat(b, starts)
        below = np.concatenate([[0.0], np.cumsum(b_tied)[:-1]])  # B's mass at strictly smaller loss
        auc = max(auc, float(np.sum(a_tied * (below + 0.5 * b_tied))))
    tv = float(pld.get_delta_for_epsilon(0.0))
    return {"auc": min(1.0, auc), "balanced_accuracy": min(1.0, (1.0 + tv) / 2.0)}


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
    unsampled = 0.0  # sum of count / multiplier^2 of the unsampled Gaussians: one Gaussian (dp_events.py), exact
    for m in mechanisms:
        if isinstance(m, RandomizedResponse):
            raise ValueError("Opacus' PRV accountant has no randomized response: use pld_epsilon")
        if m.effective_noise_multiplier == 0:
            return math.inf
        if isinstance(m, GaussianRelease) and m.sampling == "none":
            unsampled += m.count / m.effective_noise_multiplier**2
        else:
            history.append((m.effective_noise_multiplier, m.sample_rate, m.count))
    if unsampled:
        history.append((1.0 / math.sqrt(unsampled), 1.0, 1))
    # the same (noise, rate) twice is one mechanism released count + count' times: one self-composition, not two
    # parts of a heterogeneous one (the same composition; a projection of k more runs like the last stays one entry
    # per mechanism instead of k)
    counts: dict[tuple[float, float], int] = {}
    for noise, rate, count in history:
        counts[(noise, rate)] = counts.get((noise, rate), 0) + count
    accountant = PRVAccountant()
    accountant.history = [(noise, rate, count) for (noise, rate), count in counts.items()]
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
    """Records are frozen, so the same list always has the same epsilon: a report or ledger asks repeatedly, and
    so does every other process (the disk cache, accounting_cache.py)."""
    from fedscore.shared.privacy.accounting_cache import cached

    epsilon, name = cached("account", {"records": [m.model_dump(mode="json") for m in mechanisms], "delta": delta},
                           lambda: _account_uncached(mechanisms, delta), encode=list, decode=tuple)
    return float(epsilon), str(name)


def _account_uncached(mechanisms: tuple[Mechanism, ...], delta: float) -> tuple[float, str]:
    pld = pld_epsilon(mechanisms, delta)
    if math.isfinite(pld) and prv_applies(mechanisms):
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
    composition: str = COMPOSITION_PLAIN
    attack_ceiling: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return guarantee_key(self.protects, self.against)

    def to_dict(self) -> dict[str, Any]:
        """The report's schema: mechanisms readable (no party-internal fields) and as dp-accounting's DpEvent (the
        plain composition of the entries; `composition` says whether the epsilon is that of an RR mixture)."""
        entries = [m.report_entry() for m in self.mechanisms]
        return {"protects": self.protects, "against": self.against, "epsilon": self.epsilon, "delta": self.delta,
                "accountant": self.accountant, "neighbouring": self.neighbouring, "composition": self.composition,
                "attack_ceiling": self.attack_ceiling, "mechanisms": entries,
                "dp_event": event_to_json(guarantee_event(entries, self.neighbouring))}


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
    relation = common_neighbouring(mechanisms)
    entries = [m.report_entry() for m in mechanisms]
    best = attack_ceiling(entries_pld(entries, relation))
    ceiling: dict[str, Any] | None = None if best is None else {
        **best, "note": "the best any attack can reach at telling one user's two neighbouring inputs apart, from "
                        "the PLD privacy profile: ROC AUC of the likelihood-ratio test, balanced accuracy (1 + TV)/2"}
    return Guarantee(protects=protects, against=against, neighbouring=relation, mechanisms=mechanisms,
                     epsilon=epsilon, delta=delta, accountant=accountant, composition=composition_of(entries),
                     attack_ceiling=ceiling)


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
        composition = guarantee.get("composition", COMPOSITION_PLAIN)
        if composition != composition_of(guarantee["mechanisms"]):
            raise ValueError(f"{guarantee['protects']} against {guarantee['against']}: composition "
                             f"{composition!r} does not match the listed mechanisms")
        delta = float(guarantee.get("delta", report["delta"]))
        if composition == COMPOSITION_RR_MIXTURE:  # the same entries, mixed (the event is their plain composition)
            epsilons.append(entries_epsilon(guarantee["mechanisms"], relation, delta))
        elif beyond_ceiling(split_event(guarantee["mechanisms"], relation)[1], relation):
            epsilons.append(math.inf)  # as reported: an upper bound we do not build (MU_CEILING)
        else:
            epsilons.append(_event_epsilon(event, relation, delta))
    return epsilons
