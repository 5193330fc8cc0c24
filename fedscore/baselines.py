"""The centralized reference: all columns in one place, no privacy. The upper bound a federation aims at.

This is the local operator's evaluation harness, not part of the protocol: it reads both parties' folders, which
only someone holding both (a demo, a backtest) can do. It uses the same aligned users and the same keyed split as
the federation, so the numbers compare on identical test users.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.ensemble import HistGradientBoostingClassifier

from clients.lender.data import load_lender_table
from clients.payment.data import load_payment_table
from shared.config import FedConfig
from shared.metrics import all_metrics
from shared.model_parts import LenderTop, PaymentBottom, configure_torch, init_module, seeded
from shared.party_data import batches
from shared.preprocessing import fit_scaler
from shared.splits import SPLIT_TEST, SPLIT_TRAIN, assign_splits, keyed_tokens


def _scaled(table) -> np.ndarray:
    scaler = fit_scaler(table.columns, table.values)
    return scaler.transform(table.values)


def centralized_baselines(data_dir, config: FedConfig, secret: bytes) -> dict[str, dict[str, float]]:
    configure_torch()
    payment = load_payment_table(data_dir / "payment")
    lender, labels = load_lender_table(data_dir / "lender")
    p_tokens = keyed_tokens(payment.ids, secret)
    l_tokens = keyed_tokens(lender.ids, secret)
    common, l_rows, p_rows = np.intersect1d(l_tokens, p_tokens, return_indices=True)
    split = assign_splits(common, config.split.test_fraction, config.split.val_fraction, secret)
    xp = torch.from_numpy(_scaled(payment)[p_rows])
    xl = torch.from_numpy(_scaled(lender)[l_rows])
    y = torch.from_numpy(labels[l_rows])
    train, test = split == SPLIT_TRAIN, split == SPLIT_TEST

    bottom = init_module(PaymentBottom(xp.shape[1], config.model.payment_hidden, config.model.embedding_dim),
                         seeded(config.seed, "central", "bottom"))
    top = init_module(LenderTop(xl.shape[1], config.model.embedding_dim, config.model.lender_hidden),
                      seeded(config.seed, "central", "top"))
    params = list(bottom.parameters()) + list(top.parameters())
    optimizer = torch.optim.Adam(params, lr=config.training.lr, weight_decay=config.training.weight_decay)
    idx = torch.from_numpy(np.flatnonzero(train))
    for epoch in range(config.baselines.epochs):
        generator = torch.Generator().manual_seed(seeded(config.seed, "central", str(epoch)))
        for batch in batches(len(idx), config.training.batch_size, generator):
            b = idx[batch]
            loss = F.binary_cross_entropy_with_logits(top(xl[b], bottom(xp[b])), y[b])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        p_mlp = torch.sigmoid(top(xl[test], bottom(xp[test]))).numpy()

    both = np.hstack([lender.values[l_rows], payment.values[p_rows]])
    gbdt = HistGradientBoostingClassifier(random_state=config.seed).fit(both[train], labels[l_rows][train])
    p_gbdt = gbdt.predict_proba(both[test])[:, 1]
    y_test = y[test].numpy()
    return {"centralized": all_metrics(y_test, p_mlp), "centralized_gbdt": all_metrics(y_test, p_gbdt)}
