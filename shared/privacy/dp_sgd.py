"""DP-SGD for a party's part of the model (Opacus), for the outsider who sees the released parameters.

Each round a party takes `steps_per_round` Poisson-sampled steps (rate q = batch / n_train). The noise is
calibrated once, for all planned rounds, to the outsider eps target (Opacus PRV). Both the Poisson sampling and the
Gaussian noise come from a `NoiseSource` (ChaCha20 keyed from the OS): Opacus' own generator would be a seeded
torch generator, which anyone holding the seed could replay, and its secure_mode needs torchcsprng. Both sides use
loss_reduction="sum": the per-sample loss is summed over the batch, and with "sum" Opacus leaves p.grad as the noisy
SUM of clipped per-sample gradients (no 1/B). The inner optimizer is Adam, which is invariant to that scale (plain
SGD would need its lr divided by B; weight decay is correspondingly ~1/B as strong). A Poisson batch of any size is
treated the same way on both sides; empty ones are skipped (that depends on the sampling alone, not on data).
Opacus is imported lazily, inside the functions that need it (3-4 s).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedscore.shared.config import PrivacyConfig
from fedscore.shared.privacy.gradient_canaries import GradientCanaries, flat_split
from fedscore.shared.privacy.secure_random import NoiseSource
from fedscore.shared.protocol import steps

if TYPE_CHECKING:
    from fedscore.shared.privacy import DpSgdRelease, GaussianRelease


@dataclass(frozen=True)
class DpSgdPlan:
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    clip: float
    lr: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dp_sgd_rounds(rounds: int) -> dict[str, int]:
    """How many rounds of DP-SGD each part actually takes, counted on the protocol's table: the lender trains in
    every round; the payment holder applies gradients from round 1 on (round 0 has none, the last round's gradients
    are never computed)."""
    return steps.dp_sgd_rounds(rounds)


def gradient_exchanges(rounds: int) -> int:
    """Gradient payloads the payment holder receives in a run of `rounds`, counted on the protocol's table: one
    after each lender round but the last (no embed follows the last round to deliver them)."""
    return steps.gradient_exchanges(rounds)


def plan_dp_sgd(privacy: PrivacyConfig, n_train: int, rounds: int, party: str = "") -> DpSgdPlan:
    """Noise for `party`'s released part ("lender" or "payment"; "" when both take the same), calibrated to the
    outsider target over the steps both parts will take.

    Both parts are released, and each part's training touches both parties' rows of a user (the payment part
    through the gradients it receives, the lender part through the embeddings), so the outsider's guarantee for a
    user is the composition of BOTH parts' DP-SGD steps. Each party charges the steps it takes to its own ledger;
    the report composes the two ledgers. With `lender_dpsgd_noise_multiplier` the lender's top (a handful of
    parameters) takes that noise and the payment part is calibrated to what is left of the outsider target: a noisier
    lender top costs the labels' guarantee against the payment holder far less (its DP-SGD is composed there).
    """
    from fedscore.shared.privacy import CalibrationError, DpSgdRelease, calibrate_dp_sgd

    q = min(1.0, privacy.dpsgd_batch_size / max(n_train, 1))
    steps = privacy.dpsgd_local_epochs * math.ceil(1 / q)
    sigma = privacy.dpsgd_noise_multiplier
    lender_sigma = privacy.lender_dpsgd_noise_multiplier
    rounds_of = dp_sgd_rounds(rounds)
    if privacy.statistics_fit:  # the payment part is fitted from noisy statistics: DP-SGD is the lender's alone
        if party == "payment":
            raise ValueError("privacy.payment_fit = 'statistics': the payment part takes no DP-SGD steps")
        sigma = lender_sigma if lender_sigma is not None else sigma
        if lender_sigma is not None and privacy.outsider_epsilon is not None:
            _check_outsider_target(privacy, q, steps * rounds_of["lender"], lender_sigma, rounds)
        if sigma is None:
            assert privacy.outsider_epsilon is not None
            try:
                sigma = calibrate_dp_sgd(privacy.outsider_epsilon, privacy.delta, sample_rate=q,
                                         steps=max(1, steps * rounds_of["lender"]),
                                         already=[*scaler_releases(privacy), *planned_statistics_fit(privacy, rounds)])
            except CalibrationError as exc:
                raise CalibrationError(
                    f"privacy.outsider_epsilon={privacy.outsider_epsilon:g} leaves nothing for the lender's DP-SGD "
                    f"after the payment part's statistics fit (privacy.payment_fit_noise_multiplier="
                    f"{privacy.payment_fit_noise_multiplier:g}): {exc}; raise that noise or the target") from exc
    elif party == "lender" and lender_sigma is not None:
        sigma = lender_sigma
    elif sigma is None:
        assert privacy.outsider_epsilon is not None
        already, planned = scaler_releases(privacy), steps * sum(rounds_of.values())
        if lender_sigma is not None:  # the lender's part at its own noise, the payment part takes the rest
            already = [*already, DpSgdRelease(noise_multiplier=lender_sigma, sample_rate=q,
                                              steps=steps * rounds_of["lender"], protects="joint.records")]
            planned = max(1, steps * rounds_of["payment"])
        sigma = calibrate_dp_sgd(privacy.outsider_epsilon, privacy.delta, sample_rate=q, steps=planned,
                                 already=already)
    return DpSgdPlan(noise_multiplier=sigma, sample_rate=q, steps_per_round=steps, clip=privacy.dpsgd_clip,
                     lr=privacy.dpsgd_lr)


def _check_outsider_target(privacy: PrivacyConfig, q: float, steps: int, lender_sigma: float, rounds: int) -> None:
    """With the lender's DP-SGD noise given and the payment part's statistics fit at its own noise, nothing is left to
    calibrate: refuse a plan whose composition misses the outsider target (each party's ledger holds only its own
    part, so no budget check would see the total)."""
    from fedscore.shared.privacy import CalibrationError, DpSgdRelease, epsilon_for
    from fedscore.shared.privacy.budgets import with_slack

    assert privacy.outsider_epsilon is not None
    lender = DpSgdRelease(noise_multiplier=lender_sigma, sample_rate=q, steps=max(1, steps), protects="joint.records")
    total = epsilon_for([*scaler_releases(privacy), *planned_statistics_fit(privacy, rounds), lender], privacy.delta)
    if total > with_slack(privacy.outsider_epsilon):  # the same slack as the parties' default budgets
        raise CalibrationError(
            f"privacy.lender_dpsgd_noise_multiplier={lender_sigma:g} with the payment part's statistics fit "
            f"(privacy.payment_fit_noise_multiplier={privacy.payment_fit_noise_multiplier:g}) composes to outsider "
            f"eps {total:.3f}, above privacy.outsider_epsilon={privacy.outsider_epsilon:g}: raise either noise")


def planned_statistics_fit(privacy: PrivacyConfig, rounds: int) -> list:
    """What the payment part's statistics fits release over a run (one fit per round it receives gradients in),
    against the outsider; [] when it trains by DP-SGD."""
    from fedscore.shared.privacy.statistics_fit import StatisticsFitPlan, planned_fit_releases

    if not privacy.statistics_fit:
        return []
    return planned_fit_releases(StatisticsFitPlan.from_privacy(privacy), dp_sgd_rounds(rounds)["payment"])


def scaler_releases(privacy: PrivacyConfig) -> list:
    """Both parties' DP standardisation statistics, which the outsider guarantee composes with DP-SGD (a record's
    epsilon depends on its noise multiplier only, so each party can write the other's without knowing its width)."""
    from fedscore.shared.privacy import scaler_statistics_release

    if not privacy.dp_scaler:
        return []
    return [scaler_statistics_release(float(privacy.scaler_noise_multiplier), 1.0)] * 2  # type: ignore[arg-type]


