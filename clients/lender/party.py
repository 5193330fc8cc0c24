"""The lender as a protocol party.

It keeps its applicants' features and default labels. It matches alignment tokens, trains the top model on its
features plus the payment embeddings, and returns per-user gradients with respect to those embeddings for the
training users. It shares only metrics (AUC etc. on validation and test users) with the coordinator.
"""

from __future__ import annotations

import numpy as np
import torch

from fedscore.clients.base import PartyBase, PartySettings, ProtocolError
from fedscore.clients.lender.data import load_applicants, load_lender_table
from fedscore.shared.atomic import write_json_atomic, write_text_atomic
from fedscore.shared.data.party_data import batches
from fedscore.shared.metrics import all_metrics, curves
from fedscore.shared.model.parts import LenderTop, init_module, lender_model, seeded
from fedscore.shared.model.preprocessing import Scaler
from fedscore.shared.protocol.bodies import AlignmentSizes, Curves, LenderOnly, SetupRequest, TableSize, Trained
from fedscore.shared.protocol.messages import Envelope, MessageKind, pack_arrays, unpack_arrays
from fedscore.shared.protocol.splits import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL, assign_splits


class LenderParty(PartyBase):
    name = "lender"

    def __init__(self, settings: PartySettings) -> None:
        super().__init__(settings)
        self.handlers = {
            MessageKind.SETUP: self.on_setup,
            MessageKind.ALIGN_MATCH: self.on_align_match,
            MessageKind.TRAIN: self.on_train,
            MessageKind.BLACKLIST_REQUEST: self.on_blacklist_request,
            MessageKind.BLACKLIST_MATCH: self.on_blacklist_match,
        }

    def on_setup(self, message: Envelope) -> Envelope:
        table, labels = load_lender_table(self.settings.data_path)
        default_rate = float(labels.mean())  # of the real applicants
        canaries = message.header.expect(SetupRequest).config.audit.canaries
        if canaries:  # the audit's canary rows, each with a label drawn uniformly by our CSPRNG
            from fedscore.clients.canaries import canary_labels

            table = self.with_canaries(message, table)
            labels = np.concatenate([labels, canary_labels(canaries)])
        assert table.schema is not None  # load_lender_table refuses a folder without one
        self.state = {
            **self.fresh_state(message, table),
            # clipped to the declared bounds, as the graph will see them (the GBDT baseline reads raw values)
            "raw": torch.tensor(Scaler.from_schema(table.schema).clip(table.values)),
            "y": torch.from_numpy(labels),
            # a typical applicant, in raw units, as declared in the lender's schema (public, not a median of rows):
            # the reference reason codes measure each feature against
            "reference": table.schema.references(),
        }
        # PSI client step 1 rides on the setup reply (one Flower message fewer): our IDs, hashed to the curve and
        # blinded with a key that never leaves this party
        from fedscore.shared.alignment.psi import lender_request

        psi_request, self.state["psi_state"] = lender_request(self.state["ids"])
        return self.reply(message, payload=psi_request, payload_kind="psi_request",
                          body=TableSize(rows=len(table.ids), features=len(table.columns),
                                         default_rate=default_rate))

    # -- blacklist check: the lender learns which applicants are on the payment holder's fraud list ------------------
    def on_blacklist_request(self, message: Envelope) -> Envelope:
        from fedscore.shared.alignment.psi import lender_request

        request, self.state["blacklist_state"] = lender_request(load_applicants(self.settings.data_path).ids)
        return self.reply(message, payload=request, payload_kind="psi_request")

    def on_blacklist_match(self, message: Envelope) -> Envelope:
        """The hits stay here (state_dir/blacklist-hits.csv, for manual review); the reply carries nothing about
        them, not even a count, so neither the coordinator nor the payment holder learns who or how many."""
        from fedscore.shared.alignment.psi import lender_intersection

        if "blacklist_state" not in self.state:
            raise ProtocolError("lender: blacklist.match before blacklist.request")
        ids = load_applicants(self.settings.data_path).ids
        rows = lender_intersection(self.state.pop("blacklist_state"), ids, message.payload)
        write_text_atomic(self.settings.state_dir / "blacklist-hits.csv", "id\n" + "".join(f"{ids[r]}\n" for r in rows))
        return self.reply(message)

    def on_align_match(self, message: Envelope) -> Envelope:
        """PSI client step 2: learn which of our applicants the payment holder has; both sides then order them by
        an HMAC token under the secret the parties share (sorted), which is all the payment holder receives."""
        from fedscore.shared.alignment.psi import lender_intersection, require_intersection
        from fedscore.shared.alignment.tokens import lender_alignment, tokens_payload

        if "psi_state" not in self.state:
            raise ProtocolError("lender: align.match before setup (which carries the PSI request)")
        found = lender_intersection(self.state.pop("psi_state"), self.state["ids"], message.payload)
        common, rows = lender_alignment(self.state["ids"], require_intersection(found), self.settings.secret_bytes)
        mine = self.state["ids"]
        config = self.config
        split = assign_splits(common, config.split.test_fraction, config.split.val_fraction,
                              self.settings.secret_bytes)
        if config.audit.canaries:
            from fedscore.clients.canaries import canary_split

            split = canary_split(split, [mine[int(r)] for r in rows], self.settings.secret_bytes)
        y = self.state["y"][rows]
        for code, label in ((SPLIT_TRAIN, "train"), (SPLIT_TEST, "test")):
            part = y[torch.from_numpy(split == code)]
            if len(part) == 0 or part.min() == part.max():
                raise ProtocolError(f"lender: the {label} split has {len(part)} users and a single class; "
                                    "too few aligned users to train and evaluate")
        self.state["rows"] = torch.from_numpy(rows)
        self.state["split"] = torch.from_numpy(split)
        self.state["y_release"] = self._protect_labels(y, split == SPLIT_TRAIN)
        if config.privacy.dp_sgd:
            from fedscore.shared.privacy.dp_sgd import plan_dp_sgd

            self.state["dpsgd"] = plan_dp_sgd(config.privacy, int((split == SPLIT_TRAIN).sum()),
                                              config.training.rounds).to_dict()
        model = init_module(self._new_model(config.model.sent_dim), seeded(config.seed, "lender", "init"))
        self.state["model"] = model.state_dict()
        self.state["opt"] = None
        lender_only = None
        if config.baselines.enabled:
            baseline = self._lender_only_baseline()
            lender_only = LenderOnly(model=str(baseline["model"]),
                                     metrics={k: float(v) for k, v in baseline.items() if k != "model"})
        sizes = AlignmentSizes(lender_rows=len(mine), intersection=len(common),
                               train=int((split == SPLIT_TRAIN).sum()), val=int((split == SPLIT_VAL).sum()),
                               test=int((split == SPLIT_TEST).sum()), lender_only=lender_only)
        return self.reply(message, payload=tokens_payload(common), payload_kind="alignment_tokens", body=sizes)

    def _protect_labels(self, y: torch.Tensor, train: np.ndarray) -> torch.Tensor:
        """The labels everything that leaves is computed from: randomized response on the training users, drawn
        once and charged once (pure eps); all later use is post-processing. Validation/test labels stay clean and
        are used only for the metrics the lender chooses to share."""
        privacy = self.config.privacy
        if not privacy.labels_protected:
            if "lender.labels@payment" in self.settings.budgets:
                raise ProtocolError("lender refused: the run config leaves the labels unprotected "
                                    "(privacy.label_epsilon unset or privacy disabled), but this lender holds a "
                                    "budget for lender.labels@payment")
            return y.clone()
        from fedscore.shared.privacy import RandomizedResponse, randomized_response

        assert privacy.label_epsilon is not None
        release = RandomizedResponse(epsilon=privacy.label_epsilon, protects="lender.labels", seen_by="outsider")
        ledger = self.ledger
        for against in ("payment", "outsider"):
            ledger.charge([release], f"lender.labels@{against}", note="randomized response on training labels, once")
        released = y.clone()
        mask = torch.from_numpy(train)
        released[mask] = randomized_response(y[mask], privacy.label_epsilon,
                                             self.noise_source("randomized-response")).to(y.dtype)
        return released

    def _new_model(self, embedding_dim: int) -> LenderTop:
        return lender_model(self.state["x"].shape[1], embedding_dim, self.config)

    def _lender_only_baseline(self) -> dict[str, float | str]:
        """What the lender reaches alone on the same users and split, with clean labels (its own data; only the
        test metrics leave): the best of logistic regression, GBDT and an MLP, chosen on validation."""
        from fedscore.shared.model.reference_models import best_reference

        config = self.config
        rows = self.state["rows"].numpy()
        x, y, split = self._aligned()
        split = split.numpy()
        if config.audit.canaries:  # the baseline learns from real users only
            from fedscore.clients.canaries import SPLIT_EXCLUDED, is_canary

            split = np.where(is_canary([self.state["ids"][int(r)] for r in rows]), SPLIT_EXCLUDED, split)
        return best_reference(x.numpy(), self.state["raw"][rows].numpy(), y.numpy(), split,
                              hidden=config.model.lender_hidden, epochs=config.baselines.epochs,
                              lr=config.training.lr, batch_size=config.training.batch_size, seed=config.seed)

    def _aligned(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.state["rows"]
        return self.state["x"][rows], self.state["y"][rows], self.state["split"]

    def on_train(self, message: Envelope) -> Envelope:
        if "rows" not in self.state:
            raise ProtocolError("lender: train before alignment")
        config = self.config
        x, y, split = self._aligned()
        h = torch.from_numpy(np.asarray(unpack_arrays(message.payload)["embeddings"], dtype=np.float32))
        if h.shape != (len(y), config.model.sent_dim):
            raise ProtocolError(f"lender: payment outputs of shape {tuple(h.shape)}, expected "
                                f"({len(y)}, {config.model.sent_dim})")
        self.record_received(message.header.round, self.state["rows"], h)
        model = self._new_model(config.model.sent_dim)
        model.load_state_dict(self.state["model"])
        y_release = self.state["y_release"]  # randomized-response labels on training users when protected
        train = (split == SPLIT_TRAIN).nonzero().squeeze(1)
        round_ = message.header.round
        if "dpsgd" in self.state:
            losses = self._train_dp_sgd(model, x[train], h[train], y_release[train], round_)
        else:
            losses = self._train_plain(model, x[train], h[train], y_release[train], round_)
        self.state["model"] = model.state_dict()
        gradients = self._embedding_gradients(model, x[train], h[train], y_release[train], round_)
        metrics = {"train_loss": float(np.mean(losses)) if losses else float("nan")}
        model.eval()
        with torch.no_grad():
            p = model.probability(x, h).numpy()
        for code, label in ((SPLIT_VAL, "val"), (SPLIT_TEST, "test")):
            mask = (split == code).numpy()
            if mask.sum() and 0 < y[mask].sum() < mask.sum():
                metrics.update({f"{label}_{k}": v for k, v in all_metrics(y[mask].numpy(), p[mask]).items()})
        test = (split == SPLIT_TEST).numpy()
        if round_ < config.training.rounds - 1:
            body = Trained()
        else:  # the last round: the part is final, so it is exported now (no message of its own)
            body = Trained(curves=Curves(**curves(y[test].numpy(), p[test])), exported=self._export(model))
        return self.reply(message, payload=pack_arrays(gradients=gradients), payload_kind="gradients",
                          metrics=metrics, body=body)

    def _train_plain(self, model: LenderTop, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor,
                     round_: int) -> list[float]:
        config = self.config
        optimizer = torch.optim.Adam(model.parameters(), lr=config.training.lr,
                                     weight_decay=config.training.weight_decay)
        if self.state.get("opt"):
            optimizer.load_state_dict(self.state["opt"])
        model.train()
        losses = []
        for epoch in range(config.training.local_epochs):
            generator = torch.Generator().manual_seed(seeded(config.seed, "lender", str(round_), str(epoch)))
            for batch in batches(len(y), config.training.batch_size, generator):
                loss = model.loss(model(x[batch], h[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        self.state["opt"] = optimizer.state_dict()
        return losses

    def _train_dp_sgd(self, model: LenderTop, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor,
                      round_: int) -> list[float]:
        """Opacus DP-SGD (PartyBase.train_dp_sgd): the released lender part is protected for the outsider."""

        def batch_loss(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
            return model.loss(module(x[batch], h[batch]), y[batch], reduction="sum")

        return self.train_dp_sgd(model, batch_loss, len(y), round_)

    def _export(self, model: LenderTop) -> str:
        """Write the lender part (its preprocessing inside the graph) and the declared references reason codes need.
        The payment side's reference is the zero embedding, a public constant, so no training embedding is kept."""
        from fedscore.shared.model.export_onnx import LENDER_FILE, export_lender_part

        out = self.settings.state_dir / "export"
        export_lender_part(model, Scaler(**self.state["scaler"]), out / LENDER_FILE)
        write_json_atomic(out / "lender_part.json", {"scaler": self.state["scaler"],
                                                     "reference": self.state["reference"]})
        return LENDER_FILE

    def _embedding_gradients(self, model: LenderTop, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor,
                             round_: int) -> np.ndarray:
        """d loss_i / d h_i = (p_i - y_i) J_i with J_i = d logit_i / d h_i, per user (per-sample loss, so no 1/B
        scale to match on the other side). y are the released (randomized-response) labels when protected; the
        optional clipped Gaussian on top bounds what one label moves a gradient by (defence in depth)."""
        model.eval()
        h = h.clone().requires_grad_(True)
        logit = model(x, h)
        (jacobian,) = torch.autograd.grad(logit.sum(), h)  # row i is d logit_i / d h_i: rows do not interact
        residual = model.residual(logit.detach(), y)  # d loss_i / d logit_i, moved by <= 1 when y_i changes
        privacy = self.config.privacy
        if privacy.gradient_noise_on:
            from fedscore.shared.privacy import clipped_label_gradients

            # written as p - y with p = y + residual (in [0, 1], since |residual| <= 1 with the sign of p - y)
            grad = clipped_label_gradients((y + residual).clamp(0, 1), y, jacobian, privacy.gradient_clip,
                                           privacy.gradient_noise_multiplier,
                                           self.noise_source("grad-noise", str(round_)), privacy.gradient_noise_shape)
        else:
            grad = residual[:, None] * jacobian
        return grad.numpy().astype(np.float32)
