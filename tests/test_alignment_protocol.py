"""Private alignment and the blacklist check inside the protocol (shared/alignment/psi.py has the unit tests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from fedscore.blacklist_check import run_blacklist
from fedscore.clients.parties import make_party
from fedscore.clients.state_store import read_state
from fedscore.local_parties import party_settings
from fedscore.runs import run_inprocess
from fedscore.server.coordinator import Coordinator, check_blacklist
from fedscore.shared.config import load_config
from fedscore.shared.data.party_data import table_from_frame
from fedscore.shared.data.tables import DataError, read_table
from fedscore.shared.run_folder import RunError
from tests.conftest import FAST, SECRET, make_party_data
from tests.test_protocol import RecordingTransport


@pytest.mark.parametrize("protocol", ["x25519", "openmined"])
def test_alignment_json_and_both_parties_hold_the_same_ordered_users(small_party_data: tuple[Path, dict],
                                                                      tmp_path: Path, protocol: str) -> None:
    data, ids = small_party_data
    run_inprocess(load_config(None, [*FAST, "training.rounds=1", "baselines.enabled=false",
                                     f"alignment.psi={protocol}"]), data, tmp_path / "run", secret=SECRET)
    alignment = json.loads((tmp_path / "run" / "alignment.json").read_text())
    assert alignment["intersection"] == len(ids["payment"] & ids["lender"])
    assert alignment["payment_rows"] == len(ids["payment"]) and alignment["lender_rows"] == len(ids["lender"])
    assert alignment["method"] == "ecdh-psi"
    assert not any(isinstance(v, str) and v.startswith("u0") for v in alignment.values())

    def aligned(party: str, table: str) -> list[str]:
        state = read_state(tmp_path / "run" / "parties" / party / "state.pt")
        frame = pd.read_parquet(data / party / table)
        return [frame["id"].iloc[int(r)] for r in state["rows"]]

    payment_order = aligned("payment", "features.parquet")
    assert payment_order == aligned("lender", "applicants.parquet")
    assert set(payment_order) == ids["payment"] & ids["lender"]
    # each PSI key is used once and dropped: neither party's saved state keeps one after alignment
    assert "psi_prepared" not in read_state(tmp_path / "run" / "parties" / "payment" / "state.pt")
    assert "psi_state" not in read_state(tmp_path / "run" / "parties" / "lender" / "state.pt")


def _digests(user_id: str) -> list[bytes]:
    raw = user_id.encode()
    out = [raw]
    for algo in ("sha256", "sha1", "md5"):
        digest = hashlib.new(algo, raw)
        out += [digest.digest(), digest.digest()[:16], digest.hexdigest().encode()]
    return out


def test_nothing_the_coordinator_handles_holds_an_id_or_a_plain_hash_of_one(small_party_data: tuple[Path, dict],
                                                                            tmp_path: Path) -> None:
    data, ids = small_party_data
    parties = {n: make_party(s) for n, s in party_settings(tmp_path, data, SECRET).items()}
    transport = RecordingTransport(parties)
    Coordinator(load_config(None, [*FAST, "training.rounds=1", "baselines.enabled=false"]), transport).run()
    blob = b"".join(e.payload + e.header.model_dump_json().encode() for e in transport.seen)
    kinds = {e.header.payload_kind for e in transport.seen}
    assert {"psi_request", "psi_response", "alignment_tokens"} <= kinds
    sample = sorted(ids["payment"] | ids["lender"])[::3]
    assert len(sample) > 300
    assert [i for i in sample if any(d in blob for d in _digests(i))] == []


def _rewrite(path: Path, change) -> None:
    frame = pd.read_parquet(path)
    change(frame)
    frame.to_parquet(path, index=False)


def test_duplicate_ids_stop_with_the_file_and_rows(tmp_path: Path) -> None:
    make_party_data(tmp_path / "d", population=400)
    path = tmp_path / "d" / "lender" / "applicants.parquet"

    def duplicate(frame: pd.DataFrame) -> None:
        frame.loc[frame.index[5], "id"] = frame["id"].iloc[2]

    _rewrite(path, duplicate)
    with pytest.raises(RunError, match=r"applicants\.parquet: column id: 1 duplicate ID.*rows 2, 5"):
        run_inprocess(load_config(None, FAST), tmp_path / "d", tmp_path / "run", secret=SECRET)


def test_mixed_id_types_stop_with_a_clear_error() -> None:
    """Parquet columns are typed, and CSV ids are read as text, so mixed types reach a party only through a frame
    built in code; the same check guards that path."""
    frame = pd.DataFrame({"id": ["u1", 2, "u3"], "x": [1.0, 2.0, 3.0]})
    with pytest.raises(DataError, match=r"in-memory: column id: mixed ID types: 2 str and 1 int"):
        table_from_frame(frame, "in-memory")


def test_csv_ids_keep_their_leading_zeros(tmp_path: Path) -> None:
    path = tmp_path / "features.csv"
    path.write_text("id,x\n007,1\n7,2\n")
    table = table_from_frame(read_table(path, ["id"]), path)
    assert table.ids == ["007", "7"]


def test_blacklist_hits_stay_with_the_lender(tmp_path: Path) -> None:
    make_party_data(tmp_path / "b", population=600)
    applicants = pd.read_parquet(tmp_path / "b" / "lender" / "applicants.parquet")["id"].tolist()
    fraud = [*applicants[:7], "not-an-applicant-1", "not-an-applicant-2"]
    pd.DataFrame({"id": fraud}).to_parquet(tmp_path / "b" / "payment" / "fraud_list.parquet", index=False)
    hits = run_blacklist(tmp_path / "b", tmp_path / "run")
    assert set(pd.read_csv(hits)["id"]) == set(applicants[:7])

    parties = {n: make_party(s) for n, s in party_settings(tmp_path / "run2", tmp_path / "b", SECRET).items()}
    transport = RecordingTransport(parties)
    sizes = check_blacklist(transport)
    last = transport.seen[-1]  # the lender's final reply: nothing about the hits, not even a count
    assert last.payload == b"" and last.header.metrics == {} and last.header.body is None and last.header.ledger is None
    assert sizes["request_bytes"] > 0 and sizes["response_bytes"] > 0
