"""A party's run state, typed: what `RUN_DIR/parties/<party>/state.pt` (and the entry files beside it,
clients/state_store.py) holds, and the names of the draws it makes.

Why: the state is one dict of about twenty keys that the party writes and nine modules read (the channel, the
audit's attacks, the torch reference of the export). Here each key is a field with a type and a reason, so a
reader states what it needs instead of probing keys. On disk the dict is split by clients/state_store.py (large
entries in files of their own, written only when they change) and read back whole by its `read_state`
(weights_only=True); `to_dict` gives back exactly the dict `from_dict` read, keys in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

S = TypeVar("S", bound="PartyState")


class NoiseLabel(StrEnum):
    """The name of each draw a party makes (`PartyBase.noise_source(label, ...)`, after the party's name). With the
    OS-keyed source a label changes nothing; in the VOID replayable test mode it keys the stream, and the audit's
    replay (fedscore/audit/label_leakage.py) must name the same draw: one constant for both."""

    SCALER = "scaler"  # DP standardisation statistics
    DPSGD = "dpsgd"  # DP-SGD's Poisson sampling and Gaussian noise, per round
    GRADIENT_CANARY_SAMPLING = "gradient-canary-sampling"  # which gradient canaries enter a step, per round
    GRADIENT_CANARIES = "gradient-canaries"  # the canaries' directions, once
    EMBEDDING_NOISE = "noise"  # the payment holder's Gaussian noise on each round's embeddings
    RANDOMIZED_RESPONSE = "randomized-response"  # the lender's label flips, once
    GRADIENT_NOISE = "grad-noise"  # the lender's Gaussian noise on each round's gradients
    STATISTICS_FIT = "statistics-fit"  # the payment part's statistics fit: its Gram matrix's noise, then each fit's


@dataclass(kw_only=True)
class ChannelState:
    """One end of the encrypted channel (clients/channel.py), `state["e2e"]` for the run and
    `state["e2e_blacklist"]` for a blacklist session: the run (or session) id the keys are bound to, the next
    sequence number in each direction, and the next request this party accepts (training runs only)."""

    run: str
    received: int = 0
    sent: int = 0
    next: tuple[str, int] | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ChannelState:
        step = raw.get("next")
        return cls(run=str(raw["run"]), received=int(raw["received"]), sent=int(raw["sent"]),
                   next=(str(step[0]), int(step[1])) if step is not None else None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run": self.run, "received": self.received, "sent": self.sent}
        if self.next is not None:
            out["next"] = [self.next[0], self.next[1]]
        return out


@dataclass(kw_only=True)
class PartyState:
    """What every party keeps for a run (clients/base.py `fresh_state` and the steps after it); None = not yet."""

    config: str  # the run config as JSON (FedConfig), from the setup
    run_id: str
    ids: Any  # the party's own user IDs, in its table's order
    scaler: dict[str, Any]  # the (DP) standardisation, rebuilt inside the ONNX graph at export
    x: Any  # torch.Tensor: the scaled features, table order
    rows: Any = None  # torch.Tensor: the aligned users' rows in this party's table, in the common order
    split: Any = None  # torch.Tensor: 0 train / 1 validation / 2 test per aligned user (keyed, both parties agree)
    dpsgd: dict[str, Any] | None = None  # the DP-SGD plan (DpSgdPlan.to_dict), when DP-SGD is on
    model: dict[str, Any] | None = None  # the part's torch state dict
    opt: dict[str, Any] | None = None  # its optimizer's state dict
    e2e: ChannelState | None = None
    e2e_blacklist: ChannelState | None = None
    last: dict[str, Any] | None = None  # the last request's digest and reply header, for a resumed coordinator
    last_payload: Any = None  # torch.Tensor (uint8): that reply's sealed payload
    gradient_canaries: dict[str, Any] | None = None  # the white-box audit's canaries (GradientCanaries.to_state)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this type does not know (kept, never dropped)
    _order: tuple[str, ...] = field(default=(), repr=False)  # the keys as read, in order, for `to_dict`

    CHANNELS: ClassVar[tuple[str, ...]] = ("e2e", "e2e_blacklist")

    @classmethod
    def from_dict(cls: type[S], raw: dict[str, Any]) -> S:
        known = {f.name for f in fields(cls)} - {"extra", "_order"}
        values = {k: (ChannelState.from_dict(v) if k in cls.CHANNELS and v is not None else v)
                  for k, v in raw.items() if k in known}
        return cls(**values, extra={k: v for k, v in raw.items() if k not in known}, _order=tuple(raw))

    def to_dict(self) -> dict[str, Any]:
        """The dict the party saves: the keys read, in their order, then any set since (None fields are absent)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "_order")}
        values = {k: (v.to_dict() if isinstance(v, ChannelState) else v) for k, v in values.items() if v is not None}
        values.update(self.extra)
        order = [k for k in self._order if k in values] + [k for k in values if k not in self._order]
        return {k: values[k] for k in order}

    @classmethod
    def load(cls: type[S], path: Path) -> S:
        """The state a party saved (state.pt and its entry files, clients/state_store.py), tensors only: no
        pickled code runs."""
        from fedscore.clients.state_store import read_state

        return cls.from_dict(read_state(path))


@dataclass(kw_only=True)
class PaymentState(PartyState):
    """The payment holder's run state (clients/payment/party.py)."""

    featurised: bool = False  # its table was raw transactions, featurised before training
    feature_sigma: float | None = None  # the embeddings' Gaussian noise (std / clip), when features are protected
    released: Any = None  # torch.Tensor: the last clean embeddings, the proximal anchor of the next update
    statistics_fit: dict[str, Any] | None = None  # the statistics fit's plan (StatisticsFitPlan.to_dict), when on
    gram: Any = None  # torch.Tensor: the statistics fit's noisy Gram matrix, released once, reused by later fits
    statistics_canaries: dict[str, Any] | None = None  # the fit's audit canaries (StatisticsCanaries.to_state)


@dataclass(kw_only=True)
class LenderState(PartyState):
    """The lender's run state (clients/lender/party.py)."""

    raw: Any = None  # torch.Tensor: its features clipped to the declared bounds, unscaled
    y: Any = None  # torch.Tensor: its clean labels, table order (never leave the lender)
    reference: list[float] | None = None  # the schema's typical applicant, for reason codes
    psi_state: Any = None  # the PSI client's secret between setup and align.match
    blacklist_state: Any = None  # the same for a blacklist check
    y_release: Any = None  # torch.Tensor: the labels everything sent is computed from (randomized response)


STATE_TYPES: dict[str, type[PartyState]] = {"payment": PaymentState, "lender": LenderState}


def load_party_state(path: Path, party: str) -> PartyState:
    """`path` (a party's state.pt) as its party's type."""
    return STATE_TYPES[party].load(path)
