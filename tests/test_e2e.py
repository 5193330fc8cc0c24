"""End-to-end encryption between the parties (shared/protocol/e2e.py, clients/channel.py).

What the coordinator handles is captured whole and searched for everything it must not learn; messages tampered
with, replayed, reordered or taken from another run are refused by the party; a wrong pinned key fails with the
fingerprints named.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedscore.clients.parties import make_party
from fedscore.local_parties import key_fingerprints, party_settings
from fedscore.server.coordinator import Coordinator, PartyRefused
from fedscore.shared.config import load_config
from fedscore.shared.party_home import PartyHome
from fedscore.shared.protocol import e2e
from fedscore.shared.protocol.chunks import read_bundle
from fedscore.shared.protocol.messages import Envelope, MessageKind, unpack_arrays
from fedscore.shared.protocol.transport import InProcessTransport
from tests.conftest import FAST, SECRET, fresh_homes, make_party_data
from tests.test_alignment_protocol import _digests
from tests.test_protocol import RecordingTransport

CONFIG = [*FAST, "training.rounds=2", "baselines.enabled=false"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("e2e-data")
    return out, make_party_data(out, population=800, seed=5)


def _parties(root: Path, data: Path, name: str = "run") -> dict:
    settings = party_settings(root / name, data, SECRET, homes=fresh_homes(root))
    return {n: make_party(s) for n, s in settings.items()}


def _leaks(blob: bytes, needles: list[bytes]) -> int:
    return sum(needle in blob for needle in needles)


def test_the_coordinator_relays_only_ciphertext(small_data: tuple[Path, dict], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data, ids = small_data
    plaintexts: list[tuple[str, bytes]] = []  # what the parties sealed, as they sealed it
    seal = e2e.Channel.seal

    def recording_seal(self: e2e.Channel, plaintext: bytes, delivery: e2e.Delivery) -> bytes:
        plaintexts.append((delivery.payload_kind, plaintext))
        return seal(self, plaintext, delivery)

    monkeypatch.setattr(e2e.Channel, "seal", recording_seal)
    parties = _parties(tmp_path, data)
    transport = RecordingTransport(parties)
    Coordinator(load_config(None, CONFIG), transport).run()

    payloads = [m.payload for m in transport.seen if m.payload]
    blob = b"".join(m.payload + m.header.model_dump_json().encode() for m in transport.seen)
    kinds = {k for k, _ in plaintexts}
    assert {"psi_request", "psi_response", "alignment_tokens", "embeddings", "gradients"} <= kinds
    # each sealed payload is seen twice: a reply, then the request it is moved into (nothing sealed goes unrelayed)
    # every payload is a bundle of sealed chunks (shared/protocol/chunks.py), one frame per sealed plaintext
    frames = [frame for p in set(payloads) for _, _, frame in read_bundle(p)]
    assert len(frames) == len(plaintexts) and all(f.startswith(e2e.MAGIC) for f in frames)
    assert all(payloads.count(p) == 2 for p in set(payloads))
    for payload in payloads:  # nothing the coordinator holds decodes as the parties' array format
        with pytest.raises(Exception):  # noqa: B017 - any failure to parse will do
            unpack_arrays(payload)

    # plaintext partial logits (or embeddings) and gradients: every run of 4 consecutive float32 values (16 bytes; a
    # partial logit is one value per user, too short a needle alone), absent from what the coordinator saw. Round
    # 0's partial logits are the constant 0, a needle that any zero padding matches: left out
    values = [np.ascontiguousarray(array, dtype=np.float32).tobytes() for kind, plain in plaintexts
              if kind in ("embeddings", "gradients") for array in unpack_arrays(plain).values()]
    rows = [chunk for raw in values for chunk in (raw[i:i + 16] for i in range(0, len(raw) - 15, 16))
            if any(chunk)]
    assert len(rows) > 100
    plain_blob = b"".join(plain for _, plain in plaintexts)
    assert _leaks(plain_blob, rows[::50]) == len(rows[::50])  # the search finds them where they are
    assert _leaks(blob, rows) == 0

    lender = parties["lender"]
    aligned = lender.state["y"][lender.state["rows"]].numpy()
    assert_learns_nothing(blob, data, ids, aligned)
    assert _leaks(plain_blob + blob, [aligned[:48].astype(np.float32).tobytes()]) == 0  # labels never cross


def test_the_last_round_sends_no_gradients(small_data: tuple[Path, dict], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """R rounds, R-1 gradient exchanges: the lender's last `train` reply carries no payload and computes none, the
    payment holder opens R-1 gradient payloads in order, and after the last step the coordinator's checkpoint keeps
    no payload."""
    from fedscore.clients.lender.party import LenderParty

    data, _ = small_data
    rounds = 3
    sealed: list[tuple[str, str, int]] = []  # (payload kind, kind it is delivered in, round)
    opened: list[tuple[str, int]] = []
    seal, open_ = e2e.Channel.seal, e2e.Channel.open

    def recording_seal(self: e2e.Channel, plaintext: bytes, delivery: e2e.Delivery) -> bytes:
        sealed.append((delivery.payload_kind, delivery.kind, delivery.round))
        return seal(self, plaintext, delivery)

    def recording_open(self: e2e.Channel, frame: bytes, delivery: e2e.Delivery) -> bytes:
        opened.append((delivery.payload_kind, delivery.round))
        return open_(self, frame, delivery)

    computed: list[int] = []
    gradients = LenderParty._embedding_gradients

    def counting(self: LenderParty, *args: object) -> np.ndarray:
        computed.append(int(args[-1]))  # type: ignore[call-overload]
        return gradients(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(e2e.Channel, "seal", recording_seal)
    monkeypatch.setattr(e2e.Channel, "open", recording_open)
    monkeypatch.setattr(LenderParty, "_embedding_gradients", counting)
    parties = _parties(tmp_path, data)
    transport = RecordingTransport(parties)
    checkpoints = tmp_path / "coordinator"
    checkpoints.mkdir()
    Coordinator(load_config(None, [*FAST, f"training.rounds={rounds}", "baselines.enabled=false"]), transport,
                checkpoint_dir=checkpoints).run()

    assert computed == list(range(rounds - 1))  # the last round computes (and so charges) no gradients
    assert [s for s in sealed if s[0] == "gradients"] == [("gradients", "embed", r) for r in range(1, rounds)]
    assert [o for o in opened if o[0] == "gradients"] == [("gradients", r) for r in range(1, rounds)]
    replies = [m for m in transport.seen if m.header.sender == "lender" and m.header.kind is MessageKind.TRAIN]
    assert len(replies) == rounds and all(r.payload for r in replies[:-1])
    assert replies[-1].payload == b"" and replies[-1].header.payload_kind == "" and not replies[-1].header.error
    checkpoint = json.loads((checkpoints / "checkpoint.json").read_text())
    assert checkpoint["next_step"] == checkpoint["total_steps"] and checkpoint["carry_file"] == ""
    assert list(checkpoints.glob("checkpoint-*.payload")) == []


def test_the_lenders_channel_refuses_to_seal_a_last_round_payload() -> None:
    from fedscore.clients.channel import delivered_as

    assert delivered_as("lender", MessageKind.TRAIN, 1, rounds=3) == (MessageKind.EMBED, 2)
    with pytest.raises(e2e.SealError, match="no payload"):
        delivered_as("lender", MessageKind.TRAIN, 2, rounds=3)


def assert_learns_nothing(blob: bytes, data: Path, ids: dict[str, set[str]], aligned_labels: np.ndarray) -> None:
    """No raw ID or plain hash of one, no label vector, no raw feature column in `blob` (everything the coordinator
    handled): shared by the in-process capture above and the Flower ServerApp's (tests/test_federation.py)."""
    sample = sorted(ids["payment"] | ids["lender"])[::5]
    assert [i for i in sample if any(d in blob for d in _digests(i))] == []
    # the label vector and raw feature columns, in file order and in the aligned order, in the usual dtypes
    applicants = pd.read_parquet(data / "lender" / "applicants.parquet")
    features = pd.read_parquet(data / "payment" / "features.parquet")
    vectors = [applicants["label"].to_numpy()[:48], aligned_labels[:48]]
    vectors += [frame[c].to_numpy()[:6] for frame in (applicants, features) for c in frame.columns if c != "id"]
    needles = [np.asarray(v).astype(dtype).tobytes() for v in vectors for dtype in (np.float32, np.float64, np.int64)]
    needles += [np.asarray(v).astype(np.uint8).tobytes() for v in vectors[:2]]
    assert _leaks(blob, needles) == 0


