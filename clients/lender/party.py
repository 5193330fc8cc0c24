"""The lender as a protocol party.

It keeps its applicants' features and default labels. It matches alignment tokens, trains the top model on its
features plus the payment embeddings, and returns per-user gradients with respect to those embeddings for the
training users (in every round but the last: nobody would receive the last round's). It shares only metrics on
validation and test users (AUC etc., the thinned test ROC/KS curves) and counts (table, intersection, split sizes)
with the coordinator.

Everything else computed from its labels stays here: the training loss (over its Poisson batches of training
labels), the lender-only baseline (fitted on clean training labels) and the default rate of its applicants are its
own evaluation, written to its own state folder (`evaluation.json`, EVALUATION_FILE), never in a reply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedscore.clients.base import PartyBase, PartySettings, ProtocolError
from fedscore.clients.lender.data import load_applicants, load_lender_table
from fedscore.clients.state import NoiseLabel
from fedscore.shared.atomic import write_json_atomic, write_text_atomic
from fedscore.shared.data.party_data import batches
from fedscore.shared.metrics import all_metrics, curves
from fedscore.shared.model.parts import LenderTop, init_module, lender_model, seeded
from fedscore.shared.model.preprocessing import Scaler
from fedscore.shared.protocol.bodies import AlignmentSizes, Curves, SetupRequest, TableSize, Trained
from fedscore.shared.protocol.messages import Envelope, MessageKind
from fedscore.shared.protocol.splits import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL, assign_splits
from fedscore.shared.protocol.steps import PayloadKind

if TYPE_CHECKING:
    from pathlib import Path

    from fedscore.shared.model.lender_gbdt import LenderGbdtFit
    from fedscore.shared.privacy import Ledger
    from fedscore.shared.privacy.dp_sgd import DpSgdPlan

EVALUATION_FILE = "evaluation.json"  # in the lender's own state folder (RUN_DIR/parties/lender in a local run)
EVALUATION_NOTE = ("the lender's own evaluation, computed with its clean labels (default rate, lender-only baseline, "
                   "training loss per round): it never leaves the lender and no privacy guarantee covers it")


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
        default_rate = float(labels.mean())  # of the real applicants: the lender's own evaluation, kept here
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

        psi_request, self.state["psi_state"] = lender_request(self.state["ids"], protocol=self.config.alignment.psi)
        self._evaluation(fresh=True, default_rate=default_rate)
        return self.reply(message, payload=psi_request, payload_kind=PayloadKind.PSI_REQUEST,
                          body=TableSize(rows=len(table.ids), features=len(table.columns)))

    # -- blacklist check: the lender learns which applicants are on the payment holder's fraud list ------------------
    def on_blacklist_request(self, message: Envelope) -> Envelope:
        from fedscore.shared.alignment.psi import lender_request

        request, self.state["blacklist_state"] = lender_request(load_applicants(self.settings.data_path).ids)
        return self.reply(message, payload=request, payload_kind=PayloadKind.PSI_REQUEST)

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
        if config.privacy.dp_sgd:
            from fedscore.shared.privacy.dp_sgd import plan_dp_sgd

            self.state["dpsgd"] = plan_dp_sgd(config.privacy, int((split == SPLIT_TRAIN).sum()),
                                              config.training.rounds, "lender").to_dict()
        self.state["y_release"] = self._protect_labels(y, split == SPLIT_TRAIN)
        model = init_module(self._new_model(config.model.sent_dim), seeded(config.seed, "lender", "init"))
        self.state["model"] = model.state_dict()
        self.state["opt"] = None
        if config.baselines.enabled:  # the lender's own evaluation: written here, not sent
            baseline = self._lender_only_baseline()
            self._evaluation(lender_only={k: v if k == "model" else float(v) for k, v in baseline.items()})
        sizes = AlignmentSizes(lender_rows=len(mine), intersection=len(common),
                               train=int((split == SPLIT_TRAIN).sum()), val=int((split == SPLIT_VAL).sum()),
                               test=int((split == SPLIT_TEST).sum()))
        return self.reply(message, payload=tokens_payload(common), payload_kind=PayloadKind.ALIGNMENT_TOKENS,
                          body=sizes)

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
        # against the payment holder the draw is named: everything the lender sends it that is computed from these
        # labels (its DP-SGD steps, each gradient exchange) is charged as downstream of it, and the guarantee is the
        # RR mixture (accounting.py). The outsider's record names none (arbitrary post-processing: the released
        # model's own DP-SGD is charged to joint.records@outsider, not here)
        release = RandomizedResponse(epsilon=privacy.label_epsilon, protects="lender.labels", seen_by="outsider")
        ledger = self.ledger
        ledger.check(self._planned_label_records(), "lender.labels@payment")  # refuse now, not mid-run
        ledger.charge([release.model_copy(update={"draw": self._label_draw})], "lender.labels@payment",
                      note="randomized response on training labels, once; what is computed from it is charged below")
        ledger.charge([release], "lender.labels@outsider", note="randomized response on training labels, once")
        released = y.clone()
        mask = torch.from_numpy(train)
        released[mask] = randomized_response(y[mask], privacy.label_epsilon,
                                             self.noise_source(NoiseLabel.RANDOMIZED_RESPONSE)).to(y.dtype)
        return released

    def _planned_label_records(self) -> list:
        """All this run will charge to lender.labels@payment: one gradient exchange per round but the last."""
        from fedscore.shared.privacy.dp_sgd import DpSgdPlan, gradient_exchanges, planned_label_records

        rounds = self.config.training.rounds
        plan = DpSgdPlan(**self.state["dpsgd"]) if "dpsgd" in self.state else None
        return planned_label_records(self.config.privacy, plan, rounds, gradient_exchanges(rounds), self._label_draw,
                                     top_released=self.config.model.lender_part == "top")

    @property
    def _label_draw(self) -> str:
        """The name of this run's randomized-response draw in the ledger (RandomizedResponse.draw)."""
        return f"randomized-response:{self.run_id or 'unnamed run'}"

    def _new_model(self, embedding_dim: int) -> LenderTop:
        return lender_model(self.state["x"].shape[1], embedding_dim, self.config)

    def _lender_only_baseline(self) -> dict[str, float | str]:
        """What the lender reaches alone on the same users and split, with clean labels (its own evaluation, kept in
        its own folder: nothing of it leaves): the best of logistic regression, GBDT and an MLP, chosen on
        validation."""
        from fedscore.shared.model.reference_models import best_reference

        config = self.config
        rows = self.state["rows"].numpy()
        x, y, split = self._aligned()
        split = self._real_users_split(split)  # the baseline learns from real users only
        return best_reference(x.numpy(), self.state["raw"][rows].numpy(), y.numpy(), split,
                              hidden=config.model.lender_hidden, epochs=config.baselines.epochs,
                              lr=config.training.lr, batch_size=config.training.batch_size, seed=config.seed)

    def _real_users_split(self, split: torch.Tensor) -> np.ndarray:
        """The aligned split with the audit's canaries (labels drawn at random) moved out of every split: what the
        lender's own models (the lender-only baseline, its own scoring part) learn from and are chosen on."""
        out = split.numpy()
        if not self.config.audit.canaries:
            return out
        from fedscore.clients.canaries import SPLIT_EXCLUDED, is_canary

        rows = self.state["rows"].numpy()
        return np.where(is_canary([self.state["ids"][int(r)] for r in rows]), SPLIT_EXCLUDED, out)

    def _evaluation(self, fresh: bool = False, round_: int | None = None, **items: Any) -> None:
        """Add `items` to the lender's own evaluation (EVALUATION_FILE in its state folder), per round when `round_`
        is given (a round redone after a crash replaces its entry). Written whole (atomic), never sent: the
        coordinator's folder gets none of it; the local operator's harness reads it (fedscore/baselines.py)."""
        import json

        path = self.settings.state_dir / EVALUATION_FILE
        current: dict[str, Any] = {"note": EVALUATION_NOTE, "rounds": []}
        if path.exists() and not fresh:
            current = json.loads(path.read_text())
        if round_ is None:
            current.update(items)
        else:
            rounds = [r for r in current.get("rounds", []) if r["round"] != round_]
            current["rounds"] = sorted([*rounds, {"round": round_, **items}], key=lambda r: r["round"])
        write_json_atomic(path, current)

    def _aligned(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.state["rows"]
        return self.state["x"][rows], self.state["y"][rows], self.state["split"]

    def on_train(self, message: Envelope) -> Envelope:
        if "rows" not in self.state:
            raise ProtocolError("lender: train before alignment")
        config = self.config
        x, y, split = self._aligned()
        received, ranges = self.received_rows(message, "embeddings")
        h = torch.from_numpy(np.asarray(received, dtype=np.float32))
        if h.shape != (len(y), config.model.sent_dim):
            raise ProtocolError(f"lender: payment outputs of shape {tuple(h.shape)}, expected "
                                f"({len(y)}, {config.model.sent_dim})")
        self.record_received(message.header.round, self.state["rows"], h, ranges)  # one file per chunk
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
        last = round_ == config.training.rounds - 1
        # gradients only for a round the payment holder will train on: after the last round nobody receives them,
        # so they are not computed (nor charged), and the reply carries no payload for the coordinator to keep
        parts = None if last else self.row_chunks(
            "gradients", self._embedding_gradients(model, x[train], h[train], y_release[train], round_))
        # the training loss is over the lender's secret Poisson batches of training labels: its own evaluation
        self._evaluation(round_=round_, train_loss=float(np.mean(losses)) if losses else None)
        metrics: dict[str, float] = {}  # validation and test users only: what the lender shares
        final = self._fit_final_part(h, y, split) if last and config.model.lender_part == "gbdt" else None
        if final is not None:
            p = final.model.predict_proba(self._final_features(h))[:, 1]
        else:
            model.eval()
            with torch.no_grad():
                p = model.probability(x, h).numpy()
        for code, label in ((SPLIT_VAL, "val"), (SPLIT_TEST, "test")):
            mask = (split == code).numpy()
            if mask.sum() and 0 < y[mask].sum() < mask.sum():
                metrics.update({f"{label}_{k}": v for k, v in all_metrics(y[mask].numpy(), p[mask]).items()})
        test = (split == SPLIT_TEST).numpy()
        if not last:
            body = Trained()
        else:  # the last round: the part is final, so it is exported now (no message of its own)
            exported = self._export_final(final, h.shape[1]) if final is not None else self._export(model)
            body = Trained(curves=Curves(**curves(y[test].numpy(), p[test])), exported=exported)
        return self.reply(message, parts=parts, metrics=metrics, body=body,
                          payload_kind=PayloadKind.GRADIENTS if parts else PayloadKind.NONE)

    def _final_features(self, h: torch.Tensor) -> np.ndarray:
        """[clipped raw lender columns, the payment holder's last release] of every aligned user."""
        from fedscore.shared.model.lender_gbdt import gbdt_features

        return gbdt_features(self.state["raw"][self.state["rows"]].numpy(), h.numpy())

    def _fit_final_part(self, h: torch.Tensor, y: torch.Tensor, split: torch.Tensor) -> LenderGbdtFit:
        """The lender's own scoring part (model.lender_part = "gbdt", shared/model/lender_gbdt.py): fitted on the
        clean labels of the training users and chosen on validation, after the last exchange. Nothing computed from
        it reaches the payment holder (no gradients follow the last round; online, the payment holder only
        answers), so it is charged to nothing there; it is named not DP in the privacy report. Canaries, whose
        labels are random draws for the audit, are left out, as from the lender-only baseline."""
        from fedscore.shared.model.lender_gbdt import fit_lender_gbdt

        split_np = self._real_users_split(split)
        fit = fit_lender_gbdt(self._final_features(h), y.numpy(), split_np == SPLIT_TRAIN, split_np == SPLIT_VAL)
        self._evaluation(final_part={"kind": "gbdt", "setting": list(fit.setting), "val_auc": fit.val_auc})
        return fit

    def _export_final(self, fit: LenderGbdtFit, embedding_dim: int) -> str:
        """Write the lender's own GBDT part with the torch top's inputs and outputs (lender_gbdt.py)."""
        from fedscore.shared.model.export_onnx import LENDER_FILE
        from fedscore.shared.model.lender_gbdt import export_lender_gbdt

        out = self.settings.state_dir / "export"
        export_lender_gbdt(fit, Scaler(**self.state["scaler"]), embedding_dim, out / LENDER_FILE)
        return self._write_sidecar(out)

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

        def charge_labels(plan: DpSgdPlan, ledger: Ledger) -> None:
            """The same steps, seen by the payment holder through every gradient computed from this model."""
            if not self.config.privacy.labels_protected:
                return
            from fedscore.shared.privacy.dp_sgd import label_training_release

            ledger.charge([label_training_release(plan, plan.steps_per_round, self._label_draw)],
                          "lender.labels@payment",
                          note=f"round {round_}: the lender's DP-SGD steps on the randomized-response labels "
                               "(Poisson batches the payment holder never sees)")

        return self.train_dp_sgd(model, batch_loss, len(y), round_, also_charge=charge_labels)

    def _export(self, model: LenderTop) -> str:
        """Write the lender part (its preprocessing inside the graph) and the declared references reason codes need.
        The payment side's reference is the zero embedding, a public constant, so no training embedding is kept."""
        from fedscore.shared.model.export_onnx import LENDER_FILE, export_lender_part

        out = self.settings.state_dir / "export"
        privacy = self.config.privacy
        if privacy.labels_protected and "dpsgd" not in self.state:  # charged before the part is written
            from fedscore.shared.privacy.dp_sgd import released_lender_part

            self.ledger.charge([released_lender_part(privacy, self._label_draw)], "lender.labels@payment",
                               note="the lender's part, trained without DP-SGD on the randomized labels, released "
                                    "with the model (not DP: the labels' bound rests on randomized response alone)")
        export_lender_part(model, Scaler(**self.state["scaler"]), out / LENDER_FILE)
        return self._write_sidecar(out)

    def _write_sidecar(self, out: Path) -> str:
        """Beside either lender part: its scaler and the declared reference reason codes need (fedscore/bundle.py)."""
        from fedscore.shared.model.export_onnx import LENDER_FILE

        write_json_atomic(out / "lender_part.json", {"scaler": self.state["scaler"],
                                                     "reference": self.state["reference"]})
        return LENDER_FILE

    def _embedding_gradients(self, model: LenderTop, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor,
                             round_: int) -> np.ndarray:
        """d loss_i / d h_i = (p_i - y_i) J_i with J_i = d logit_i / d h_i, per user (per-sample loss, so no 1/B
        scale to match on the other side). y are the released (randomized-response) labels when protected; the
        clipped Gaussian on top bounds what one label moves a gradient by, and this exchange is charged to
        lender.labels@payment before it is computed (`_charge_exchange`)."""
        self._charge_exchange(round_)
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
                                           self.noise_source(NoiseLabel.GRADIENT_NOISE, str(round_)),
                                           privacy.gradient_noise_shape)
        else:
            grad = residual[:, None] * jacobian
        return grad.numpy().astype(np.float32)

    def _charge_exchange(self, round_: int) -> None:
        """One gradient exchange to lender.labels@payment, charged when (and only when) gradients are computed to
        be sent (`label_exchange_release`: a Gaussian on the residual, or not DP without DP-SGD or noise)."""
        privacy = self.config.privacy
        if not privacy.labels_protected:
            return
        from fedscore.shared.privacy.dp_sgd import label_exchange_release

        release = label_exchange_release(privacy, "dpsgd" in self.state, self._label_draw)
        self.ledger.charge([release], "lender.labels@payment",
                           note=f"round {round_}: per-user gradients to the payment holder"
                                + ("" if release.noise_multiplier else
                                   " (not DP: the labels' bound rests on randomized response alone)"))
