"""The payment part fitted from noisy sufficient statistics (shared/privacy/statistics_fit.py): the mechanism's
bounds, its solve, the part it writes. A private run that charges it and calibrates the lender around it:
tests/test_privacy_protocol.py (the default for a linear part)."""

from __future__ import annotations

import pytest
import torch

from fedscore.shared.config import ConfigError, load_config
from fedscore.shared.model.parts import PaymentBottom, add_linear_map
from fedscore.shared.privacy.secure_random import NoiseSource
from fedscore.shared.privacy.statistics_fit import (
    StatisticsFitPlan,
    design_rows,
    gram_release,
    moment_release,
    noisy_gram,
    noisy_moment,
    ridge_solve,
)

PLAN = StatisticsFitPlan(noise_multiplier=4.0, row_clip=2.0, target_clip=3.0, ridge=10.0)


def _rows(n: int = 400, d: int = 5) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1)) * 2.0


def test_rows_and_targets_are_clipped_so_one_user_moves_each_statistic_by_its_sensitivity() -> None:
    x = _rows()
    rows = design_rows(x, PLAN)
    assert rows.shape == (400, 6) and bool((rows.norm(dim=1) <= PLAN.row_clip).all())
    assert bool((rows.norm(dim=1) > PLAN.row_clip * 0.999).any())  # the test rows do reach the clip
    # add one extreme user: the Gram matrix (its upper triangle is what is noised) moves by <= C^2, the moments
    # (its target clipped to B) by <= C B, whatever the user's row and target
    extreme, huge = torch.tensor([[1e3, 0.0, 0.0, 0.0, 0.0]]), torch.tensor([1e6])  # on one axis: the worst case
    t = torch.randn(400, generator=torch.Generator().manual_seed(2))
    both = design_rows(torch.cat([x, extreme]), PLAN)
    quiet = NoiseStub()
    gram_moved = noisy_gram(both, _noiseless(PLAN), quiet) - noisy_gram(rows, _noiseless(PLAN), quiet)
    assert torch.triu(gram_moved).norm() <= PLAN.row_clip ** 2 * (1 + 1e-9)
    assert torch.triu(gram_moved).norm() >= PLAN.row_clip ** 2 * 0.99  # the bound is tight, not loose
    moment_moved = (noisy_moment(both, torch.cat([t, huge]), _noiseless(PLAN), quiet)
                    - noisy_moment(rows, t, _noiseless(PLAN), quiet))
    assert moment_moved.norm() <= PLAN.row_clip * PLAN.target_clip * (1 + 1e-9)
    assert gram_release(PLAN).clip == PLAN.row_clip ** 2 and moment_release(PLAN).clip == PLAN.row_clip * 3.0


def _noiseless(plan: StatisticsFitPlan) -> StatisticsFitPlan:
    return StatisticsFitPlan(noise_multiplier=0.0, row_clip=plan.row_clip, target_clip=plan.target_clip,
                             ridge=plan.ridge)


class NoiseStub(NoiseSource):
    """A source whose draws are zero (only ever used with a zero noise multiplier above)."""

    def normal(self, shape, std, dtype=torch.float32):  # type: ignore[no-untyped-def, override]
        assert std == 0.0
        return torch.zeros(tuple(shape), dtype=dtype)


def test_the_gram_noise_is_symmetric_at_the_planned_scale_and_the_moment_noise_too() -> None:
    d = 40
    rows = torch.zeros(10, d, dtype=torch.float64)
    gram = noisy_gram(rows, PLAN, NoiseSource())
    assert torch.equal(gram, gram.T)
    upper = gram[tuple(torch.triu_indices(d, d))]
    assert upper.std().item() == pytest.approx(PLAN.noise_multiplier * PLAN.row_clip ** 2, rel=0.1)
    moment = noisy_moment(torch.zeros(10, 2000, dtype=torch.float64), torch.zeros(10), PLAN, NoiseSource())
    assert moment.std().item() == pytest.approx(PLAN.noise_multiplier * PLAN.row_clip * PLAN.target_clip, rel=0.1)


def test_without_noise_the_fit_is_the_ridge_regression_of_the_clipped_rows() -> None:
    x = _rows() / 4
    truth = torch.tensor([0.5, -0.3, 0.0, 0.2, 0.1], dtype=torch.float64)
    t = (x.double() @ truth + 0.05).clamp(-3, 3)
    plan = StatisticsFitPlan(noise_multiplier=0.0, row_clip=100.0, target_clip=100.0, ridge=1e-6)
    rows = design_rows(x, plan)
    coefficients = ridge_solve(noisy_gram(rows, plan, NoiseStub()), noisy_moment(rows, t, plan, NoiseStub()), plan)
    assert torch.allclose(coefficients[:-1], truth, atol=1e-6) and coefficients[-1].item() == pytest.approx(0.05)


def test_the_fit_is_written_into_the_part_exactly() -> None:
    torch.manual_seed(0)
    part = PaymentBottom(5, [], 8, partial_logit=True)
    x = torch.randn(50, 5)
    before = part(x).squeeze(1).detach()
    w, b = torch.randn(5, dtype=torch.float64), 0.7
    add_linear_map(part, w, b)
    after = part(x).squeeze(1).detach()
    assert torch.allclose(after, before + (x.double() @ w).float() + b, atol=1e-5)
    with pytest.raises(ValueError, match="linear part"):
        add_linear_map(PaymentBottom(5, [4], 8, partial_logit=True), w, b)