class Meddler(InProcessTransport):
    """Lets a test replace each message by the messages actually delivered; the last one's reply goes back."""

    def __init__(self, parties: dict, meddle: Callable[[Envelope], list[Envelope]]) -> None:
        super().__init__(parties)
        self.meddle = meddle

    def exchange(self, messages: list[Envelope]) -> list[Envelope]:
        return [[self.parties[m.header.recipient].handle(m) for m in self.meddle(message)][-1]
                for message in messages]


def _is(message: Envelope, kind: MessageKind, round_: int) -> bool:
    return message.header.kind is kind and message.header.round == round_


def _copy(message: Envelope, payload: bytes | None = None, round_: int | None = None) -> Envelope:
    header = message.header.model_copy(update={} if round_ is None else {"round": round_})
    return Envelope(header=header, payload=message.payload if payload is None else payload)


def _tampered(m: Envelope) -> list[Envelope]:
    if _is(m, MessageKind.TRAIN, 0):
        return [_copy(m, m.payload[:-1] + bytes([m.payload[-1] ^ 1]))]
    return [m]


def _twice(m: Envelope) -> list[Envelope]:
    return [m, m] if _is(m, MessageKind.TRAIN, 0) else [m]


def _early(m: Envelope) -> list[Envelope]:
    return [_copy(m, round_=1)] if _is(m, MessageKind.TRAIN, 0) else [m]


