"""Chunked exchanges (issue 20 item 2): embeddings and gradients cross in chunks of users under a byte cap, each
sealed with its own sequence number; the party state saves only what changed; transcripts are written per chunk.

Small data throughout: a tiny cap (the smallest the config allows) splits every exchange into several chunks, so the
very code path of a million-user run runs here. What must hold:
- chunk boundaries: any number of users (not a multiple of the chunk size, one, none) crosses whole and in order;
- a chunk dropped, replayed, reordered or tampered with is refused by the receiving party, by name;
- chunking changes nothing else: the same model, transcripts, ledger records and privacy report with and without;
- after alignment a step writes the model, counters and what changed, never the features, IDs or labels again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedscore.clients.parties import make_party
from fedscore.clients.state_store import ENTRIES_DIR, StateStore, read_state
from fedscore.clients.transcript import collect
from fedscore.runs import party_settings, run_inprocess
from fedscore.server.coordinator import Coordinator, PartyRefused
from fedscore.shared.config import MIN_CHUNK_BYTES, ConfigError, load_config
from fedscore.shared.party_home import PartyHome
from fedscore.shared.privacy.ledger import ledger_entries
from fedscore.shared.protocol.chunks import (
    CHUNK_OVERHEAD,
    ChunkError,
    bundle_entries,
    chunk_ranges,
    gather_rows,
    iter_row_chunks,
    join_bundle,
    pack_row_chunks,
    read_bundle,
    rows_per_chunk,
)
from fedscore.shared.protocol.messages import Envelope, MessageKind
from fedscore.shared.protocol.steps import PayloadKind, plan
from fedscore.shared.protocol.transport import InProcessTransport
from tests.conftest import FAST, SECRET, fresh_homes, make_party_data
from tests.test_protocol import RecordingTransport

K = MessageKind
TINY = f"exchange.chunk_bytes={MIN_CHUNK_BYTES}"
# 8 numbers per user (32 bytes) so the smallest cap holds ~30 users: every exchange of a few hundred is 10+ chunks
CHUNKY = [*FAST, "training.rounds=3", "baselines.enabled=false", "model.payment_output=embedding",
          "model.embedding_dim=8", "audit.record_transcripts=true"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chunk-data")
    make_party_data(out, population=700, seed=11)
    return out


def _parties(root: Path, data: Path) -> dict:
    return {n: make_party(s) for n, s in party_settings(root, data, SECRET, homes=fresh_homes(root)).items()}


# -- chunk boundaries -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 9, 10])
def test_any_number_of_users_crosses_whole_and_in_order(n: int) -> None:
    """3 users per chunk: 7 users are chunks of 3, 3, 1; one user one chunk; none one empty chunk (the receiver
    still learns the width and that nothing is missing)."""
    values = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    cap = CHUNK_OVERHEAD + 3 * 8  # three rows of two float32
    chunks = pack_row_chunks("embeddings", values, cap)
    assert len(chunks) == max(1, math.ceil(n / 3))
    spans = [(start, start + len(rows)) for start, rows in iter_row_chunks("embeddings", chunks)]
    assert spans == chunk_ranges(n, 3) and spans[0][0] == 0 and spans[-1][1] == n
    assert all(len(chunk) <= cap for chunk in chunks)
    gathered = gather_rows("embeddings", chunks)
    assert gathered.shape == (n, 2) and np.array_equal(gathered, values)


def test_rows_out_of_place_and_caps_too_small_are_refused() -> None:
    chunks = pack_row_chunks("gradients", np.ones((7, 1), np.float32), CHUNK_OVERHEAD + 12)
    with pytest.raises(ChunkError, match="gradients chunk 1 of 2 starts at user 6, expected 3"):
        list(iter_row_chunks("gradients", [chunks[0], chunks[2]]))
    poisoned = np.ones((7, 1), np.float32)
    poisoned[4, 0] = np.nan  # a NaN passes every clamp: refused before it reaches a fit or a model
    with pytest.raises(ChunkError, match=r"gradients chunk 1 of 3 holds 1 non-finite value\(s\) \(rows from user 3\)"):
        gather_rows("gradients", pack_row_chunks("gradients", poisoned, CHUNK_OVERHEAD + 12))
    with pytest.raises(ChunkError, match="holds not numbers"):
        gather_rows("ids", pack_row_chunks("ids", np.array([["a"], ["b"]]), 0))
    with pytest.raises(ChunkError, match="no room for one user's row"):
        rows_per_chunk(CHUNK_OVERHEAD + 3, 4)
    assert rows_per_chunk(0, 4) is None and chunk_ranges(5, None) == [(0, 5)]
    with pytest.raises(ConfigError, match=r"exchange\.chunk_bytes"):
        load_config(None, ["exchange.chunk_bytes=100"])


def test_the_step_table_counts_chunks_per_row() -> None:
    """One row per step whatever the chunks: embeddings and gradients rows are chunked, the rest one chunk."""
    rows = plan(3)
    chunked = {(r.kind, r.round) for r in rows if r.chunked}
    assert chunked == {(K.EMBED, 0), (K.EMBED, 1), (K.EMBED, 2), (K.TRAIN, 0), (K.TRAIN, 1)}
    embed = next(r for r in rows if r.kind is K.EMBED)
    assert embed.chunk_count(1000, 4, 0) == 1  # no cap
    per = rows_per_chunk(4096, 4)
    assert per is not None and embed.chunk_count(1000, 4, 4096) == math.ceil(1000 / per)
    assert next(r for r in rows if r.kind is K.ALIGN_MATCH).chunk_count(10**6, 4, 4096) == 1
    assert rows[-1].returns is PayloadKind.NONE and rows[-1].chunk_count(1000, 4, 4096) == 0


def test_bundles_round_trip_and_truncation_is_named() -> None:
    frames = [b"a" * 5, b"", b"bc"]
    bundle = join_bundle(frames)
    assert [(i, n, f) for i, n, f in read_bundle(bundle)] == [(0, 3, b"a" * 5), (1, 3, b""), (2, 3, b"bc")]
    assert b"".join(bundle_entries(bundle)) == bundle[8:]
    with pytest.raises(ChunkError, match="truncated"):
        read_bundle(bundle[:-1])


def test_flower_packs_chunks_into_few_arrays_cut_between_chunks() -> None:
    """Under Flower a bundle crosses as a few Arrays (one per chunk measured slower), each within the limit and cut
    only between two chunks, and reads back byte for byte."""
    from fedscore.shared.protocol.flower_codec import bundle_pieces, payload_bytes, payload_record

    frames = [bytes([i]) * 100 for i in range(20)]
    bundle = join_bundle(frames)
    pieces = bundle_pieces(bundle, 350)
    assert b"".join(pieces) == bundle and all(len(p) <= 350 for p in pieces) and len(pieces) == 7
    boundaries = {8 + sum(116 for _ in range(k)) for k in range(21)}  # after the head and after each entry
    ends = [sum(len(p) for p in pieces[:k + 1]) for k in range(len(pieces))]
    assert set(ends) <= boundaries
    assert payload_bytes(payload_record(bundle)) == bundle and len(payload_record(bundle)) == 1
    assert payload_bytes(payload_record(b"not a bundle")) == b"not a bundle"


# -- a chunked run: the same run, in pieces -------------------------------------------------------------------------
class SavesRecorded(RecordingTransport):
    """Every envelope, and what each party's state save wrote after each message (files, bytes)."""

    def __init__(self, parties: dict) -> None:
        super().__init__(parties)
        self.saves: list[tuple[str, str, int, list[str], int]] = []

    def exchange(self, messages: list[Envelope]) -> list[Envelope]:
        replies = super().exchange(messages)
        for m in messages:
            last = self.parties[m.header.recipient].state_store.last
            self.saves.append((m.header.recipient, str(m.header.kind), m.header.round, last.written, last.bytes))
        return replies


