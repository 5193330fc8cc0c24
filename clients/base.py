"""What every party shares: node-private settings, message dispatch, and state kept in its own state directory.

A party is a plain object: `handle(envelope) -> envelope`. Under Flower every message starts a fresh process, so a
party keeps everything it needs between messages in its state directory (written atomically) and reloads it; the
in-process transport runs the very same code, which is why both paths give the same model for the same seed.

Resume after a crash: the state (model, optimizer, DP-SGD plan, alignment, split, channel counters) is saved after
every step, before the reply is returned, so it is this party's checkpoint: a party rebuilt from its state directory
continues where its last reply left. It also keeps that last request's digest and the sealed reply it answered with:
a resumed coordinator that lost the reply re-sends the request marked `resend`, and gets the very same bytes back
(nothing runs, is drawn or is charged again). A step whose reply never left is run again; its ledger charges carry
a step key, so the charges its first attempt made cover it (shared/privacy/ledger.py).
"""

from __future__ import annotations

import hashlib
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedscore.clients.state import NoiseLabel
from fedscore.clients.state_store import StateStore
from fedscore.shared.atomic import write_json_atomic
from fedscore.shared.config import FedConfig
from fedscore.shared.data.party_data import PartyTable
from fedscore.shared.data.tables import DataError
from fedscore.shared.model.parts import configure_torch
from fedscore.shared.model.preprocessing import Scaler
from fedscore.shared.party_home import PartyHome
from fedscore.shared.protocol.bodies import Body, LedgerReport, SetupRequest
from fedscore.shared.protocol.messages import Envelope, Header, MessageKind, UnexpectedBody

if TYPE_CHECKING:
    from fedscore.shared.privacy import Ledger
    from fedscore.shared.privacy.dp_sgd import BatchLoss, DpSgdPlan
    from fedscore.shared.privacy.secure_random import NoiseSource

Handler = Callable[[Envelope], Envelope]


class PartySettings(BaseModel):
    """What only this party knows: where its data lives, where it keeps state, the secret it shares with its peer."""

    model_config = ConfigDict(extra="forbid")

    party: Literal["payment", "lender"]
    data_path: Path = Field(description="the party's own folder (DIR/payment or DIR/lender)")
    state_dir: Path = Field(description="this run's state (RUN_DIR/parties/<party>)")
    home: Path = Field(description="the party's home: its lifetime ledger and what its services need "
                       "(shared/party_home.py); outlives every run")
    secret: str = Field(min_length=16, description="hex secret shared by the two parties, never the coordinator")
    peer_public_key: str = Field("", description="the other party's X25519 public key (hex or base64), pinned after "
                                 "comparing its fingerprint out of band; every payload to and from the peer is "
                                 "sealed with it (shared/protocol/e2e.py)")
    budgets: dict[str, float] = Field(
        default_factory=dict, description="guarantee key -> max epsilon this party will ever spend, e.g. "
        "{'lender.labels@payment': 2.0}; set by the party itself, whatever the server asks")

    @property
    def secret_bytes(self) -> bytes:
        return bytes.fromhex(self.secret)


class ProtocolError(RuntimeError):
    """A request this party will not serve (wrong order, inconsistent payload); the reply carries the reason."""


