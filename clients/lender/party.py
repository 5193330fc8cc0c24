"""The lender as a protocol party.

It keeps its applicants' features and default labels. It matches alignment tokens, trains the top model on its
features plus the payment embeddings, and returns per-user gradients with respect to those embeddings for the
training users. It shares only metrics (AUC etc. on validation and test users) with the coordinator.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clients.base import PartyBase, PartySettings, ProtocolError
from clients.lender.data import load_lender_table
from shared.atomic import write_json_atomic
from shared.messages import Envelope, pack_arrays, unpack_arrays
from shared.metrics import all_metrics
from shared.model_parts import LenderTop, init_module, seeded
from shared.party_data import batches
from shared.preprocessing import Scaler, fit_scaler
from shared.splits import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL, assign_splits, keyed_tokens


class LenderParty(PartyBase):
    name = "lender"

    def __init__(self, settings: PartySettings) -> None:
        super().__init__(settings)
        self.handlers = {"setup": self.on_setup, "align.match": self.on_align_match, "train": self.on_train,
                         "export": self.on_export}

    def on_setup(self, message: Envelope) -> Envelope:
        table, labels = load_lender_table(self.settings.data_path)
        scaler = fit_scaler(table.columns, table.values)
        self.state = {
            "config": str(message.header.info["config"]),
            "ids": table.ids,
            "scaler": scaler.to_dict(),
            "x": torch.from_numpy(scaler.transform(table.values)),
            "y": torch.from_numpy(labels),
            # a typical applicant, in raw units: the reference reason codes measure each feature against
            "reference": np.median(table.values, axis=0).tolist(),
        }
        return self.reply(message, info={"rows": len(table.ids), "features": len(table.columns),
                                         "default_rate": float(labels.mean())})

    def on_align_match(self, message: Envelope) -> Envelope:
        theirs = unpack_arrays(message.payload)["tokens"]
        mine = keyed_tokens(self.state["ids"], self.settings.secret_bytes)
        common = np.intersect1d(mine, theirs)  # sorted: both sides get the same order
        if len(common) == 0:
            raise ProtocolError("lender: no applicant is also a payment user (empty intersection)")
        position = {t: i for i, t in enumerate(mine.tolist())}
        rows = np.array([position[t] for t in common.tolist()], dtype=np.int64)
        config = self.config
        split = assign_splits(common, config.split.test_fraction, config.split.val_fraction,
                              self.settings.secret_bytes)
        y = self.state["y"][rows]
        for code, label in ((SPLIT_TRAIN, "train"), (SPLIT_TEST, "test")):
            part = y[torch.from_numpy(split == code)]
            if len(part) == 0 or part.min() == part.max():
                raise ProtocolError(f"lender: the {label} split has {len(part)} users and a single class; "
                                    "too few aligned users to train and evaluate")
        self.state["rows"] = torch.from_numpy(rows)
        self.state["split"] = torch.from_numpy(split)
        model = init_module(self._new_model(config.model.embedding_dim), seeded(config.seed, "lender", "init"))
        self.state["model"] = model.state_dict()
        self.state["opt"] = None
        metrics = {"lender_rows": float(len(mine)), "intersection": float(len(common))}
        if config.baselines.enabled:
            metrics.update({f"lender_only_{k}": v for k, v in self._lender_only_baseline().items()})
        return self.reply(message, payload=pack_arrays(tokens=common), payload_kind="alignment_tokens",
                          metrics=metrics, info={"train": int((split == SPLIT_TRAIN).sum()),
                                                 "val": int((split == SPLIT_VAL).sum()),
                                                 "test": int((split == SPLIT_TEST).sum())})

    def _new_model(self, embedding_dim: int) -> LenderTop:
        return LenderTop(self.state["x"].shape[1], embedding_dim, self.config.model.lender_hidden)

    def _lender_only_baseline(self) -> dict[str, float]:
        """What the lender reaches alone: the same top model, no embedding, same users and split."""
        config = self.config
        model = init_module(self._new_model(0), seeded(config.seed, "lender", "baseline"))
        x, y, split = self._aligned()
        train = split == SPLIT_TRAIN
        optimizer = torch.optim.Adam(model.parameters(), lr=config.training.lr,
                                     weight_decay=config.training.weight_decay)
        for epoch in range(config.baselines.epochs):
            generator = torch.Generator().manual_seed(seeded(config.seed, "lender", "baseline", str(epoch)))
            xs, ys = x[train], y[train]
            for batch in batches(len(ys), config.training.batch_size, generator):
                loss = F.binary_cross_entropy_with_logits(model(xs[batch]), ys[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            p = torch.sigmoid(model(x[split == SPLIT_TEST])).numpy()
        return all_metrics(y[split == SPLIT_TEST].numpy(), p)

    def _aligned(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.state["rows"]
        return self.state["x"][rows], self.state["y"][rows], self.state["split"]

    def on_train(self, message: Envelope) -> Envelope:
        if "rows" not in self.state:
            raise ProtocolError("lender: train before alignment")
        config = self.config
        x, y, split = self._aligned()
        h = torch.from_numpy(np.asarray(unpack_arrays(message.payload)["embeddings"], dtype=np.float32))
        if h.shape != (len(y), config.model.embedding_dim):
            raise ProtocolError(f"lender: embeddings of shape {tuple(h.shape)}, expected "
                                f"({len(y)}, {config.model.embedding_dim})")
        model = self._new_model(config.model.embedding_dim)
        model.load_state_dict(self.state["model"])
        optimizer = torch.optim.Adam(model.parameters(), lr=config.training.lr,
                                     weight_decay=config.training.weight_decay)
        if self.state.get("opt"):
            optimizer.load_state_dict(self.state["opt"])
        train = (split == SPLIT_TRAIN).nonzero().squeeze(1)
        model.train()
        losses = []
        for epoch in range(config.training.local_epochs):
            generator = torch.Generator().manual_seed(seeded(config.seed, "lender", str(message.header.round),
                                                             str(epoch)))
            for batch in batches(len(train), config.training.batch_size, generator):
                idx = train[batch]
                loss = F.binary_cross_entropy_with_logits(model(x[idx], h[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        self.state["model"] = model.state_dict()
        self.state["opt"] = optimizer.state_dict()
        self.state["embedding_mean"] = h[train].mean(0)
        gradients = self._embedding_gradients(model, x[train], h[train], y[train])
        metrics = {"train_loss": float(np.mean(losses))}
        model.eval()
        with torch.no_grad():
            p = torch.sigmoid(model(x, h)).numpy()
        for code, label in ((SPLIT_VAL, "val"), (SPLIT_TEST, "test")):
            mask = (split == code).numpy()
            if mask.sum() and 0 < y[mask].sum() < mask.sum():
                metrics.update({f"{label}_{k}": v for k, v in all_metrics(y[mask].numpy(), p[mask]).items()})
        self.state["test_probability"] = torch.from_numpy(p[(split == SPLIT_TEST).numpy()])
        return self.reply(message, payload=pack_arrays(gradients=gradients), payload_kind="gradients",
                          metrics=metrics)

    def on_export(self, message: Envelope) -> Envelope:
        """Write the lender part (its preprocessing inside the graph) and the references reason codes need."""
        from shared.export_onnx import LENDER_FILE, export_lender_part

        model = self._new_model(self.config.model.embedding_dim)
        model.load_state_dict(self.state["model"])
        out = self.settings.state_dir / "export"
        export_lender_part(model, Scaler(**self.state["scaler"]), out / LENDER_FILE)
        write_json_atomic(out / "lender_part.json", {
            "scaler": self.state["scaler"], "reference": self.state["reference"],
            "embedding_baseline": self.state["embedding_mean"].tolist()})
        return self.reply(message, info={"file": LENDER_FILE})

    @staticmethod
    def _embedding_gradients(model: LenderTop, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """d loss_i / d h_i for each training user (per-sample loss, so no 1/B scale to match on the other side)."""
        model.eval()
        h = h.clone().requires_grad_(True)
        loss = F.binary_cross_entropy_with_logits(model(x, h), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, h)
        return grad.numpy().astype(np.float32)
