"""The noise itself: clipping, Gaussian releases, randomized response, and the cheap label-gradient release.

Every draw comes from a `NoiseSource` (secure_random: a ChaCha20 keystream keyed from the OS), never from a seeded
generator: a guarantee is only as good as the unpredictability of its randomness. Each function matches one record
in `mechanisms`; the docstring says which.
"""

from __future__ import annotations

import torch

from fedscore.shared.privacy.mechanisms import flip_probability
from fedscore.shared.privacy.secure_random import NoiseSource


def clip_rows(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale each row of a 2-D tensor down to L2 norm <= clip (rows already inside are unchanged).

    Rows that are scaled are aimed a few ulps inside the ball, so rounding never leaves a norm above `clip`:
    the sensitivity bound the accountant relies on holds exactly, not approximately.
    """
    if x.dim() != 2:
        raise ValueError(f"clip_rows expects a 2-D tensor (users x dims), got shape {tuple(x.shape)}")
    if not clip > 0:
        raise ValueError(f"clip must be positive, got {clip}")
    norms = torch.linalg.vector_norm(x.double(), dim=1, keepdim=True)
    margin = 1.0 - 8.0 * torch.finfo(x.dtype).eps
    scale = torch.where(norms > clip, clip * margin / norms.clamp_min(1e-300), torch.ones_like(norms))
    return (x.double() * scale).to(x.dtype)


def gaussian_release(x: torch.Tensor, clip: float, noise_multiplier: float,
                     source: NoiseSource) -> torch.Tensor:
    """Clip each row to `clip`, then add N(0, (noise_multiplier * clip)^2) per coordinate.

    Record: GaussianRelease(noise_multiplier, clip, sensitivity=1.0 under add/remove against a null row, 2.0 under
    replace-one, count = how many times each user's row goes out).
    """
    clipped = clip_rows(x, clip)
    return clipped + source.normal(clipped.shape, noise_multiplier * clip, clipped.dtype)


def randomized_response(labels: torch.Tensor, epsilon: float, source: NoiseSource) -> torch.Tensor:
    """Flip each 0/1 label independently with probability 1/(1+e^eps): pure eps-DP per label (replace-one).

    Record: RandomizedResponse(epsilon). Draw once and keep the result: drawing again for the same labels composes.
    """
    if not epsilon > 0:
        raise ValueError(f"randomized response needs epsilon > 0, got {epsilon}")
    if labels.numel() and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("randomized_response expects labels that are all 0 or 1")
    flip = source.bernoulli(labels.shape, flip_probability(epsilon))
    return torch.where(flip, 1 - labels, labels)


def clipped_label_gradients(p: torch.Tensor, y: torch.Tensor, jacobian_rows: torch.Tensor, clip: float,
                            noise_multiplier: float, source: NoiseSource,
                            shape: str = "isotropic") -> torch.Tensor:
    """Per-user gradients of the logistic loss w.r.t. the embedding, privatized for the labels only.

    For one logit z_i = f(x_i, h_i) the exact gradient is dL_i/dh_i = (p_i - y_i) * J_i with J_i = dz_i/dh_i.
    We clip J_i to `clip` (C_J). Changing y_i alone moves the residual (p_i - y_i) by at most 1 (p in [0, 1], y in
    {0, 1}), so g_i moves by at most C_J, along J_i. Two noise shapes, with the same Gaussian guarantee
    (noise multiplier sigma, sensitivity 1, replace-one; record `label_gradient_release(sigma, clip, count)` with
    count = rounds - 1 gradient exchanges: the last round sends none):

    - "isotropic": g_i = (p_i - y_i) J_i + N(0, (sigma C_J)^2 I), noise in every coordinate;
    - "residual": g_i = (p_i - y_i + sigma * xi_i) J_i, xi_i ~ N(0, 1): the noise sits on the one scalar the label
      moves, along the line it moves g_i on. The shift between neighbours, |delta(p - y)| |J_i| <= |J_i|, meets
      noise of std sigma |J_i| along that same line, so the privacy loss is a 1-D Gaussian's with shift <= 1/sigma,
      as for the isotropic shape. Isotropic noise off that line only blurs the cosine attack's denominator: an
      attacker who projects on the line ignores it, while the payment holder's training still pays for it
      (measured on UCI: BENCHMARKS.md).

    The bound holds only if p_i and J_i do not themselves depend on the clean labels: the model that produced them
    must be trained on privatized labels, or itself with DP, and that cost is accounted separately.
    """
    if p.dim() != 1 or y.shape != p.shape or jacobian_rows.dim() != 2 or jacobian_rows.shape[0] != p.shape[0]:
        raise ValueError(f"shapes: p {tuple(p.shape)}, y {tuple(y.shape)}, jacobian_rows "
                         f"{tuple(jacobian_rows.shape)}; expected (n,), (n,), (n, d)")
    if bool(((p < 0) | (p > 1) | (y < 0) | (y > 1)).any()):
        raise ValueError("p and y must lie in [0, 1]: the sensitivity bound |delta(p - y)| <= 1 needs it")
    if shape not in ("isotropic", "residual"):
        raise ValueError(f"noise shape must be 'isotropic' or 'residual', got {shape!r}")
    residual = (p.to(jacobian_rows.dtype) - y.to(jacobian_rows.dtype)).unsqueeze(1)
    rows = clip_rows(jacobian_rows, clip)
    if shape == "residual":
        return (residual + source.normal(residual.shape, noise_multiplier, rows.dtype)) * rows
    exact = residual * rows
    return exact + source.normal(exact.shape, noise_multiplier * clip, exact.dtype)