@pytest.fixture(scope="module")
def chunked_runs(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list]]:
    """The same run with the smallest cap and with no cap, every envelope and every state save recorded."""
    out = {}
    for name, cap in (("tiny", TINY), ("whole", "exchange.chunk_bytes=0")):
        root = tmp_path_factory.mktemp(f"chunks-{name}")
        transport = SavesRecorded(_parties(root / "run", small_data))
        result = Coordinator(load_config(None, [*CHUNKY, cap]), transport).run()
        out[name] = (root / "run", transport.seen, transport.saves, result)
    return out


def test_a_tiny_cap_splits_every_exchange_and_each_chunk_stays_under_it(chunked_runs: dict) -> None:
    _, seen, _, result = chunked_runs["tiny"]
    replies = {(t["kind"], t["round"]): t["reply_chunks"] for t in result.traffic}
    assert all(replies[("embed", r)] >= 3 for r in range(3)) and all(replies[("train", r)] >= 3 for r in range(2))
    assert replies[("train", 2)] == 0 and replies[("align.match", -1)] == 1
    # the step table's count for each row is the count that crossed (8 float32 per user; gradients: training users)
    users = {"embed": int(result.alignment["intersection"]), "train": int(result.alignment["train"])}
    for row in plan(3)[4:]:
        counted = row.chunk_count(users[row.kind.value], 32, MIN_CHUNK_BYTES, result.run_id)
        assert replies[(row.kind.value, row.round)] == counted, row
    for message in seen:
        if message.header.payload_kind in (PayloadKind.EMBEDDINGS, PayloadKind.GRADIENTS):
            entries = bundle_entries(message.payload)
            assert len(entries) == message.header.chunks or message.header.sender == "server"
            assert max(len(e) for e in entries) <= MIN_CHUNK_BYTES
    _, _, _, whole = chunked_runs["whole"]
    assert {t["reply_chunks"] for t in whole.traffic if t["kind"] in ("embed", "train")} == {0, 1}