def part_release(plan: DpSgdPlan, steps: int, protects: str = "joint.records",
                 neighbouring: str = "add_remove") -> DpSgdRelease:
    """The record of `steps` DP-SGD steps of one released part (what a party charges for the steps it took)."""
    from fedscore.shared.privacy import DpSgdRelease

    return DpSgdRelease(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=steps,
                        protects=protects, clip=plan.clip, neighbouring=neighbouring)  # type: ignore[arg-type]


def label_training_release(plan: DpSgdPlan, steps: int, computed_from: str = "") -> DpSgdRelease:
    """The lender's DP-SGD steps on its top model, as the payment holder sees them (lender.labels@payment).

    Everything the lender later sends is computed from this model, so the labels' guarantee against the payment
    holder composes these steps. Replace-one of a label moves one clipped per-sample gradient by at most 2C
    (sensitivity 2). The Poisson batches are drawn by the lender's CSPRNG and never leave it (`sampling_hidden`),
    so amplification by subsampling holds against the payment holder for this component, unlike for anything the
    parties exchange. `computed_from` names the randomized-response draw the model trains on."""
    from fedscore.shared.privacy import DpSgdRelease

    return DpSgdRelease(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=steps,
                        protects="lender.labels", seen_by="payment", sampling_hidden=True, clip=plan.clip,
                        neighbouring="replace_one", computed_from=computed_from)


