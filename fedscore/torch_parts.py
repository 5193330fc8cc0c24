"""The trained torch parts of a local run, rebuilt from the parties' state: the reference the ONNX export must match.

Built by the parties' own builders (`payment_model`, `lender_model`), so the rebuilt parts are the parties' models
(the payment part's squash included), not look-alikes.

Scoring never uses this (it runs the ONNX bundle with onnxruntime only); tests and the benchmark do, to check the
exported graphs against the models as trained and to compare speeds on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedscore.clients.state import LenderState, PaymentState
from fedscore.shared.model.parts import LenderTop, PaymentBottom, lender_model, payment_model
from fedscore.shared.model.preprocessing import Scaler
from fedscore.shared.protocol.splits import SPLIT_TEST
from fedscore.shared.run_folder import RunFolder


@dataclass
class TorchParts:
    model_p: PaymentBottom
    scaler_p: Scaler
    model_l: LenderTop
    scaler_l: Scaler
    test_ids: list[str]  # aligned users in the test split (both parties hold them)


def load_torch_parts(run_dir: Path) -> TorchParts:
    """RUN_DIR/parties/{payment,lender}/state.pt ("model" state dicts, "scaler" dicts) + RUN_DIR/config.json."""
    folder = RunFolder(run_dir)
    config = folder.read_config()
    payment = PaymentState.load(folder.party_state("payment") / "state.pt")
    lender = LenderState.load(folder.party_state("lender") / "state.pt")
    scaler_p, scaler_l = Scaler(**payment.scaler), Scaler(**lender.scaler)
    model_p = payment_model(len(scaler_p.output_names), config)
    model_l = lender_model(len(scaler_l.output_names), config.model.sent_dim, config)
    model_p.load_state_dict(payment.model)
    model_l.load_state_dict(lender.model)
    model_p.eval()
    model_l.eval()
    rows = lender.rows.numpy()[lender.split.numpy() == SPLIT_TEST]
    return TorchParts(model_p, scaler_p, model_l, scaler_l, [lender.ids[r] for r in rows])
