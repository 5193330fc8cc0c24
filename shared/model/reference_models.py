"""Reference models for the baselines: the best a single data holder could fit, chosen on validation.

A baseline that is under-trained flatters the federation. So each baseline fits three model families on the same
training users - logistic regression, gradient-boosted trees, and an MLP with early stopping on validation AUC -
and reports the test metrics of whichever did best on validation (the choice is recorded).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from fedscore.shared.data.party_data import batches
from fedscore.shared.metrics import all_metrics, auc
from fedscore.shared.model.parts import LenderTop, init_module, seeded


def _mlp_early_stopped(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, hidden: list[int],
                       epochs: int, lr: float, batch_size: int, seed: int) -> np.ndarray:
    model = init_module(LenderTop(x.shape[1], 0, hidden), seeded(seed, "reference", "mlp"))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
    idx = torch.from_numpy(np.flatnonzero(train))
    best, best_p = -1.0, None
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seeded(seed, "reference", str(epoch)))
        model.train()
        for batch in batches(len(idx), batch_size, generator):
            b = idx[batch]
            loss = F.binary_cross_entropy_with_logits(model(xt[b]), yt[b])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            p = torch.sigmoid(model(xt)).numpy()
        score = auc(y[val], p[val])
        if score > best:
            best, best_p = score, p
    assert best_p is not None
    return best_p


@threadpool_limits.wrap(limits=1)  # as the lender's own part and the tuned references fit (lender_gbdt.py: why)
def best_reference(x_scaled: np.ndarray, x_raw: np.ndarray, y: np.ndarray, split: np.ndarray, *, hidden: list[int],
                   epochs: int, lr: float, batch_size: int, seed: int,
                   train_code: int = 0, val_code: int = 1, test_code: int = 2) -> dict[str, float | str]:
    """Test metrics of the family with the best validation AUC, plus which family it was. On one OpenMP/BLAS
    thread."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    train, val, test = split == train_code, split == val_code, split == test_code
    if not val.any():  # no validation split configured: choose on the training users
        val = train
    candidates = {
        "logistic_regression": LogisticRegression(max_iter=2000).fit(x_scaled[train], y[train])
        .predict_proba(x_scaled)[:, 1],
        "gbdt": HistGradientBoostingClassifier(random_state=seed, early_stopping=False, max_iter=200,
                                               learning_rate=0.05).fit(x_raw[train], y[train])
        .predict_proba(x_raw)[:, 1],
        "mlp": _mlp_early_stopped(x_scaled, y, train, val, hidden, epochs, lr, batch_size, seed),
    }
    name = max(candidates, key=lambda k: auc(y[val], candidates[k][val]))
    return {**all_metrics(y[test], candidates[name][test]), "model": name}
