"""The two halves of the joint credit model.

Payment bottom model: its per-user features -> an embedding of `embedding_dim`. Lender top model: its own features
plus that embedding -> the default logit. Built from a seeded generator so both transports start from the same
weights.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from fedscore.shared.config import FedConfig


def mlp(sizes: list[int], out_activation: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    if out_activation is not None:
        layers.append(out_activation)
    return nn.Sequential(*layers)


class PaymentBottom(nn.Module):
    """Payment features -> what crosses: the embedding h(x) (`embedding_dim` wide), or, with `partial_logit`, its
    projection s = w_P . h(x) by the payment holder's own bias-free head (one number; the lender's bias is the
    intercept). `squash_to`: when outputs get Gaussian noise, they are squashed into the clip ball
    (C * tanh(u) / sqrt(d)) so clipping never cuts signal and the noise sees a full-norm signal; for one number
    that is |s| <= C, the public bound its noise is calibrated to."""

    def __init__(self, n_features: int, hidden: list[int], embedding_dim: int,
                 squash_to: float | None = None, partial_logit: bool = False) -> None:
        super().__init__()
        self.net = mlp([n_features, *hidden, embedding_dim])
        self.head = nn.Linear(embedding_dim, 1, bias=False) if partial_logit else None
        self.output_dim = 1 if partial_logit else embedding_dim
        self.squash_scale = None if squash_to is None else squash_to / self.output_dim ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.head is not None:
            out = self.head(out)
        return out if self.squash_scale is None else self.squash_scale * torch.tanh(out)


def add_linear_map(model: PaymentBottom, weights: torch.Tensor, intercept: float) -> None:
    """Add w . x + b to a linear partial-logit part's output, in place (the statistics fit's step,
    shared/privacy/statistics_fit.py). The part's map head . (W x + c) is collapsed to one row first: row 0 of W and
    c holds the whole map, the other rows are zero and the head is e_0, so the part computes exactly the old map
    plus the new one (before its squash, when it has one)."""
    layers = [m for m in model.net if isinstance(m, nn.Linear)]
    if len(layers) != 1 or model.head is None:
        raise ValueError("add_linear_map needs a linear part (no hidden layers) that sends one partial logit")
    layer, head = layers[0], model.head
    with torch.no_grad():
        w = (head.weight @ layer.weight).squeeze(0).double() + weights.double()
        b = float((head.weight @ layer.bias).item()) + float(intercept)
        layer.weight.zero_()
        layer.bias.zero_()
        head.weight.zero_()
        layer.weight[0] = w.to(layer.weight.dtype)
        layer.bias[0] = b
        head.weight[0, 0] = 1.0


class LenderTop(nn.Module):
    """Combines the lender's features with the payment embedding; `embedding_dim=0` gives the lender-only model.

    `label_flip`: the flip probability f of the randomized-response labels it is trained on. Two ways to learn from
    them (`rr_loss`), both post-processing of the released labels (no privacy cost):
    - "plain": the network learns P(y_rr = 1) = f + (1 - 2f) P(y = 1) with the ordinary logistic loss;
      `probability` undoes the flip, so scores and scorecard points are calibrated to real default rates.
    - "forward" (forward-corrected loss, Patrini et al. 2017): the network's sigmoid is P(y = 1) itself and the loss
      is the log loss of f + (1 - 2f) sigmoid(z) against y_rr, so the model is fitted where it is specified (a
      linear logit of the clean label, not of the flipped one) and the gradients weigh confident users as the
      clean-label loss would. `probability` is then the sigmoid (the buffer holds 0: nothing to undo).
    """

    def __init__(self, n_features: int, embedding_dim: int, hidden: list[int], label_flip: float = 0.0,
                 rr_loss: str = "plain", partial_logit: str | None = None) -> None:
        """`partial_logit` ("fixed" or "learned", with embedding_dim=1): the payment side arrives as one partial
        logit s and the top is additive, z = net(x) + c s, with c fixed at 1 (a buffer) or a learned weight
        starting at 1 (a bias-free Linear, so Opacus computes its per-sample gradients like any layer's)."""
        super().__init__()
        self.embedding_dim = embedding_dim
        self.partial_logit = partial_logit
        if partial_logit is not None:
            if embedding_dim != 1 or partial_logit not in ("fixed", "learned"):
                raise ValueError(f"a partial-logit top takes one number per user and a 'fixed' or 'learned' "
                                 f"weight, got width {embedding_dim} and {partial_logit!r}")
            self.net = mlp([n_features, *hidden, 1])
            if partial_logit == "learned":
                self.payment_weight = nn.Linear(1, 1, bias=False)
                self.payment_weight.init_value = 1.0  # type: ignore[assignment]  # read by init_module
            else:
                self.register_buffer("payment_weight_fixed", torch.tensor(1.0))
        else:
            self.net = mlp([n_features + embedding_dim, *hidden, 1])
        # the training labels' flip rate, for the loss; a constant of the config, not a parameter
        self.loss_flip = float(label_flip) if rr_loss == "forward" else 0.0
        self.register_buffer("label_flip", torch.tensor(0.0 if self.loss_flip else float(label_flip)))

    def loss(self, logit: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Log loss of the (possibly randomized) training labels: per user, summed or averaged."""
        if not self.loss_flip:
            return F.binary_cross_entropy_with_logits(logit, y, reduction=reduction)
        f = self.loss_flip
        log_f, log_keep = math.log(f), math.log(1 - 2 * f)
        log_p1 = torch.logaddexp(torch.full_like(logit, log_f), log_keep + F.logsigmoid(logit))  # log P(y_rr = 1)
        log_p0 = torch.logaddexp(torch.full_like(logit, log_f), log_keep + F.logsigmoid(-logit))  # log P(y_rr = 0)
        per_user = -(y * log_p1 + (1 - y) * log_p0)
        return per_user.sum() if reduction == "sum" else per_user.mean() if reduction == "mean" else per_user

    def residual(self, logit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d loss_i / d logit_i per user: p_i - y_i for the plain loss. For the forward-corrected loss it is
        -(1-2f) s(1-s) (y/P1 - (1-y)/P0) with s = sigmoid(z), P1 = f + (1-2f)s, P0 = 1 - P1; changing y moves it by
        (1-2f) s(1-s) / (P1 P0) <= 1 (since P1 P0 = f(1-f) + (1-2f)^2 s(1-s) and 2(1-2f)s(1-s) <= 1-f), the same
        bound as |delta(p - y)| <= 1 that the label-gradient noise's sensitivity rests on."""
        if not self.loss_flip:
            return torch.sigmoid(logit) - y
        z = logit.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.loss(z, y, reduction="sum"), z)
        return grad

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """The logit of the labels it was trained on (randomized ones when protected): what training uses."""
        if self.partial_logit is None:
            if embedding is not None:
                x = torch.cat([x, embedding], dim=1)
            return self.net(x).squeeze(1)
        z = self.net(x).squeeze(1)
        if embedding is None:
            return z
        if self.partial_logit == "learned":
            return z + self.payment_weight(embedding).squeeze(1)
        return z + self.payment_weight_fixed * embedding[:, 0]

    @property
    def input_width(self) -> int:
        """Columns its first layer takes: the lender's features (+ the embedding, when it is not additive)."""
        return self.net[0].in_features

    def probability(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """P(default) with the randomized-response flip undone. A model learnt from flipped labels can still
        score below the flip rate; such scores are floored at 0.1% rather than sent to ~0 (a credit score never
        claims certainty, and one defaulter at p~0 would dominate the log loss)."""
        p = torch.sigmoid(self.forward(x, embedding))
        floor = torch.where(self.label_flip > 0, 1e-3, 1e-7)
        return ((p - self.label_flip) / (1 - 2 * self.label_flip)).clamp(floor, 1 - floor)


def payment_model(n_features: int, config: FedConfig) -> PaymentBottom:
    """The payment part exactly as the payment party builds it: squashed into the embedding clip ball when its
    embeddings are noised (the squash is not a parameter, so a state dict alone cannot restore it)."""
    squash = config.privacy.embedding_clip if config.privacy.features_protected else None
    return PaymentBottom(n_features, config.model.payment_hidden, config.model.embedding_dim, squash_to=squash,
                         partial_logit=config.model.payment_output == "partial_logit")


def lender_model(n_features: int, embedding_dim: int, config: FedConfig) -> LenderTop:
    """The lender part exactly as the lender party builds it. The federated top model knows the randomized-response
    flip rate of the labels it learns from, so its probabilities can be debiased; the lender-only baseline
    (embedding_dim=0) learns clean labels."""
    privacy = config.privacy
    flip = 0.0
    if embedding_dim and privacy.enabled and privacy.label_epsilon is not None:
        from fedscore.shared.privacy import flip_probability

        flip = flip_probability(privacy.label_epsilon)
    partial = (config.model.partial_logit_weight
               if embedding_dim and config.model.payment_output == "partial_logit" else None)
    return LenderTop(n_features, embedding_dim, config.model.lender_hidden, label_flip=flip,
                     rr_loss=privacy.rr_loss, partial_logit=partial)


def configure_torch() -> None:
    """One intra-op thread unless FEDSCORE_TORCH_THREADS says otherwise: these MLPs are small, and on a 2-core
    machine shared by two parties and a coordinator, more threads only contend (measured: several times slower)."""
    import os

    torch.set_num_threads(int(os.environ.get("FEDSCORE_TORCH_THREADS", "1")))


def seeded(seed: int, *parts: str) -> int:
    """A stable sub-seed for one purpose (party, round, role), independent of Python's hash randomisation."""
    import hashlib

    digest = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def init_module(module: nn.Module, seed: int, zero_head: bool = False) -> nn.Module:
    """Seeded uniform weights, zero biases; a layer with an `init_value` (the lender's learned coefficient on the
    partial logit) starts there. `zero_head`: the payment holder's projection head starts at 0, so its first output
    is the constant 0 whatever the data (the other layers still get random weights: the head's first gradient,
    sum_i g_i h(x_i), needs a non-zero h)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                bound = 1.0 / layer.in_features ** 0.5
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=gen) * 2 - 1) * bound * 3**0.5)
                if layer.bias is not None:
                    layer.bias.zero_()
                if hasattr(layer, "init_value"):
                    layer.weight.fill_(float(layer.init_value))
        head = getattr(module, "head", None)
        if zero_head and isinstance(head, nn.Linear):
            head.weight.zero_()
    return module
