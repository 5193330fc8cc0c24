"""DP-SGD for a party's part of the model (Opacus), for the outsider who sees the released parameters.

Each round a party takes `steps_per_round` Poisson-sampled steps (rate q = batch / n_train). The noise is
calibrated once, for all planned rounds, to the outsider eps target (Opacus PRV). Both sides use
loss_reduction="sum": the per-sample loss is summed over the batch, and with "sum" Opacus leaves p.grad as the noisy
SUM of clipped per-sample gradients (no 1/B). The inner optimizer is Adam, which is invariant to that scale (plain
SGD would need its lr divided by B; weight decay is correspondingly ~1/B as strong). A Poisson batch of any size is
treated the same way on both sides; empty ones are skipped (that depends on the sampling alone, not on data).
Opacus is imported here only, lazily (3-4 s).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shared.config import PrivacyConfig

if TYPE_CHECKING:
    from shared.privacy import DpSgdRelease


@dataclass(frozen=True)
class DpSgdPlan:
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    clip: float
    lr: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Both parts are released, and each part's training touches both parties' rows of a user (the payment part through
# the gradients it receives, the lender part through the embeddings), so the outsider's guarantee for a user is the
# composition of BOTH parts' DP-SGD runs. The two parties run the same plan (same training users, same config), so
# each accounts for 2x its own steps, and each calibrates its noise to that joint target.
RELEASED_PARTS = 2


def plan_dp_sgd(privacy: PrivacyConfig, n_train: int, rounds: int) -> DpSgdPlan:
    from shared.privacy import calibrate_dp_sgd

    q = min(1.0, privacy.dpsgd_batch_size / max(n_train, 1))
    steps = privacy.dpsgd_local_epochs * math.ceil(1 / q)
    sigma = privacy.dpsgd_noise_multiplier
    if sigma is None:
        assert privacy.outsider_epsilon is not None
        sigma = calibrate_dp_sgd(privacy.outsider_epsilon, privacy.delta, sample_rate=q,
                                 steps=RELEASED_PARTS * steps * rounds)
    return DpSgdPlan(noise_multiplier=sigma, sample_rate=q, steps_per_round=steps, clip=privacy.dpsgd_clip,
                     lr=privacy.dpsgd_lr)


def joint_release(plan: DpSgdPlan) -> DpSgdRelease:
    """The record a party charges per round: this round's DP-SGD steps of both released parts."""
    from shared.privacy import DpSgdRelease

    return DpSgdRelease(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                        steps=RELEASED_PARTS * plan.steps_per_round, protects="joint.records", clip=plan.clip)


# per-sample losses of the users in `batch`, summed: (module, batch indices) -> scalar
BatchLoss = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def dp_sgd_round(model: nn.Module, batch_loss: BatchLoss, n: int, plan: DpSgdPlan, optimizer_state: dict | None,
                 weight_decay: float, generator: torch.Generator) -> tuple[dict, list[float]]:
    """One round of DP-SGD on `model` in place; returns the inner optimizer's state and the batch losses."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    inner = torch.optim.Adam(model.parameters(), lr=plan.lr, weight_decay=weight_decay)
    if optimizer_state:
        inner.load_state_dict(optimizer_state)
    wrapped = GradSampleModule(model, loss_reduction="sum")
    optimizer = DPOptimizer(inner, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.clip,
                            expected_batch_size=max(1, round(plan.sample_rate * n)), loss_reduction="sum",
                            generator=generator)
    losses = []
    wrapped.train()
    # Opacus' hooks warn that no *input* needs a gradient; only the parameters do, which is what we want
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    for _ in range(plan.steps_per_round):
        batch = (torch.rand(n, generator=generator) < plan.sample_rate).nonzero().squeeze(1)
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