class _Keep:
    """Round 0's embeddings delivered again as round 1's: the step is right, the payload is an old one."""

    def __init__(self) -> None:
        self.first: Envelope | None = None

    def __call__(self, m: Envelope) -> list[Envelope]:
        if _is(m, MessageKind.TRAIN, 0):
            self.first = m
        if _is(m, MessageKind.TRAIN, 1):
            assert self.first is not None
            return [_copy(self.first, round_=1)]
        return [m]


@pytest.mark.parametrize(("meddle", "reason"), [
    (_tampered, r"lender refused 'train': lender: the embeddings payload for train round 0 fails authentication"),
    (_twice, r"lender refused: replayed message: already served: got train round 0, expected train round 1"),
    (_early, r"lender refused: out of protocol order: got train round 1, expected train round 0"),
    (_Keep(), r"lender refused: replayed message: sequence 1 from the peer, expected 2"),
], ids=["tampered", "replayed", "reordered", "old payload"])
def test_a_meddled_message_is_refused(small_data: tuple[Path, dict], tmp_path: Path,
                                      meddle: Callable[[Envelope], list[Envelope]], reason: str) -> None:
    data, _ = small_data
    with pytest.raises(PartyRefused, match=reason):
        Coordinator(load_config(None, CONFIG), Meddler(_parties(tmp_path, data), meddle)).run()


def test_a_message_from_another_run_or_a_replayed_setup_is_refused(small_data: tuple[Path, dict],
                                                                   tmp_path: Path) -> None:
    data, _ = small_data
    first_parties = _parties(tmp_path, data, "first")
    recorded = RecordingTransport(first_parties)
    first = Coordinator(load_config(None, CONFIG), recorded).run()
    old = next(m for m in recorded.seen if _is(m, MessageKind.TRAIN, 0) and m.header.sender == "server")

    def foreign(m: Envelope) -> list[Envelope]:
        return [_copy(m, old.payload)] if _is(m, MessageKind.TRAIN, 0) else [m]

    # same homes, same keys: only the run id keeps the first run's payload out of the second
    with pytest.raises(PartyRefused, match=rf"message for another run \('{first.run_id}'\); this party is in run"):
        Coordinator(load_config(None, CONFIG), Meddler(_parties(tmp_path, data, "second"), foreign)).run()

    setup = next(m for m in recorded.seen if m.header.kind is MessageKind.SETUP and m.header.recipient == "payment")
    reply = _parties(tmp_path, data, "third")["payment"].handle(setup)
    assert f"payment refused: replayed message: run '{first.run_id}' was already set up" in reply.header.error