def planned_label_records(privacy: PrivacyConfig, plan: DpSgdPlan | None, rounds: int, exchanges: int,
                          draw: str, top_released: bool = True) -> list:
    """Every record a run charges to lender.labels@payment, known before it starts: randomized response (its draw
    named), the lender's DP-SGD steps in each of its rounds, and `exchanges` gradient exchanges, charged as not DP
    (noise 0) without DP-SGD or without gradient noise (clients/lender/party.py charges exactly these, one by one).
    A top trained without DP-SGD is released (not DP) only when it is the scoring part (`top_released`:
    model.lender_part = "top"); the lender's own GBDT part never reaches the payment holder.
    """
    from fedscore.shared.privacy import RandomizedResponse

    if privacy.label_epsilon is None:
        raise ValueError("privacy.label_epsilon is unset: the labels are unprotected, there is nothing to plan")
    records: list = [RandomizedResponse(epsilon=privacy.label_epsilon, protects="lender.labels", seen_by="outsider",
                                        draw=draw)]
    if plan is not None:
        records += [label_training_release(plan, plan.steps_per_round, draw)] * dp_sgd_rounds(rounds)["lender"]
    elif top_released:
        records += [released_lender_part(privacy, draw)]
    return records + [label_exchange_release(privacy, plan is not None, draw)] * exchanges


def released_lender_part(privacy: PrivacyConfig, draw: str) -> GaussianRelease:
    """The lender's part trained WITHOUT DP-SGD on the randomized labels, released with the model (whoever holds the
    bundle, the payment holder included, sees it): not DP (noise 0), so the guarantee is randomized response's own.
    With DP-SGD its steps (`label_training_release`) already cover the released part."""
    from fedscore.shared.privacy import label_gradient_release

    return label_gradient_release(0.0, privacy.gradient_clip, 1, draw)


def label_exchange_release(privacy: PrivacyConfig, lender_dp_sgd: bool, draw: str) -> GaussianRelease:
    """One gradient exchange as lender.labels@payment records it: a Gaussian on each residual p_i - y_i
    (sensitivity 1 in units of the Jacobian clip, not subsampled). The bound needs p_i and J_i free of the labels,
    i.e. a lender model trained with DP-SGD (`lender_dp_sgd`, its steps charged too); without it, or without
    gradient noise, the exchange is recorded as not DP (noise 0): the guarantee is then randomized response's own."""
    from fedscore.shared.privacy import label_gradient_release

    sigma = float(privacy.gradient_noise_multiplier or 0.0) if lender_dp_sgd and privacy.gradient_noise_on else 0.0
    return label_gradient_release(sigma, privacy.gradient_clip, 1, draw)