class PartyBase:
    name: str = ""

    def __init__(self, settings: PartySettings) -> None:
        if settings.party != self.name:
            raise ValueError(f"settings are for party {settings.party!r}, not {self.name!r}")
        self.settings = settings
        configure_torch()
        self.state: dict[str, Any] = {}
        self._loaded = False
        self.state_loads = 0
        self._config: tuple[str, FedConfig] | None = None  # (the state's config JSON, parsed): see `config`
        self.handlers: dict[MessageKind, Handler] = {}
        self._step, self._charges = "", 0  # the step being served and how many charges it made (ledger step keys)
        self._store: StateStore | None = None
        from fedscore.clients.channel import PartyChannel

        self.e2e = PartyChannel(self)

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.settings.state_dir / "state.pt"

    @property
    def state_store(self) -> StateStore:
        """Saves only what changed since the last save (clients/state_store.py)."""
        if self._store is None or self._store.path != self.state_file:
            self._store = StateStore(self.state_file)
        return self._store

    def load_state(self) -> None:
        """Once per party object: a long-lived worker loads nothing per message (`state_loads` counts, for tests)."""
        if not self._loaded and self.state_file.exists():
            self.state = self.state_store.load()
            self.state_loads += 1
        self._loaded = True

    def save_state(self) -> None:
        """The checkpoint, before any reply leaves: only the entries that changed since the last save are written
        (the features, IDs and labels once, the model and channel counters each step)."""
        self.state_store.save(self.state)

    @property
    def config(self) -> FedConfig:
        """The run config from this party's state, parsed once per handled message: `handle` forgets the parsed
        copy before and after each message, and a new config in the state (setup) is parsed afresh."""
        if "config" not in self.state:
            raise ProtocolError(f"{self.name}: no setup received yet")
        raw = self.state["config"]
        if self._config is None or self._config[0] is not raw:
            self._config = (raw, FedConfig.model_validate_json(raw))
        return self._config[1]

    def fresh_state(self, message: Envelope, table: PartyTable) -> dict[str, Any]:
        """The state every party starts a run with: the run config, its IDs, and its features scaled by the scaler
        its public schema defines, refined under DP by noisy per-column means and stds charged to this party's
        ledger (kept as data, so the export can rebuild it inside the ONNX graph). Nothing else is fitted on the
        rows: the scaler ships in the model. The data report (imputed and clipped counts) goes to this party's own
        state directory, nowhere else."""
        if table.schema is None:
            raise DataError(f"{table.source}: no schema: training needs the party's declared public bounds")
        setup = message.header.expect(SetupRequest)
        self.state = {"config": setup.config.model_dump_json(), "run_id": setup.run_id}
        scaler = self._standardisation(Scaler.from_schema(table.schema), table)
        write_json_atomic(self.settings.state_dir / "data-report.json", {"source": table.source, **table.report})
        return {**self.state, "ids": table.ids, "scaler": scaler.to_dict(),
                "x": torch.from_numpy(scaler.transform(table.values))}

    def _standardisation(self, scaler: Scaler, table: PartyTable) -> Scaler:
        """DP means/stds over this party's rows (preprocessing.dp_standardised), charged before anything leaves:
        to the outsider guarantee (the scaler ships in the model) and, for the payment holder with feature
        protection on, to its guarantee against the lender (who receives the model and sees the scaling through
        every embedding)."""
        privacy = self.config.privacy
        if not privacy.dp_scaler:
            return scaler
        from fedscore.shared.model.preprocessing import dp_standardised
        from fedscore.shared.privacy import scaler_statistics_release

        sigma = float(privacy.scaler_noise_multiplier)  # type: ignore[arg-type]  # dp_scaler says it is set
        # computed here, charged below, released only with later replies and the export (still write-ahead)
        standardised, clip = dp_standardised(scaler, table.values, sigma, self.noise_source(NoiseLabel.SCALER))
        ledger = self.ledger
        ledger.charge([scaler_statistics_release(sigma, clip)], "joint.records@outsider",
                      note="DP standardisation statistics of this party's features (ship in its model part)")
        if self.name == "payment" and privacy.features_protected:
            ledger.charge([scaler_statistics_release(sigma, clip, "payment.features", "outsider",
                                                     privacy.feature_neighbouring)], "payment.features@lender",
                          note="DP standardisation statistics, seen by the lender in the model and embeddings")
        return standardised

    def with_canaries(self, message: Envelope, table: PartyTable) -> PartyTable:
        """The party's table plus the audit's canary rows, when the run config asks for them (clients/canaries.py)."""
        from fedscore.clients.canaries import with_canaries

        config = message.header.expect(SetupRequest).config
        return with_canaries(table, config.audit.canaries, config.seed, self.name)

    def row_chunks(self, name: str, values: np.ndarray) -> list[bytes]:
        """`values` (one row per user) as the plaintext chunks of a reply (shared/protocol/chunks.py), each small
        enough that, sealed, it stays within `exchange.chunk_bytes`; the channel seals them one by one."""
        from fedscore.shared.protocol.chunks import CHUNK_OVERHEAD, pack_row_chunks

        return pack_row_chunks(name, values, self.config.exchange.chunk_bytes, CHUNK_OVERHEAD + len(self.run_id))

    @staticmethod
    def received_rows(message: Envelope, name: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The rows a request's opened chunks carry, concatenated, and each chunk's [start, stop) among them."""
        from fedscore.shared.protocol.chunks import ChunkError, iter_row_chunks

        parts = message.parts if message.parts is not None else [message.payload]
        try:
            chunks = list(iter_row_chunks(name, parts))
        except ChunkError as exc:
            raise ProtocolError(f"{message.header.recipient}: {exc}") from None
        ranges = [(start, start + len(rows)) for start, rows in chunks]
        values = np.concatenate([rows for _, rows in chunks]) if len(chunks) > 1 else chunks[0][1]
        return values, ranges

    def record_received(self, round_: int, rows: torch.Tensor, values: np.ndarray | torch.Tensor,
                        ranges: list[tuple[int, int]] | None = None) -> None:
        """With `audit.record_transcripts`: what this party received in exchange `round_`, as received, for its
        users at `rows` of its table (IDs as in its own data files), in its own state directory, one file per
        chunk it arrived in (`ranges`: each chunk's [start, stop); None: one)."""
        if not self.config.audit.record_transcripts:
            return
        from fedscore.clients.transcript import record

        values = np.asarray(values, dtype=np.float32)
        for chunk, (start, stop) in enumerate(ranges or [(0, len(values))]):
            ids = [str(self.state["ids"][int(r)]) for r in rows[start:stop]]
            record(self.settings.state_dir, self.name, round_, ids, values[start:stop], chunk)

    def noise_source(self, *labels: str) -> NoiseSource:
        """Where every draw a guarantee rests on comes from: keyed from the OS, never from the seed (except in the
        VOID replayable test mode, where `labels` name the draw so both transports replay the same one)."""
        from fedscore.shared.privacy.secure_random import noise_source

        return noise_source(self.config.privacy.replayable_noise, self.config.seed, self.name, *labels)

    @property
    def run_id(self) -> str:
        return str(self.state.get("run_id", ""))

    @property
    def ledger(self) -> Ledger:
        """This party's lifetime privacy ledger, in its own home, with the budgets from its own settings."""
        from fedscore.shared.privacy import Ledger

        return Ledger(PartyHome(self.settings.home).ledger, self.settings.budgets, self.config.privacy.delta,
                      party=self.name, run=self.run_id, step=self._next_charge)

    def _next_charge(self) -> str:
        """The step key of the next charge: the step served and the charge's place in it (`kind:round#n`)."""
        key = f"{self._step}#{self._charges}"
        self._charges += 1
        return key

    def _ledger_report(self) -> LedgerReport | None:
        """What this party has released over its lifetime (mechanism records, no data), shared so the report can
        list it; each entry names the run that made it. None until this party has charged anything."""
        from fedscore.shared.privacy.ledger import ledger_exists, ledger_report

        path = PartyHome(self.settings.home).ledger
        if not ledger_exists(path):
            return None

        return ledger_report(path, self.settings.budgets, self.name)

    def train_dp_sgd(self, model: nn.Module, batch_loss: BatchLoss, n: int, round_: int,
                     also_charge: Callable[[DpSgdPlan, Ledger], None] | None = None) -> list[float]:
        """One round of DP-SGD on this party's part (Opacus), charged before it runs: the part is released, so its
        steps count against the outsider guarantee; `also_charge` records what else the same steps cost. Both
        parties train their part this way, with the plan they stored at alignment."""
        from fedscore.shared.privacy.dp_sgd import DpSgdPlan, dp_sgd_round, part_release

        plan = DpSgdPlan(**self.state["dpsgd"])
        ledger = self.ledger
        ledger.charge([part_release(plan, plan.steps_per_round)], "joint.records@outsider",
                      note=f"round {round_}: the {self.name} part's DP-SGD steps")
        if also_charge is not None:
            also_charge(plan, ledger)
        canaries = self._gradient_canaries(model)
        self.state["opt"], losses = dp_sgd_round(model, batch_loss, n, plan, self.state.get("opt"),
                                                 self.config.training.weight_decay,
                                                 self.noise_source(NoiseLabel.DPSGD, str(round_)), canaries,
                                                 self.noise_source(NoiseLabel.GRADIENT_CANARY_SAMPLING,
                                                                   str(round_)))
        if canaries is not None:
            shapes = [list(p.shape) for p in model.parameters() if p.requires_grad]  # the optimizer's order
            self.state["gradient_canaries"] = {**canaries.to_state(), "n": n, "plan": plan.to_dict(), "shapes": shapes,
                                               "rounds": [*self.state.get("gradient_canaries", {}).get("rounds", []),
                                                          round_]}
        return losses

    def _gradient_canaries(self, model: nn.Module):
        """The audit run's Dirac gradient canaries on this part (drawn at the first DP-SGD round), or None."""
        m = self.config.audit.gradient_canaries
        if not m:
            return None
        from fedscore.shared.privacy.gradient_canaries import GradientCanaries

        if "gradient_canaries" in self.state:
            return GradientCanaries.from_state(self.state["gradient_canaries"])
        n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return GradientCanaries.draw(m, n_parameters, self.noise_source(NoiseLabel.GRADIENT_CANARIES))

    # -- dispatch ------------------------------------------------------------------------------------------------
    def reply(self, request: Envelope, payload: bytes = b"", payload_kind: str = "",
              metrics: dict[str, float] | None = None, body: Body | None = None,
              parts: list[bytes] | None = None) -> Envelope:
        """A reply with `payload`, or with `parts` (plaintext row chunks, `row_chunks`) the channel seals each."""
        header = Header(kind=request.header.kind, round=request.header.round, sender=self.name,
                        recipient="server", payload_kind=payload_kind, metrics=metrics or {}, body=body,
                        ledger=self._ledger_report())
        return Envelope(header=header, payload=payload, parts=parts)

    def handle(self, message: Envelope) -> Envelope:
        kind = message.header.kind
        self._config = None  # parsed at most once for this message (`config`)
        try:
            if message.header.recipient != self.name:
                raise ProtocolError(f"{self.name}: message addressed to {message.header.recipient!r}")
            handler = self.handlers.get(kind)
            if handler is None:
                raise ProtocolError(f"{self.name}: unknown request {str(kind)!r}; it serves "
                                    f"{', '.join(self.handlers)}")
            self.load_state()
            if message.header.resend and (cached := self._sent_before(message)) is not None:
                return cached
            self._step, self._charges = f"{kind}:{message.header.round}", 0
            # end to end: check the step and open the peer's payload before anything reads it; seal the reply's
            reply = self.e2e.send(message, handler(self.e2e.receive(message)))
            # the reply's sealed payload in an entry of its own (written with each step, as it changes each step)
            self.state["last"] = {"request": _digest(message), "header": reply.header.model_dump_json()}
            self.state["last_payload"] = torch.from_numpy(np.frombuffer(reply.payload, np.uint8).copy())
            self.save_state()  # the checkpoint: saved before the reply can leave
            self.e2e.saved(message)
            return reply
        except (ProtocolError, DataError, UnexpectedBody, ValueError) as exc:
            return self._error(message, f"{exc}")
        except Exception as exc:  # report, never hang the coordinator
            if getattr(exc, "is_refusal", False):  # fedscore.shared.privacy BudgetExceeded (not imported: it is slow)
                return self._error(message, f"{self.name} refused: {exc}")
            return self._error(message, f"{self.name}: internal error in {kind}: {exc!r}\n{traceback.format_exc()}")
        finally:
            self._config = None

    def _sent_before(self, message: Envelope) -> Envelope | None:
        """The reply this party sent to exactly this request, if it was the last one it served (a resumed
        coordinator re-sending what it has no reply for); None, and the request is served as usual, otherwise."""
        last = self.state.get("last")
        if not last or last["request"] != _digest(message):
            return None
        header = Header.model_validate_json(last["header"])
        header.ledger = self._ledger_report()
        payload = self.state.get("last_payload", last.get("payload"))  # a state saved before it had its own entry
        return Envelope(header=header, payload=payload.numpy().tobytes() if payload is not None else b"")

    def _error(self, message: Envelope, reason: str) -> Envelope:
        header = Header(kind=message.header.kind, round=message.header.round, sender=self.name,
                        recipient="server", error=reason, ledger=self._ledger_report())
        return Envelope(header=header)


def _digest(message: Envelope) -> str:
    """What identifies a request for a re-send: its header (but the flag and sizes) and its exact payload bytes."""
    header = message.header.model_dump_json(exclude={"resend", "ledger", "payload_bytes"})
    return hashlib.sha256(header.encode() + b"\0" + message.payload).hexdigest()
