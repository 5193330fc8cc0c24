"""Unsampled Gaussians accounted as ONE Gaussian (dp_events.guarantee_event): exact, cheap per charge, bounded.

The oracle is dp-accounting's own PLD constructors, one self-composition per entry (what the accounting did before
the merge), and the analytic Gaussian epsilon; no number here is hard-coded.
"""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from fedscore.shared.privacy import (
    BudgetExceeded,
    DpSgdRelease,
    GaussianRelease,
    Ledger,
    RandomizedResponse,
    accounting,
    label_gradient_release,
    recompute_from_report,
)
from fedscore.shared.privacy.accounting import (
    MU_CEILING,
    account,
    entries_epsilon,
    epsilon_lower_bound,
    rr_mixture_pld,
)
from fedscore.shared.privacy.dp_events import event_to_json, guarantee_event, split_event

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _no_remembered_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every figure computed here, not read from the disk cache or a previous test."""
    monkeypatch.setenv("FEDSCORE_ACCOUNTING_CACHE", "off")
    accounting._account.cache_clear()
    accounting._PLD_CACHE.clear()


def _gaussian(sigma: float, count: int, sensitivity: float = 2.0, neighbouring: str = "replace_one",
              **kw: object) -> GaussianRelease:
    fields: dict = {"protects": "payment.features", "seen_by": "lender", "clip": 1.0} | kw
    return GaussianRelease(noise_multiplier=sigma, sensitivity=sensitivity, count=count, neighbouring=neighbouring,
                           **fields)


def _self_composed(records: list[GaussianRelease]) -> pld_lib.PrivacyLossDistribution:
    """Each entry's releases one by one (a k-fold self-composition of its Gaussian), as dp-accounting builds them."""
    total = pld_lib.identity()
    for r in records:
        if r.neighbouring == "replace_one":  # dp-accounting shifts each side by `sensitivity`: half the distance
            one = pld_lib.from_gaussian_mechanism(r.noise_multiplier, sensitivity=r.sensitivity / 2,
                                                  neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        else:
            one = pld_lib.from_gaussian_mechanism(r.noise_multiplier, sensitivity=r.sensitivity)
        total = total.compose(one.self_compose(r.count))
    return total


CASES = {
    "k=1": [_gaussian(1.5, 1)],
    "k=2": [_gaussian(1.5, 2)],
    "k=5": [_gaussian(3.0, 5)],
    "two sigmas, k=2 and 3": [_gaussian(1.5, 2), _gaussian(4.0, 3)],
    "two sigmas and sensitivities, add/remove": [_gaussian(2.0, 1, 1.0, "add_remove"),
                                                 _gaussian(6.0, 5, 2.0, "add_remove")],
}


@pytest.mark.parametrize("name", list(CASES))
def test_merged_gaussian_equals_the_self_composition(name: str) -> None:
    records = CASES[name]
    relation = records[0].neighbouring
    entries = [r.report_entry() for r in records]
    merged = entries_epsilon(entries, relation, DELTA)
    composed = float(_self_composed(records).get_epsilon_for_delta(DELTA))
    assert merged == pytest.approx(composed, abs=2e-3), name  # within the discretisation of the composition
    mu = math.sqrt(sum(r.count * (r.sensitivity / r.noise_multiplier) ** 2 for r in records))
    exact = dp_accounting.get_epsilon_gaussian(1.0 / mu, DELTA)
    assert exact - 1e-9 <= merged <= exact + 1e-3, name  # pessimistic, and tight
    events = guarantee_event(entries, relation).events
    assert [type(e).__name__ for e in events] == ["GaussianDpEvent"]  # one event, whatever the entries


def test_the_rr_mixture_gets_the_same_downstream() -> None:
    """Gradient exchanges of two noise levels behind randomized response: the merged downstream gives the mixture
    the self-composed downstream gives."""
    rr = RandomizedResponse(epsilon=2.0, protects="lender.labels", seen_by="payment", draw="run-1")
    exchanges = [label_gradient_release(3.0, 1.0, 2, computed_from="run-1"),
                 label_gradient_release(5.0, 1.0, 3, computed_from="run-1")]
    entries = [m.report_entry() for m in [rr, *exchanges]]
    merged = entries_epsilon(entries, "replace_one", DELTA)
    direct = float(rr_mixture_pld(2.0, _self_composed(exchanges)).get_epsilon_for_delta(DELTA))
    assert merged == pytest.approx(direct, abs=2e-3)
    assert merged < 2.0  # the mixture, not randomized response's own epsilon


def _feature_records(online: int) -> list:
    """payment.features@lender as a training run charges it (DP-SGD seen through the embeddings, a scaler release,
    two embedding noise levels), then `online` answers, one ledger entry per answer."""
    return [DpSgdRelease(noise_multiplier=4.0, sample_rate=0.5, steps=4, protects="payment.features",
                         seen_by="lender", sampling_hidden=True, neighbouring="replace_one"),
            _gaussian(30.0, 1, seen_by="outsider"), _gaussian(12.0, 1), _gaussian(6.0, 1),
            *[_gaussian(6.0, 1) for _ in range(online)]]


def test_reported_epsilon_is_dp_accountings_on_the_report_event() -> None:
    """The reported figure (the DP-SGD prefix remembered, the merged Gaussian composed onto it) is exactly what
    dp-accounting's accountant computes from the report's dp_event, and a report recomputes to it."""
    records = _feature_records(3)
    entries = [m.report_entry() for m in records]
    epsilon, name = account(records, DELTA)
    assert name == "dp_accounting.pld"
    third_party = accounting._event_epsilon(guarantee_event(entries, "replace_one"), "replace_one", DELTA)
    assert epsilon == pytest.approx(third_party, abs=1e-12)
    report = {"delta": DELTA, "guarantees": [{
        "protects": "payment.features", "against": "lender", "neighbouring": "replace_one", "mechanisms": entries,
        "dp_event": event_to_json(guarantee_event(entries, "replace_one")), "composition": "plain"}]}
    assert recompute_from_report(report) == [pytest.approx(epsilon, abs=1e-12)]


def test_a_charge_adding_answers_does_not_recompose_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[str] = []
    original = accounting._build_event_pld

    def counting(event, relation, discretization):  # type: ignore[no-untyped-def]
        builds.append(repr(event))
        return original(event, relation, discretization)

    monkeypatch.setattr(accounting, "_build_event_pld", counting)
    first = account(_feature_records(1), DELTA)[0]
    assert len(builds) == 1  # the DP-SGD steps, once
    later = [account(_feature_records(k), DELTA)[0] for k in (2, 3, 10)]
    assert len(builds) == 1  # every later answer: one Gaussian composed onto the remembered prefix
    assert first < later[0] < later[1] < later[2]


def test_past_the_ceiling_is_infinite_without_building_a_pld() -> None:
    sigma = 3.0  # mu = 2 / 3 per release (replace-one, distance 2)
    count = int((MU_CEILING / (2.0 / 3.0)) ** 2) + 1
    records = [_gaussian(sigma, count)]
    assert account(records, DELTA)[0] == math.inf
    below = [_gaussian(sigma, count - 2).report_entry()]
    assert not accounting.beyond_ceiling(split_event(below, "replace_one")[1], "replace_one")
    entries = [m.report_entry() for m in records]
    report = {"delta": DELTA, "guarantees": [{
        "protects": "payment.features", "against": "lender", "neighbouring": "replace_one", "mechanisms": entries,
        "dp_event": event_to_json(guarantee_event(entries, "replace_one")), "composition": "plain"}]}
    assert recompute_from_report(report) == [math.inf]


@pytest.mark.parametrize("online", [0, 1, 5])
def test_the_lower_bound_never_exceeds_the_accounted_epsilon(online: int) -> None:
    records = _feature_records(online)
    bound = epsilon_lower_bound(records, DELTA)
    assert 0 < bound <= account(records, DELTA)[0]
    assert epsilon_lower_bound(records[:1], DELTA) == 0.0  # DP-SGD alone: no Gaussian, no shortcut


def test_an_answer_past_the_budget_is_refused_without_composing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(tmp_path / "payment" / "privacy-ledger.sqlite", {"payment.features@lender": 6.0}, DELTA,
                    party="payment")
    ledger.charge([_gaussian(3.0, 1)], "payment.features@lender")
    composed: list[int] = []
    original = accounting._account_uncached

    def counting(mechanisms, delta):  # type: ignore[no-untyped-def]
        composed.append(len(mechanisms))
        return original(mechanisms, delta)

    monkeypatch.setattr(accounting, "_account_uncached", counting)
    with pytest.raises(BudgetExceeded, match="at least"):
        ledger.charge([_gaussian(3.0, 200)], "payment.features@lender")
    assert composed == []
    assert len(ledger.entries) == 1  # nothing recorded
    ledger.charge([_gaussian(3.0, 1)], "payment.features@lender")  # within the budget: composed and charged
    assert composed and len(ledger.entries) == 2