def test_chunking_changes_nothing_but_the_pieces(chunked_runs: dict) -> None:
    """Same metrics every round, same transcripts (one file per chunk when chunked), same model."""
    (tiny_dir, _, _, tiny), (whole_dir, _, _, whole) = chunked_runs["tiny"], chunked_runs["whole"]
    assert tiny.rounds == whole.rounds
    for party in ("payment", "lender"):
        a, b = collect(tiny_dir / "parties" / party, party), collect(whole_dir / "parties" / party, party)
        assert a is not None and b is not None and a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), (party, key)
        files = list((tiny_dir / "parties" / party / "transcript").glob("round-*-chunk-*.npz"))
        assert len(files) > len(list((whole_dir / "parties" / party / "transcript").glob("round-*.npz")))
    for party in ("payment", "lender"):
        model_a = read_state(tiny_dir / "parties" / party / "state.pt")["model"]
        model_b = read_state(whole_dir / "parties" / party / "state.pt")["model"]
        assert all(np.array_equal(model_a[k].numpy(), model_b[k].numpy()) for k in model_a)


def test_the_state_saves_only_what_changed(chunked_runs: dict) -> None:
    """The features, IDs, labels, rows and split are written once; each later step writes state.pt, what it
    changed (the payment holder's released embeddings) and its sealed reply, and far fewer bytes than the whole."""
    run_dir, _, saves, _ = chunked_runs["tiny"]

    def written(party: str, key: str) -> list[tuple[str, int]]:
        return [(kind, r) for p, kind, r, files, _ in saves if p == party for f in files if f.startswith(f"{key}-")]

    for party, once in (("payment", ("x", "ids", "rows", "split")), ("lender", ("x", "ids", "y", "raw", "rows",
                                                                             "split", "y_release"))):
        for key in once:
            assert len(written(party, key)) == 1, (party, key, written(party, key))
    assert len(written("payment", "released")) == 3  # one release per embed
    folder = run_dir / "parties" / "payment"
    whole = sum(f.stat().st_size for f in [folder / "state.pt", *(folder / ENTRIES_DIR).iterdir()])
    later = [b for p, kind, r, _, b in saves if p == "payment" and kind == "embed" and r > 0]
    assert later and max(later) < whole
    assert all(files[-1] == "state.pt" for *_, files, _ in saves)


