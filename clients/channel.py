"""A party's end of the encrypted channel to its peer, and the protocol order it accepts messages in.

Why here and not in the coordinator: the coordinator is only half trusted, so each party checks for itself that a
request is the next step of the run it set up (its next row in shared/protocol/steps.py `plan`), that its payload
comes from the peer for exactly this step (shared/protocol/e2e.py: the associated data binds run, kind, round,
direction, a per-direction sequence number and the chunk's place), and never serves a step twice. Embeddings and
gradients cross as several chunks (shared/protocol/chunks.py), each with its own sequence number: a chunk dropped,
replayed or out of order is refused by name. A bad message gets a ProtocolError
reply naming what is wrong; nothing is decoded before it authenticates.

State (in the party's run state, `state["e2e"]`, a `ChannelState` of clients/state.py): the run id, the next step
expected, and the next sequence number in each direction. Run ids this home has set up are kept in
`home/e2e-runs.txt` (checked and appended under a file lock once the setup's state is saved, before its reply
leaves, so a setup whose reply never left may be served again after a crash, and two processes on one home never
both serve one), and a setup for the run the state already holds is refused too, so a replayed setup cannot rewind
the counters. A resumed run continues these counters from the saved state (the same run id, the same keys): nothing
is reset, and a re-sent request is answered from the state's copy of the sealed reply (clients/base.py), never
sealed again. The blacklist check is its own session: the lender picks a fresh session id, the payment holder
serves each session once (recorded in the same file).
"""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING

from fedscore.clients.state import ChannelState
from fedscore.shared.party_home import PartyHome
from fedscore.shared.protocol.bodies import SetupRequest
from fedscore.shared.protocol.chunks import CHUNK_ENTRY, ChunkError, join_bundle, read_bundle
from fedscore.shared.protocol.e2e import Channel, Delivery, SealError, load_identity, parse_public_key, read_frame
from fedscore.shared.protocol.messages import Envelope, MessageKind
from fedscore.shared.protocol.steps import BLACKLIST_KINDS, CHUNKED, PayloadKind, find, next_for, phase

if TYPE_CHECKING:
    from fedscore.clients.base import PartyBase

K = MessageKind
BLACKLIST = BLACKLIST_KINDS


def expected_payload(party: str, kind: MessageKind, round_: int) -> PayloadKind:
    """The payload kind a request to `party` must carry (the plan's `expects`); round 0's embed carries the alignment
    tokens instead of gradients."""
    step = find(party, kind, round_)
    return step.expects if step is not None else PayloadKind.NONE


def delivered_as(sender: str, kind: MessageKind, round_: int, rounds: int | None = None) -> tuple[MessageKind, int]:
    """The request a reply's payload reaches the peer in (server/coordinator.py moves it there; the plan's
    `delivered_as`). With the run's `rounds`: the lender's last `train` reply has no such request (no embed follows
    it), so it may carry nothing."""
    step = find(sender, kind, round_, rounds)
    if step is None or step.delivered_as is None:
        if rounds is not None and kind is K.TRAIN:
            raise SealError(f"{sender}: the last round's {kind} reply carries no payload (no embed follows to "
                            "deliver it; the payment holder receives R-1 gradient exchanges)")
        raise SealError(f"{sender}: a {kind} reply carries no payload for the peer")
    return step.delivered_as