class _SecureNoiseOptimizer:
    """Mixin for Opacus' DPOptimizer: the Gaussian noise from a NoiseSource instead of a torch generator, and, in
    audit runs, the Dirac gradient canaries added to the clipped sum before the noise (gradient_canaries.py)."""

    noise_source: NoiseSource
    canaries: GradientCanaries | None = None
    canary_source: NoiseSource | None = None
    canary_split: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per parameter: which canaries, where
    sample_rate: float = 0.0

    def add_noise(self) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        std = self.noise_multiplier * self.max_grad_norm  # type: ignore[attr-defined]
        params = self.params  # type: ignore[attr-defined]
        canaries, terms, split = self.canaries, None, self.canary_split
        if canaries is not None:
            assert self.canary_source is not None
            terms = canaries.step_terms(self.sample_rate, self.max_grad_norm,  # type: ignore[attr-defined]
                                        self.canary_source)
        for i, p in enumerate(params):
            _check_processed_flag(p.summed_grad)
            noise = self.noise_source.normal(p.summed_grad.shape, std, p.summed_grad.dtype)
            noisy = p.summed_grad + noise
            if canaries is not None and split is not None and terms is not None and len(split[i][0]):
                which, where = split[i]
                flat = noisy.view(-1)
                flat[where] += terms[which].to(flat.dtype)
                # what the auditor scores: the noisy sum minus the real users' clipped sum, at the canary's coordinate
                canaries.score[which] += flat[where].double() - p.summed_grad.reshape(-1)[where].double()
            p.grad = noisy.view_as(p)
            _mark_as_processed(p.summed_grad)
        if canaries is not None:
            canaries.steps += 1


def _secure_optimizer(inner: torch.optim.Optimizer, plan: DpSgdPlan, n: int, source: NoiseSource,
                      canaries: GradientCanaries | None = None, canary_source: NoiseSource | None = None):
    from opacus.optimizers import DPOptimizer

    cls = type("SecureDPOptimizer", (_SecureNoiseOptimizer, DPOptimizer), {})
    optimizer = cls(inner, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.clip,
                    expected_batch_size=max(1, round(plan.sample_rate * n)), loss_reduction="sum")
    optimizer.noise_source = source
    optimizer.canaries, optimizer.canary_source, optimizer.sample_rate = canaries, canary_source, plan.sample_rate
    if canaries is not None:
        optimizer.canary_split = flat_split([p.shape for p in optimizer.params], canaries.coordinates)
    return optimizer


# per-sample losses of the users in `batch`, summed: (module, batch indices) -> scalar
BatchLoss = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def dp_sgd_round(model: nn.Module, batch_loss: BatchLoss, n: int, plan: DpSgdPlan, optimizer_state: dict | None,
                 weight_decay: float, source: NoiseSource, canaries: GradientCanaries | None = None,
                 canary_source: NoiseSource | None = None) -> tuple[dict, list[float]]:
    """One round of DP-SGD on `model` in place; returns the inner optimizer's state and the batch losses.

    Poisson sampling and noise both draw from `source` (secure_random): nobody can replay which users were in a
    batch or what noise was added. `canaries` (audit runs only) are updated in place; their own sampling draws from
    `canary_source`, so the users' sampling and noise are the same draws with or without them."""
    from opacus import GradSampleModule

    inner = torch.optim.Adam(model.parameters(), lr=plan.lr, weight_decay=weight_decay)
    if optimizer_state:
        inner.load_state_dict(optimizer_state)
    wrapped = GradSampleModule(model, loss_reduction="sum")
    optimizer = _secure_optimizer(inner, plan, n, source, canaries, canary_source)
    losses = []
    wrapped.train()
    # Opacus' hooks warn that no *input* needs a gradient; only the parameters do, which is what we want
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    for _ in range(plan.steps_per_round):
        batch = source.bernoulli((n,), plan.sample_rate).nonzero().squeeze(1)
        if len(batch) == 0:
            continue
        optimizer.zero_grad()
        loss = batch_loss(wrapped, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item() / len(batch))
    wrapped._close()
    for p in model.parameters():
        p.grad = None
    return inner.state_dict(), losses