def test_auto_fits_a_linear_part_from_statistics_and_refuses_a_statistics_fit_it_cannot_write() -> None:
    assert load_config(None, []).privacy.payment_fit == "statistics"  # 'auto', resolved for the linear default
    assert load_config(None, ["model.payment_hidden=[16]"]).privacy.payment_fit == "dp_sgd"
    with pytest.raises(ConfigError, match="payment_hidden"):
        load_config(None, ["privacy.payment_fit=statistics", "model.payment_hidden=[16]"])
    with pytest.raises(ConfigError, match="partial_logit"):
        load_config(None, ["privacy.payment_fit=statistics", "model.payment_output=embedding"])
    # without DP on the part there is no statistics fit, so nothing to refuse
    assert not load_config(None, ["privacy.payment_fit=statistics", "privacy.enabled=false"]).privacy.statistics_fit


def test_an_outsider_target_the_fit_leaves_nothing_of_is_refused_with_the_fields_named() -> None:
    """The fit's Gaussians cost eps ~1.56 on their own at the default noise: a target of 1 cannot be met by any
    lender DP-SGD noise, and a given lender noise that overshoots the target is refused too (no party's ledger
    would see the composed total). 4,000 training users: DP-SGD's default batch samples them all (rate 1), which
    the accountant bounds in closed form rather than by a subsampled series (seconds)."""
    from fedscore.shared.privacy import CalibrationError
    from fedscore.shared.privacy.dp_sgd import plan_dp_sgd

    tight = load_config(None, ["privacy.outsider_epsilon=1"]).privacy
    with pytest.raises(CalibrationError, match="payment_fit_noise_multiplier=4"):
        plan_dp_sgd(tight, 4000, 2, "lender")
    loud = load_config(None, ["privacy.lender_dpsgd_noise_multiplier=0.5"]).privacy
    with pytest.raises(CalibrationError, match=r"lender_dpsgd_noise_multiplier=0\.5 .* above privacy\.outsider_eps"):
        plan_dp_sgd(loud, 4000, 2, "lender")
    quiet = load_config(None, ["privacy.lender_dpsgd_noise_multiplier=20"]).privacy
    assert plan_dp_sgd(quiet, 4000, 2, "lender").noise_multiplier == 20.0
    with pytest.raises(ValueError, match="no DP-SGD steps"):
        plan_dp_sgd(quiet, 4000, 2, "payment")


def _audited(noise: float, m: int = 300, width: int = 20) -> dict:
    """A fit's canaries through both releases (a Gram matrix, two moments) at `noise`, then the white-box audit of
    them against the claim of noise 4, as fedscore/audit/gradient_audit.py runs it on a party's state."""
    from types import SimpleNamespace

    from fedscore.audit.gradient_audit import statistics_fit_audits
    from fedscore.shared.privacy.statistics_fit import StatisticsCanaries

    plan = StatisticsFitPlan(noise_multiplier=noise, row_clip=2.0, target_clip=3.0, ridge=10.0)
    canaries = StatisticsCanaries.draw(m, width, NoiseSource())
    rows = design_rows(torch.randn(200, width - 1, generator=torch.Generator().manual_seed(3)), plan)
    source = NoiseSource() if noise else NoiseStub()
    noisy_gram(rows, plan, source, canaries)
    for _ in range(2):
        noisy_moment(rows, torch.randn(200, generator=torch.Generator().manual_seed(4)), plan, source, canaries)
    assert len(canaries.coordinates) == min(m, width * (width + 1) // 2 + width)
    claimed = StatisticsFitPlan(noise_multiplier=4.0, row_clip=2.0, target_clip=3.0, ridge=10.0)  # what is charged
    state = SimpleNamespace(statistics_canaries=canaries.to_state(), statistics_fit=claimed.to_dict())
    (row,) = statistics_fit_audits({"payment": state}, False, 1e-6, 0.95)
    return {"row": row, "canaries": canaries}


def test_the_fits_canaries_score_one_unit_per_release_when_in_and_the_audit_reads_them() -> None:
    """Noise off while the claim stands: every canary reads exactly (1 unit per release it sat in, or 0), and the
    white-box bound exceeds the claim; with the noise on it stays under it."""
    silent = _audited(0.0)
    canaries = silent["canaries"]
    gram = canaries.coordinates < canaries.n_upper
    expected = canaries.included.to(torch.float64) * torch.where(gram, 1, 2)  # the Gram once, the moments twice
    assert torch.allclose(canaries.score, expected) and torch.equal(canaries.releases, torch.where(gram, 1, 2))
    assert silent["row"]["accuracy"] == 1.0 and silent["row"]["violation"]
    honest = _audited(4.0)["row"]
    assert not honest["violation"] and honest["epsilon_lower_bound"] <= honest["claim"]
    assert "statistics fit, white box" in honest["guarantee"] and honest["steps"] == 2