class PartyChannel:
    """Opens what a party receives and seals what it sends, for one party object."""

    def __init__(self, party: PartyBase) -> None:
        self.party = party
        self._identity = None

    @property
    def name(self) -> str:
        return self.party.name

    def channel(self, run_id: str) -> Channel:
        settings = self.party.settings
        peer = "lender" if self.name == "payment" else "payment"
        if not settings.peer_public_key:
            raise SealError(f"{self.name}: no pinned public key for the {peer}: set peer_public_key in this party's "
                            "settings (the peer's home/identity.pub, checked by its fingerprint)")
        if self._identity is None:
            self._identity = load_identity(settings.home)
        return Channel(self._identity, parse_public_key(settings.peer_public_key), self.name, peer, run_id)

    # -- run ids this home has served -------------------------------------------------------------------------------
    def _seen(self) -> set[str]:
        path = PartyHome(self.party.settings.home).e2e_runs
        return set(path.read_text().split()) if path.exists() else set()

    def _claim(self, run_id: str) -> bool:
        """Record `run_id` as set up in this home; False if it already was. Check and append happen under one
        exclusive file lock (`e2e-runs.lock`, filelock), so two processes on the same home (a training worker and a
        service, or two workers) can never both claim one id; the line is fsync'd before anything is served."""
        home = PartyHome(self.party.settings.home)
        with home.lock(home.E2E_RUNS_LOCK):
            path = home.e2e_runs
            if path.exists() and run_id in path.read_text().split():
                return False
            with path.open("a") as handle:
                handle.write(run_id + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            return True

    # -- receiving -------------------------------------------------------------------------------------------------
    def receive(self, message: Envelope) -> Envelope:
        """The message with its payload opened, after checking it is the next step of this party's run."""
        header = message.header
        kind, round_ = header.kind, header.round
        if kind in BLACKLIST:
            return self._receive_blacklist(message)
        if kind is K.SETUP:
            if message.payload:
                raise SealError(f"{self.name}: setup carries no payload")
            if not isinstance(header.body, SetupRequest):
                return message  # the handler says what is missing
            run_id = header.body.run_id
            if not run_id:
                raise SealError(f"{self.name}: setup without a run id (the channel keys are bound to it)")
            if run_id in self._seen() or self.party.state.get("e2e", {}).get("run") == run_id:
                raise SealError(f"{self.name} refused: replayed message: run {run_id!r} was already set up with this "
                                "party home")
            return message
        raw = self.party.state.get("e2e")
        if raw is None:
            raise SealError(f"{self.name}: {kind} round {round_} before setup")
        state = ChannelState.from_dict(raw)
        expected = state.next
        assert expected is not None  # set with the setup's reply (`send`)
        if (str(kind), round_) != expected:
            late = phase(kind, round_) < phase(K(expected[0]), expected[1])
            what = "replayed message: already served" if late else "out of protocol order"
            raise SealError(f"{self.name} refused: {what}: got {kind} round {round_}, expected {expected[0]} round "
                            f"{expected[1]} in run {state.run!r}")
        opened = self._open(message, state)
        self.party.state["e2e"] = state.to_dict()
        return opened

    def _open(self, message: Envelope, state: ChannelState | None) -> Envelope:
        """The payload opened if the request must carry one (from the peer, this run, the next sequence numbers:
        `state.received` moves on by the chunks opened); `state` None for a request that opens a session and so
        carries none. A payload is a bundle of sealed chunks (shared/protocol/chunks.py): one for most kinds,
        several for embeddings and gradients, each opened on its own and checked to be the next in sequence and in
        its place; the opened envelope holds them as `parts` (and their bytes joined as `payload`)."""
        header = message.header
        want = expected_payload(self.name, header.kind, header.round)
        if header.payload_kind != want:
            raise SealError(f"{self.name} refused: {header.kind} round {header.round} must carry "
                            f"{want or 'no payload'}, got {header.payload_kind or 'none'}")
        if not want:
            if message.payload:
                raise SealError(f"{self.name} refused: {header.kind} carries no payload, got {len(message.payload)} "
                                "bytes")
            return message
        assert state is not None  # every request that carries a payload belongs to a session
        run_id = state.run
        what = f"{header.kind} round {header.round}"
        try:
            entries = read_bundle(message.payload)
        except ChunkError as exc:
            raise SealError(f"{self.name} refused: the {want} payload of {what}: {exc}") from None
        count = len(entries)
        if count == 0 or (count > 1 and want not in CHUNKED):
            raise SealError(f"{self.name} refused: the {want} payload of {what} must be one chunk, got {count}")
        peer = "lender" if self.name == "payment" else "payment"
        channel = self.channel(run_id)
        parts = []
        for position, (index, declared, frame) in enumerate(entries):
            if declared != count:
                raise SealError(f"{self.name} refused: dropped or added chunk in {what}: chunk {index + 1} says the "
                                f"exchange has {declared} chunks, {count} arrived")
            if index != position:
                late = index < position
                raise SealError(f"{self.name} refused: {'replayed' if late else 'out of order'} chunk in {what}: "
                                f"chunk {index + 1} of {count} arrived in place {position + 1}")
            frame_run, seq, _, _ = read_frame(frame)
            if frame_run != run_id:
                raise SealError(f"{self.name} refused: message for another run ({frame_run!r}); this party is in "
                                f"run {run_id!r}")
            expected = state.received + position
            if seq != expected:
                late = seq < expected
                raise SealError(f"{self.name} refused: {'replayed' if late else 'out of order'} message: sequence "
                                f"{seq} from the peer, expected {expected} (chunk {index + 1} of {count} of {what})")
            parts.append(channel.open(frame, Delivery(run_id, peer, self.name, str(header.kind), header.round,
                                                      header.payload_kind, seq, index, count)))
        state.received += count
        return Envelope(header=header.model_copy(), payload=parts[0] if count == 1 else b"", parts=parts)

    def _receive_blacklist(self, message: Envelope) -> Envelope:
        kind = message.header.kind
        if kind is K.BLACKLIST_REQUEST:
            return self._open(message, None)
        if kind is K.BLACKLIST_RESPOND:
            session = read_frame(read_bundle(message.payload)[0][2])[0] if message.payload else ""
            if not session.startswith("blacklist-"):
                raise SealError(f"{self.name} refused: {session!r} is not a blacklist session")
            if not self._claim(session):
                raise SealError(f"{self.name} refused: replayed message: blacklist session {session!r} was already "
                                "served")
            self.party.state["e2e_blacklist"] = ChannelState(run=session).to_dict()
        raw = self.party.state.get("e2e_blacklist")
        if raw is None:
            raise SealError(f"{self.name}: {kind} without a blacklist session")
        state = ChannelState.from_dict(raw)
        opened = self._open(message, state)
        self.party.state["e2e_blacklist"] = state.to_dict()
        return opened

    def saved(self, request: Envelope) -> None:
        """After the party saved its state for this request, before its reply leaves: a setup's run id joins the
        runs this home served, under the flock (`_claim`), so two processes on one home never both serve it."""
        if request.header.kind is K.SETUP and not self._claim(self.party.run_id):
            raise SealError(f"{self.name} refused: replayed message: run {self.party.run_id!r} was already set up "
                            "with this party home")

    # -- sending ---------------------------------------------------------------------------------------------------
    def send(self, request: Envelope, reply: Envelope) -> Envelope:
        """Seal the reply's payload for the peer and move this party's run to its next step."""
        kind, round_ = request.header.kind, request.header.round
        if kind is K.BLACKLIST_REQUEST:
            self.party.state["e2e_blacklist"] = ChannelState(run=f"blacklist-{secrets.token_hex(8)}").to_dict()
        if kind in BLACKLIST:
            key = "e2e_blacklist"
            state = ChannelState.from_dict(self.party.state[key])
        else:
            key = "e2e"
            if kind is K.SETUP:  # remembered in the home once the state is saved (`saved`)
                state = ChannelState(run=self.party.run_id)
            else:
                state = ChannelState.from_dict(self.party.state[key])
            next_kind, next_round = next_for(self.name, kind, round_, self.party.config.training.rounds)
            state.next = (str(next_kind), next_round)
        self.party.state[key] = state.to_dict()
        parts = reply.parts if reply.parts is not None else [reply.payload] if reply.payload else []
        if not parts:
            return reply
        rounds = self.party.config.training.rounds if kind is K.TRAIN else None  # a blacklist session has no config
        to_kind, to_round = delivered_as(self.name, kind, round_, rounds)
        peer = "lender" if self.name == "payment" else "payment"
        payload_kind = reply.header.payload_kind
        if len(parts) > 1 and payload_kind not in CHUNKED:
            raise SealError(f"{self.name}: a {payload_kind} payload is one chunk, not {len(parts)}")
        channel, count = self.channel(state.run), len(parts)
        frames = [channel.seal(part, Delivery(state.run, self.name, peer, str(to_kind), to_round, payload_kind,
                                              state.sent + i, i, count)) for i, part in enumerate(parts)]
        cap = self.party.config.exchange.chunk_bytes if payload_kind in CHUNKED else 0
        if cap and max(len(f) for f in frames) + CHUNK_ENTRY > cap:
            raise SealError(f"{self.name}: a sealed {payload_kind} chunk of {max(len(f) for f in frames)} bytes "
                            f"exceeds exchange.chunk_bytes = {cap}")
        state.sent += count
        self.party.state[key] = state.to_dict()
        header = reply.header.model_copy(update={"chunks": count})
        return Envelope(header=header, payload=join_bundle(frames))
