"""The two halves of the joint credit model.

Payment bottom model: its per-user features -> an embedding of `embedding_dim`. Lender top model: its own features
plus that embedding -> the default logit. Built from a seeded generator so both transports start from the same
weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
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
    """`squash_to`: when embeddings get Gaussian noise, outputs are squashed into the clip ball
    (C * tanh(u) / sqrt(d)) so clipping never cuts signal and the noise sees a full-norm signal."""

    def __init__(self, n_features: int, hidden: list[int], embedding_dim: int,
                 squash_to: float | None = None) -> None:
        super().__init__()
        self.net = mlp([n_features, *hidden, embedding_dim])
        self.squash_scale = None if squash_to is None else squash_to / embedding_dim ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out if self.squash_scale is None else self.squash_scale * torch.tanh(out)


class LenderTop(nn.Module):
    """Combines the lender's features with the payment embedding; `embedding_dim=0` gives the lender-only model.

    `label_flip`: when trained on randomized-response labels (flip probability f), the network learns
    P(y_rr = 1) = f + (1 - 2f) P(y = 1); `probability` undoes that (post-processing, no privacy cost), so scores
    and scorecard points are calibrated to real default rates. Ranking (AUC) is unchanged.
    """

    def __init__(self, n_features: int, embedding_dim: int, hidden: list[int], label_flip: float = 0.0) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.net = mlp([n_features + embedding_dim, *hidden, 1])
        self.register_buffer("label_flip", torch.tensor(float(label_flip)))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """The logit of the labels it was trained on (randomized ones when protected): what training uses."""
        if embedding is not None:
            x = torch.cat([x, embedding], dim=1)
        return self.net(x).squeeze(1)

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
    return PaymentBottom(n_features, config.model.payment_hidden, config.model.embedding_dim, squash_to=squash)


def lender_model(n_features: int, embedding_dim: int, config: FedConfig) -> LenderTop:
    """The lender part exactly as the lender party builds it. The federated top model knows the randomized-response
    flip rate of the labels it learns from, so its probabilities can be debiased; the lender-only baseline
    (embedding_dim=0) learns clean labels."""
    privacy = config.privacy
    flip = 0.0
    if embedding_dim and privacy.enabled and privacy.label_epsilon is not None:
        from fedscore.shared.privacy import flip_probability

        flip = flip_probability(privacy.label_epsilon)
    return LenderTop(n_features, embedding_dim, config.model.lender_hidden, label_flip=flip)


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


def init_module(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                bound = 1.0 / layer.in_features ** 0.5
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=gen) * 2 - 1) * bound * 3**0.5)
                layer.bias.zero_()
    return module