def test_a_state_store_skips_unchanged_tensors_and_reads_back_whole(tmp_path: Path) -> None:
    import torch

    store = StateStore(tmp_path / "state.pt")
    state = {"config": "{}", "x": torch.arange(10.0), "ids": ["a", "b"], "model": {"w": torch.ones(2)}}
    first = store.save(state)
    assert sorted(f.split("-")[0] for f in first.written) == ["ids", "state.pt", "x"]
    second = store.save(state)
    assert second.written == ["state.pt"]  # same objects, unmodified: nothing but the small head
    state["x"].add_(1)  # in place: torch's version counter tells
    third = store.save(state)
    assert [f.split("-")[0] for f in third.written] == ["x", "state.pt"]
    state["ids"] = ["a", "c"]
    assert [f.split("-")[0] for f in store.save(state).written] == ["ids", "state.pt"]
    back = read_state(tmp_path / "state.pt")
    assert list(back) == list(state) and back["ids"] == ["a", "c"] and torch.equal(back["x"], state["x"])
    assert len(list((tmp_path / ENTRIES_DIR).iterdir())) == 2  # superseded entry files are gone
    fresh = StateStore(tmp_path / "state.pt")
    loaded = fresh.load()
    assert fresh.save(loaded).written == ["state.pt"]  # a reloaded state writes nothing it did not change


# -- meddling with chunks -------------------------------------------------------------------------------------------
def _rebundle(message: Envelope, edit: Callable[[list[bytes]], list[bytes]]) -> Envelope:
    entries = edit(bundle_entries(message.payload))
    payload = b"FSB1" + len(entries).to_bytes(4, "big") + b"".join(entries)
    return Envelope(header=message.header.model_copy(), payload=payload)


def _train0(edit: Callable[[list[bytes]], list[bytes]]) -> Callable[[Envelope], Envelope]:
    def meddle(m: Envelope) -> Envelope:
        return _rebundle(m, edit) if m.header.kind is K.TRAIN and m.header.round == 0 else m
    return meddle


def _flip(entries: list[bytes]) -> list[bytes]:
    out = list(entries)
    out[1] = out[1][:-1] + bytes([out[1][-1] ^ 1])
    return out


def _swap_and_keep_places(entries: list[bytes]) -> list[bytes]:
    """Chunks 2 and 3 swapped, each entry's index edited to its new place: the sequence numbers still tell."""
    out = list(entries)
    out[1], out[2] = entries[2], entries[1]
    out[1] = out[1][:0] + (1).to_bytes(4, "big") + out[1][4:]
    out[2] = out[2][:0] + (2).to_bytes(4, "big") + out[2][4:]
    return out


class _OldChunk:
    """Round 1's train gets a chunk of round 0's embeddings in place of its first: a chunk replayed across exchanges."""

    def __init__(self) -> None:
        self.first: list[bytes] = []

    def __call__(self, m: Envelope) -> Envelope:
        if m.header.kind is K.TRAIN and m.header.round == 0:
            self.first = bundle_entries(m.payload)
        if m.header.kind is K.TRAIN and m.header.round == 1:
            # its place (index 0, this exchange's count) claimed in clear; its sealed frame an old one
            return _rebundle(m, lambda e: [e[0][:8] + self.first[-1][8:], *e[1:]])
        return m