def test_a_wrong_pinned_key_fails_and_names_the_fingerprints(small_data: tuple[Path, dict], tmp_path: Path) -> None:
    data, _ = small_data
    settings = party_settings(tmp_path / "run", data, SECRET, homes=fresh_homes(tmp_path))
    impostor = X25519PrivateKey.generate().public_key().public_bytes_raw()
    settings["lender"] = settings["lender"].model_copy(update={"peer_public_key": impostor.hex()})
    parties = {n: make_party(s) for n, s in settings.items()}
    with pytest.raises(PartyRefused) as refused:
        Coordinator(load_config(None, CONFIG), InProcessTransport(parties)).run()
    fingerprints = key_fingerprints(fresh_homes(tmp_path))
    assert refused.value.party == "payment" and "psi_request payload for align.respond round -1 fails authentication" \
        in refused.value.reason
    assert f"this party's key {fingerprints['payment']}, pinned lender key {fingerprints['lender']}" \
        in refused.value.reason

    settings["lender"] = settings["lender"].model_copy(update={"peer_public_key": ""})
    with pytest.raises(PartyRefused, match="lender refused 'setup': lender: no pinned public key for the payment"):
        Coordinator(load_config(None, CONFIG), InProcessTransport({n: make_party(s) for n, s in settings.items()}
                                                                  )).run()


def test_identity_keys_live_in_the_home_and_are_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    public = e2e.public_key_hex(home)
    assert (home / PartyHome.IDENTITY_PUB).read_text().strip() == public and len(public) == 64
    assert (home / PartyHome.IDENTITY_KEY).stat().st_mode & 0o777 == 0o600
    assert e2e.public_key_hex(home) == public  # created once, then read
    assert e2e.parse_public_key(public) == e2e.parse_public_key(__import__("base64").b64encode(bytes.fromhex(public))
                                                                .decode())
    os.chmod(home / PartyHome.IDENTITY_KEY, 0o644)
    with pytest.raises(e2e.SealError, match="readable by others"):
        e2e.load_identity(home)


def test_a_replayed_blacklist_request_is_refused(tmp_path: Path) -> None:
    """The blacklist check is its own session: the payment holder answers each lender session once."""
    from fedscore.server.coordinator import check_blacklist

    make_party_data(tmp_path / "b", population=300)
    applicants = pd.read_parquet(tmp_path / "b" / "lender" / "applicants.parquet")["id"].tolist()
    pd.DataFrame({"id": applicants[:3]}).to_parquet(tmp_path / "b" / "payment" / "fraud_list.parquet", index=False)

    def twice(m: Envelope) -> list[Envelope]:
        return [m, m] if m.header.kind is MessageKind.BLACKLIST_RESPOND else [m]

    with pytest.raises(PartyRefused, match=r"payment refused: replayed message: blacklist session 'blacklist-"):
        check_blacklist(Meddler(_parties(tmp_path, tmp_path / "b"), twice))
    check_blacklist(InProcessTransport(_parties(tmp_path, tmp_path / "b", "again")))  # a new session is served


def _claim_in_process(home: str, run_id: str, queue) -> None:  # a separate process, as a worker and a service are
    from types import SimpleNamespace

    from fedscore.clients.channel import PartyChannel

    party = SimpleNamespace(name="payment", settings=SimpleNamespace(home=Path(home)))
    queue.put(PartyChannel(party)._claim(run_id))  # type: ignore[arg-type]


def test_a_run_id_is_claimed_once_across_processes(tmp_path: Path) -> None:
    """`e2e-runs.txt` is checked and appended under an flock: of many processes claiming one run id at once,
    exactly one wins, and every id claimed is in the file once."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(str(tmp_path), f"run-{i % 3}", queue)) for i in range(12)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = [queue.get(timeout=5) for _ in procs]
    assert sum(results) == 3
    lines = (tmp_path / "e2e-runs.txt").read_text().split()
    assert sorted(lines) == ["run-0", "run-1", "run-2"]
