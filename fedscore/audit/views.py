"""A finished run as the attacks and the auditor need it: each party's view and, for scoring only, the truth."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedscore.clients.canaries import is_canary
from fedscore.clients.state import LenderState, PartyState, PaymentState, load_party_state
from fedscore.clients.transcript import VIEWS, load_view
from fedscore.shared.config import FedConfig
from fedscore.shared.protocol.splits import SPLIT_TEST, SPLIT_TRAIN
from fedscore.shared.run_folder import RunFolder


class AuditError(RuntimeError):
    """The run folder lacks what the audit needs; the message names the file."""


@dataclass
class RunViews:
    run_dir: Path
    config: FedConfig
    privacy: dict[str, Any]
    payment_view: dict[str, np.ndarray]  # round, id, gradient: what the payment holder received
    lender_view: dict[str, np.ndarray]  # round, id, embedding: what the lender received
    payment_state: PaymentState
    lender_state: LenderState
    aligned_ids: np.ndarray  # aligned users in the parties' common order (both order them the same way)
    split: np.ndarray  # 0 train / 1 validation / 2 test, aligned order
    clean: np.ndarray  # the lender's clean labels, aligned order (auditor only)
    released: np.ndarray  # the labels the lender computed gradients from, aligned order (auditor only)
    canary: np.ndarray  # bool, aligned order

    def claim(self, protects: str, against: str) -> dict[str, Any] | None:
        """The report's guarantee for (protects, against), or None when the run makes no such claim."""
        for g in self.privacy.get("guarantees", []):
            if g["protects"] == protects and g["against"] == against:
                return g
        return None

    @property
    def train(self) -> np.ndarray:
        return self.split == SPLIT_TRAIN

    @property
    def test(self) -> np.ndarray:
        return self.split == SPLIT_TEST


def _state(run_dir: Path, party: str) -> PartyState:
    path = RunFolder(run_dir).party_state(party) / "state.pt"
    if not path.exists():
        raise AuditError(f"{path}: missing (the audit needs the run's party state)")
    return load_party_state(path, party)


def load_run(run_dir: Path) -> RunViews:
    folder = RunFolder(run_dir)
    for needed in (folder.config, folder.privacy_report):
        if not needed.exists():
            raise AuditError(f"{needed}: missing (not a finished run folder)")
    config = folder.read_config()
    views = {}
    for party, (name, _) in VIEWS.items():
        path = folder.transcripts / name
        if not path.exists():
            raise AuditError(f"{path}: missing; run with --set audit.record_transcripts=true (fedscore audit --data "
                             "does) to record what each party received")
        views[party] = load_view(path)
    payment, lender = _state(run_dir, "payment"), _state(run_dir, "lender")
    assert isinstance(payment, PaymentState) and isinstance(lender, LenderState)
    rows = lender.rows.numpy()
    ids = np.asarray([str(lender.ids[int(r)]) for r in rows])
    pay_ids = np.asarray([str(payment.ids[int(r)]) for r in payment.rows.numpy()])
    if not np.array_equal(ids, pay_ids):
        raise AuditError(f"{run_dir}: the two parties' aligned orders differ")
    return RunViews(run_dir=run_dir, config=config, privacy=folder.read_json(folder.privacy_report),
                    payment_view=views["payment"], lender_view=views["lender"], payment_state=payment,
                    lender_state=lender, aligned_ids=ids, split=lender.split.numpy(),
                    clean=lender.y[lender.rows].numpy(), released=lender.y_release.numpy(),
                    canary=is_canary(ids))


def released_lender_output(views: RunViews, received: np.ndarray, output: str = "logit") -> np.ndarray:
    """The lender part's default `output` ("logit" or "probability") for every aligned user given what the payment
    holder sent (`received`, aligned order). When the part is the lender's own GBDT (model.lender_part = "gbdt", not
    a torch module) this runs the exported part as scoring does; otherwise the top's torch module (its raw logit,
    and its probability with the randomized-response flip undone, as before)."""
    return lender_part(views, output)(received)


def lender_part(views: RunViews, output: str = "logit") -> Callable[[np.ndarray], np.ndarray]:
    """The lender's part as a function of what the payment holder sent ([aligned users, sent_dim] -> each user's
    `output`), loaded once: the audit calls it for many candidate partial logits (reconstruction.py)."""
    import torch

    state = views.lender_state
    if views.config.model.lender_part == "gbdt":
        from fedscore.shared.model.export_onnx import LENDER_FILE
        from fedscore.shared.model.manifest import EMBEDDING, LENDER_INPUT, LOGIT, PROBABILITY
        from fedscore.shared.scoring.bundle import ort_session

        path = RunFolder(views.run_dir).party_state("lender") / "export" / LENDER_FILE
        if not path.exists():
            raise AuditError(f"{path}: missing (the run exported no lender part)")
        session = ort_session(path)
        raw = state.raw[state.rows].numpy().astype(np.float32)
        name = LOGIT if output == "logit" else PROBABILITY

        def run_onnx(received: np.ndarray) -> np.ndarray:
            (values,) = session.run([name], {LENDER_INPUT: raw, EMBEDDING: np.asarray(received, dtype=np.float32)})
            return values.astype(np.float64)

        return run_onnx
    from fedscore.shared.model.parts import lender_model

    xl = state.x[state.rows]
    top = lender_model(xl.shape[1], views.config.model.sent_dim, views.config)
    top.load_state_dict(state.model)
    top.eval()

    def run_top(received: np.ndarray) -> np.ndarray:
        h = torch.from_numpy(np.asarray(received, dtype=np.float32))
        with torch.no_grad():
            values = top(xl, h) if output == "logit" else top.probability(xl, h)
        return values.numpy().astype(np.float64)

    return run_top