@pytest.mark.parametrize(("meddle", "reason"), [
    (_train0(lambda e: [e[0], *e[2:]]), r"dropped or added chunk in train round 0: chunk 1 says the exchange has "
                                        r"\d+ chunks, \d+ arrived"),
    (_train0(lambda e: e[:-1]), r"dropped or added chunk in train round 0"),
    (_train0(lambda e: [e[0], e[2], e[1], *e[3:]]), r"out of order chunk in train round 0: chunk 3 of \d+ arrived "
                                                    r"in place 2"),
    (_train0(lambda e: [e[0], e[0], *e[2:]]), r"replayed chunk in train round 0: chunk 1 of \d+ arrived in place 2"),
    (_train0(_swap_and_keep_places), r"out of order message: sequence \d+ from the peer, expected \d+ \(chunk 2 of"),
    (_train0(_flip), r"the embeddings payload for train round 0 fails authentication \(chunk 2 of \d+\)"),
    (_OldChunk(), r"replayed message: sequence \d+ from the peer, expected \d+ \(chunk \d+ of \d+ of train round 1\)"),
], ids=["dropped", "dropped last", "reordered", "replayed within", "reordered, places edited", "tampered",
        "replayed from an earlier exchange"])
def test_a_meddled_chunk_is_refused(small_data: Path, tmp_path: Path, meddle: Callable[[Envelope], Envelope],
                                    reason: str) -> None:
    class Meddler(InProcessTransport):
        def exchange(self, messages: list[Envelope]) -> list[Envelope]:
            return super().exchange([meddle(m) for m in messages])

    with pytest.raises(PartyRefused, match=reason) as caught:
        Coordinator(load_config(None, [*CHUNKY, TINY]), Meddler(_parties(tmp_path / "run", small_data))).run()
    assert caught.value.party == "lender"


# -- privacy accounting is unchanged --------------------------------------------------------------------------------
PRIVATE = ["training.rounds=3", "training.local_epochs=1", "training.batch_size=64", "baselines.enabled=false",
           "privacy.dpsgd_batch_size=256", "privacy.feature_epsilon=8", "model.payment_output=embedding",
           "model.embedding_dim=8"]


@pytest.mark.slow
def test_chunks_of_one_exchange_are_one_release(small_data: Path, tmp_path: Path) -> None:
    """The same private config with a tiny cap and with no cap: the same privacy-report epsilons and the same
    ledger records (kinds, counts, noise) in each party's home."""
    reports, records = {}, {}
    for name, cap in (("tiny", TINY), ("whole", "exchange.chunk_bytes=0")):
        homes = fresh_homes(tmp_path / name)
        run_inprocess(load_config(None, [*PRIVATE, cap]), small_data, tmp_path / name / "run", secret=SECRET,
                      homes=homes)
        reports[name] = json.loads((tmp_path / name / "run" / "privacy-report.json").read_text())
        records[name] = {
            party: [(e["guarantee"], [(m["kind"], m.get("noise_multiplier"), m.get("count")) for m in e["mechanisms"]])
                    for e in ledger_entries(home / PartyHome.LEDGER, party)]
            for party, home in homes.items()}
    tiny = json.loads((tmp_path / "tiny" / "run" / "outcome.json").read_text())
    assert max(t["reply_chunks"] for t in tiny["traffic"]) >= 3  # the tiny cap did split the exchanges
    eps = {n: [(g["protects"], g["against"], g["epsilon"]) for g in r["guarantees"]] for n, r in reports.items()}
    assert eps["tiny"] == eps["whole"] and len(eps["tiny"]) >= 3
    assert records["tiny"] == records["whole"]
    assert sum(len(v) for v in records["tiny"].values()) == sum(len(v) for v in records["whole"].values()) > 5


# -- under Flower: tests/test_federation.py runs its Flower-against-in-process comparison at the smallest cap and checks
# the chunks per exchange there (one federation start for both checks).
