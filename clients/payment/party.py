"""The payment-data holder as a protocol party.

It keeps its transactions and features; what leaves is (a) keyed tokens of its user IDs for alignment and (b) each
round, the embeddings its bottom model computes for the aligned users. It receives per-user gradients for the
training users and learns from them: a linear part sending one partial logit (the default) by one ridge step from
noisy sufficient statistics (`_fit_from_statistics`), any other part by local DP-SGD steps with a proximal pull
toward the embedding it released (so stale gradients do not overshoot).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedscore.clients.base import PartyBase, PartySettings, ProtocolError
from fedscore.clients.payment.data import load_payment_table
from fedscore.clients.state import NoiseLabel
from fedscore.shared.atomic import write_json_atomic
from fedscore.shared.data.party_data import batches
from fedscore.shared.model.parts import PaymentBottom, init_module, payment_model, seeded
from fedscore.shared.model.preprocessing import Scaler
from fedscore.shared.protocol.bodies import Embedded, TableSize
from fedscore.shared.protocol.messages import Envelope, MessageKind
from fedscore.shared.protocol.splits import SPLIT_TRAIN, assign_splits
from fedscore.shared.protocol.steps import PayloadKind

if TYPE_CHECKING:
    from fedscore.shared.privacy import Ledger
    from fedscore.shared.privacy.dp_sgd import DpSgdPlan
    from fedscore.shared.privacy.statistics_fit import StatisticsCanaries


class PaymentParty(PartyBase):
    name = "payment"

    def __init__(self, settings: PartySettings) -> None:
        super().__init__(settings)
        self.handlers = {
            MessageKind.SETUP: self.on_setup,
            MessageKind.ALIGN_RESPOND: self.on_align_respond,
            MessageKind.EMBED: self.on_embed,
            MessageKind.BLACKLIST_RESPOND: self.on_blacklist_respond,
        }

    # -- setup and alignment -------------------------------------------------------------------------------------
    def on_setup(self, message: Envelope) -> Envelope:
        table = self.with_canaries(message, load_payment_table(self.settings.data_path))
        self.state = {
            **self.fresh_state(message, table),
            "featurised": Path(table.source).stem == "transactions",
        }
        # x25519 PSI: our own IDs masked with a fresh key need no request, so they are computed now, while the
        # lender computes its request; the blob (key included) stays in our state until align.respond uses it
        from fedscore.shared.alignment.psi import payment_prepare

        prepared = payment_prepare(self.state["ids"], protocol=self.config.alignment.psi)
        if prepared is not None:
            self.state["psi_prepared"] = prepared
        return self.reply(message, body=TableSize(rows=len(table.ids), features=len(table.columns)))

    def on_align_respond(self, message: Envelope) -> Envelope:
        """PSI server step: answer the lender's blinded request with our own blinded IDs (a fresh key per run), in
        the protocol the run config names (alignment.psi). We learn the size of the lender's set, nothing about
        its IDs."""
        from fedscore.shared.alignment.psi import payment_respond

        payload = payment_respond(message.payload, self.state["ids"], prepared=self.state.pop("psi_prepared", None),
                                  protocol=self.config.alignment.psi)
        return self.reply(message, payload=payload, payload_kind=PayloadKind.PSI_RESPONSE)

    def on_blacklist_respond(self, message: Envelope) -> Envelope:
        """PSI server step against our fraud list (DIR/payment/fraud_list.*): we learn only how many applicants
        were checked, never which of them are on it. The protocol is the request's (a blacklist session has no
        run config)."""
        from fedscore.shared.alignment.psi import payment_respond
        from fedscore.shared.data.party_data import table_from_frame
        from fedscore.shared.data.tables import find_table, read_table

        path = find_table(self.settings.data_path, "fraud_list")
        frame = read_table(path, ["id"])
        frame["listed"] = 1.0  # table_from_frame wants one value column; the IDs are what matters
        fraud = table_from_frame(frame, path)
        return self.reply(message, payload=payment_respond(message.payload, fraud.ids),
                          payload_kind=PayloadKind.PSI_RESPONSE)

    def _accept_alignment(self, payload: bytes) -> int:
        """The lender's sorted intersection tokens (HMAC under the parties' secret) -> our rows in that order. They
        ride on round 0's embed request (one Flower message fewer); returns how many rows were aligned."""
        from fedscore.shared.alignment.tokens import rows_for_tokens, tokens_from_payload

        aligned = tokens_from_payload(payload)
        rows = rows_for_tokens(self.state["ids"], aligned, self.settings.secret_bytes)
        config = self.config
        split = assign_splits(aligned, config.split.test_fraction, config.split.val_fraction,
                              self.settings.secret_bytes)
        if config.audit.canaries:
            from fedscore.clients.canaries import canary_split

            split = canary_split(split, [self.state["ids"][int(r)] for r in rows], self.settings.secret_bytes)
        self.state["rows"] = torch.from_numpy(rows)
        self.state["split"] = torch.from_numpy(split)
        self._plan_privacy(int((split == SPLIT_TRAIN).sum()))
        model = init_module(self._new_model(), seeded(config.seed, "payment", "init"),
                            zero_head=config.model.payment_head_init == "zero")
        self.state["model"] = model.state_dict()
        self.state["opt"] = None
        return len(rows)

    def _plan_privacy(self, n_train: int) -> None:
        """Noise for the embeddings the lender receives (calibrated over all planned rounds) and DP-SGD for the
        released part; refuse up front if features would go out unprotected against this party's own budget."""
        config = self.config
        privacy = config.privacy
        if privacy.statistics_fit:
            from fedscore.shared.privacy.statistics_fit import StatisticsFitPlan

            self.state["statistics_fit"] = StatisticsFitPlan.from_privacy(privacy).to_dict()
        elif privacy.dp_sgd:
            from fedscore.shared.privacy.dp_sgd import plan_dp_sgd

            self.state["dpsgd"] = plan_dp_sgd(privacy, n_train, config.training.rounds, "payment").to_dict()
        if privacy.features_protected:
            from fedscore.clients.payment.feature_privacy import plan_feature_noise

            self.state["feature_sigma"] = plan_feature_noise(config, self.state.get("dpsgd"))
        elif "payment.features@lender" in self.settings.budgets:
            raise ProtocolError("payment refused: the run config sends embeddings without noise "
                                "(privacy.feature_epsilon unset or privacy disabled), but this payment holder "
                                "holds a budget for payment.features@lender")

    # -- rounds --------------------------------------------------------------------------------------------------
    def _new_model(self) -> PaymentBottom:
        return payment_model(self.state["x"].shape[1], self.config)

    def _optimizer(self, model: PaymentBottom) -> torch.optim.Optimizer:
        training = self.config.training
        optimizer = torch.optim.Adam(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
        if self.state.get("opt"):
            optimizer.load_state_dict(self.state["opt"])
        return optimizer

    def on_embed(self, message: Envelope) -> Envelope:
        """Round r: apply the lender's gradients of round r-1 (none in round 0, whose request carries the alignment
        tokens instead), embed every aligned user, and in the last round export the part, which is final then."""
        round_ = message.header.round
        aligned = None
        if message.header.payload_kind == PayloadKind.ALIGNMENT_TOKENS:
            if round_ != 0:
                raise ProtocolError(f"payment: alignment tokens in round {round_}; they belong to round 0")
            aligned = self._accept_alignment(message.payload)
        elif "rows" not in self.state:
            raise ProtocolError("payment: embed before alignment")
        model = self._new_model()
        model.load_state_dict(self.state["model"])
        x = self.state["x"][self.state["rows"]]
        if message.header.payload_kind == PayloadKind.GRADIENTS:
            received, ranges = self.received_rows(message, "gradients")
            train = (self.state["split"] == SPLIT_TRAIN).nonzero().squeeze(1)
            if len(received) == len(train):  # else _local_update refuses it with the shapes
                # the lender's last round, one transcript file per chunk
                self.record_received(round_ - 1, self.state["rows"][train], received, ranges)
            self._local_update(model, x, received, round_)
        model.eval()
        with torch.no_grad():
            clean = model(x)
        self.state["released"] = clean  # the proximal anchor: what the lender's gradients were computed near
        self.state["model"] = model.state_dict()
        released = self._protect(clean, round_)
        exported = self._export(model) if round_ == self.config.training.rounds - 1 else None
        return self.reply(message, parts=self.row_chunks("embeddings", released.numpy()),
                          payload_kind=PayloadKind.EMBEDDINGS,
                          body=Embedded(users=int(x.shape[0]), aligned=aligned, exported=exported))

    def _protect(self, embeddings: torch.Tensor, round_: int) -> torch.Tensor:
        """Clip each user's embedding and add Gaussian noise, charged to the ledger before it leaves."""
        if "feature_sigma" not in self.state:
            return embeddings
        from fedscore.clients.payment.feature_privacy import feature_noise_schedule
        from fedscore.shared.privacy import embedding_release, gaussian_release

        privacy = self.config.privacy
        sigma = feature_noise_schedule(self.config, self.state["feature_sigma"])[round_]
        if sigma is None:  # round 0 of a zero-initialised head: the constant 0, whoever the users are
            if not bool((embeddings == 0).all()):
                raise ProtocolError(f"payment: round {round_} was planned as the constant release 0, but the "
                                    "part's output is not 0; nothing sent")
            return embeddings
        record = embedding_release(sigma, privacy.embedding_clip, 1, privacy.feature_neighbouring)
        self.ledger.charge([record], "payment.features@lender", note=f"round {round_}: embeddings to the lender")
        return gaussian_release(embeddings, privacy.embedding_clip, sigma,
                                self.noise_source(NoiseLabel.EMBEDDING_NOISE, str(round_)))

    def _export(self, model: PaymentBottom) -> str:
        """Write this party's part (its preprocessing inside the graph) and, when it featurised transactions, the
        feature definition scoring must apply, to its own state directory; record what this version may serve."""
        from fedscore.clients.payment.features import FEATURE_DEFINITION
        from fedscore.shared.model.export_onnx import PAYMENT_FILE, export_payment_part

        out = self.settings.state_dir / "export"
        export_payment_part(model, Scaler(**self.state["scaler"]), out / PAYMENT_FILE)
        sidecar = {"scaler": self.state["scaler"],
                   "feature_definition": FEATURE_DEFINITION if self.state["featurised"] else None}
        write_json_atomic(out / "payment_part.json", sidecar)
        self._record_served(out / PAYMENT_FILE)
        return PAYMENT_FILE

    def _record_served(self, part: Path) -> None:
        """In this party's home, for this model version (the part's sha256): the intersection it may answer online
        and the noise its answers need. Stays with the payment holder; nothing of it ships in model/."""
        from fedscore.clients.payment.served import ServedMeta, write_served
        from fedscore.shared.model.manifest import sha256_file

        privacy = self.config.privacy
        from fedscore.clients.canaries import is_canary

        ids = [self.state["ids"][int(r)] for r in self.state["rows"]]
        write_served(self.settings.home, sha256_file(part), [i for i, c in zip(ids, is_canary(ids), strict=True)
                                                              if not c],
                     ServedMeta(feature_sigma=self.state.get("feature_sigma"), embedding_clip=privacy.embedding_clip,
                                feature_neighbouring=privacy.feature_neighbouring, delta=privacy.delta,
                                replayable_noise=privacy.enabled and privacy.replayable_noise, run=self.run_id))

    def _exposure_charge(self, round_: int) -> Callable[[DpSgdPlan, Ledger], None] | None:
        """With feature protection on, the lender sees this part through every later embedding, so its DP-SGD
        steps also count against payment.features@lender."""
        if "feature_sigma" not in self.state:
            return None

        def charge(plan: DpSgdPlan, ledger: Ledger) -> None:
            from fedscore.clients.payment.feature_privacy import model_exposure

            ledger.charge([model_exposure(plan, self.config.privacy)], "payment.features@lender",
                          note=f"round {round_}: the payment part's DP-SGD steps, seen through its embeddings")

        return charge

    def _local_update(self, model: PaymentBottom, x: torch.Tensor, gradients: np.ndarray, round_: int) -> None:
        """Descend <g_i, h_i> + |h_i - H_i|^2 / (2 eta) for the training users: the lender's gradient, held near
        the embedding it was computed at."""
        config = self.config
        train = (self.state["split"] == SPLIT_TRAIN).nonzero().squeeze(1)
        g = torch.from_numpy(np.asarray(gradients, dtype=np.float32))
        if g.shape != (len(train), config.model.sent_dim):
            raise ProtocolError(f"payment: gradients of shape {tuple(g.shape)}, expected "
                                f"({len(train)}, {config.model.sent_dim})")
        if "statistics_fit" in self.state:
            self._fit_from_statistics(model, x[train], g[:, 0], round_)
            return
        g = g * config.privacy.feature_gradient_scale  # a public constant, never a statistic over users
        x_train, anchor = x[train], self.state["released"][train]
        eta = config.training.proximal_eta

        def batch_loss(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
            """Summed over the batch: sum_i <g_i, h_i> + |h_i - H_i|^2 / (2 eta)."""
            h = module(x_train[batch])
            return (g[batch] * h).sum() + ((h - anchor[batch]) ** 2).sum() / (2 * eta)

        model.train()
        if "dpsgd" in self.state:
            self.train_dp_sgd(model, batch_loss, len(train), round_, also_charge=self._exposure_charge(round_))
            return
        optimizer = self._optimizer(model)
        for epoch in range(config.training.local_epochs):
            generator = torch.Generator().manual_seed(seeded(config.seed, "payment", str(round_), str(epoch)))
            for batch in batches(len(train), config.training.batch_size, generator):
                loss = batch_loss(model, torch.as_tensor(batch)) / len(batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.state["opt"] = optimizer.state_dict()

    def _fit_from_statistics(self, model: PaymentBottom, x_train: torch.Tensor, gradients: torch.Tensor,
                             round_: int) -> None:
        """One ridge step of the partial logit on the received gradients, from noisy sufficient statistics
        (shared/privacy/statistics_fit.py): the Gram matrix (its noise drawn and charged at the first fit, reused
        after) and this round's moments, both charged before they are computed. The step, scaled by the public
        `feature_gradient_scale`, is added to the part's map."""
        from fedscore.shared.model.parts import add_linear_map
        from fedscore.shared.privacy.statistics_fit import (
            StatisticsFitPlan,
            design_rows,
            gram_release,
            moment_release,
            noisy_gram,
            noisy_moment,
            ridge_solve,
        )

        plan = StatisticsFitPlan(**self.state["statistics_fit"])
        first = self.state.get("gram") is None  # the Gram matrix is released at the first fit only

        def releases(*against: str) -> list:
            return [*([gram_release(plan, *against)] if first else []), moment_release(plan, 1, *against)]

        what = ("Gram matrix and moments" if first else "moments") + " of its statistics fit"
        ledger = self.ledger
        ledger.charge(releases(), "joint.records@outsider", note=f"round {round_}: the payment part's {what}")
        if "feature_sigma" in self.state:
            ledger.charge(releases("payment.features", "outsider", self.config.privacy.feature_neighbouring),
                          "payment.features@lender",
                          note=f"round {round_}: the payment part's {what}, seen through its partial logits")
        rows = design_rows(x_train, plan)
        canaries = self._statistics_canaries(rows.shape[1])
        if first:
            self.state["gram"] = noisy_gram(rows, plan, self.noise_source(NoiseLabel.STATISTICS_FIT, "gram"),
                                            canaries)
        moment = noisy_moment(rows, -gradients, plan, self.noise_source(NoiseLabel.STATISTICS_FIT, str(round_)),
                              canaries)
        if canaries is not None:
            self.state["statistics_canaries"] = canaries.to_state()
        coefficients = ridge_solve(self.state["gram"], moment, plan) * self.config.privacy.feature_gradient_scale
        add_linear_map(model, coefficients[:-1], float(coefficients[-1]))

    def _statistics_canaries(self, width: int) -> StatisticsCanaries | None:
        """The audit run's Dirac canaries on the statistics fit (drawn at the first fit), or None."""
        m = self.config.audit.gradient_canaries
        if not m:
            return None
        from fedscore.shared.privacy.statistics_fit import StatisticsCanaries

        if self.state.get("statistics_canaries"):
            return StatisticsCanaries.from_state(self.state["statistics_canaries"])
        return StatisticsCanaries.draw(m, width, self.noise_source(NoiseLabel.GRADIENT_CANARIES))
