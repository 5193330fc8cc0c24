"""The protocol in one process: it trains, beats the lender alone, is deterministic, and leaks no raw ID."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedscore.baselines import local_evaluation
from fedscore.clients.parties import make_party
from fedscore.local_parties import party_settings
from fedscore.runs import run_inprocess
from fedscore.server.coordinator import Coordinator
from fedscore.shared.config import load_config
from fedscore.shared.protocol.messages import Envelope
from fedscore.shared.protocol.transport import InProcessTransport
from fedscore.shared.run_folder import RunError
from tests.conftest import FAST, SECRET, make_party_data


@pytest.fixture(scope="module")
def run(party_data: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    data, _ = party_data
    run_dir = tmp_path_factory.mktemp("run") / "r"
    return run_dir, run_inprocess(load_config(None, FAST), data, run_dir, secret=SECRET)


def test_metrics_file_has_the_promised_shape(run: tuple[Path, dict]) -> None:
    run_dir, metrics = run
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["transport"] == "inprocess"
    assert set(on_disk["test"]) >= {"auc", "ks", "gini", "logloss", "brier"}
    assert "baselines" not in on_disk  # the lender's own evaluation and the operator's reference stay in parties/
    local = local_evaluation(run_dir)
    assert "auc" in local["lender_only"] and "auc" in local["centralized"] and len(local["train_loss"]) == 3
    assert len(on_disk["rounds"]) == 3 and "total_s" in on_disk["timing"]
    assert on_disk["test"] == metrics["test"]


def test_federated_beats_lender_only(run: tuple[Path, dict], party_data: tuple[Path, dict]) -> None:
    run_dir, metrics = run
    _, ids = party_data
    assert metrics["alignment"]["intersection"] == len(ids["payment"] & ids["lender"])
    assert metrics["test"]["auc"] > local_evaluation(run_dir)["lender_only"]["auc"] + 0.05
    assert metrics["test"]["auc"] > 0.7


@pytest.mark.slow
def test_same_seed_and_secret_same_model(run: tuple[Path, dict], party_data: tuple[Path, dict],
                                         tmp_path: Path) -> None:
    data, _ = party_data
    _, first = run
    again = run_inprocess(load_config(None, FAST), data, tmp_path / "again", secret=SECRET)
    assert again["test"] == first["test"]
    assert again["rounds"] == first["rounds"]
    other_seed = run_inprocess(load_config(None, [*FAST, "seed=1"]), data, tmp_path / "seed1", secret=SECRET)
    assert other_seed["test"]["auc"] != first["test"]["auc"]


class RecordingTransport(InProcessTransport):
    """Keeps every envelope the coordinator handles, as the coordinator holds it."""

    def __init__(self, parties: dict) -> None:
        super().__init__(parties)
        self.seen: list[Envelope] = []

    def exchange(self, messages: list[Envelope]) -> list[Envelope]:
        replies = super().exchange(messages)
        self.seen += [*messages, *replies]
        return replies


def test_coordinator_never_sees_a_raw_id(small_party_data: tuple[Path, dict], tmp_path: Path) -> None:
    data, ids = small_party_data
    parties = {n: make_party(s) for n, s in party_settings(tmp_path, data, SECRET).items()}
    transport = RecordingTransport(parties)
    Coordinator(load_config(None, [*FAST, "training.rounds=1", "baselines.enabled=false"]), transport).run()
    blob = b"".join(e.payload + e.header.model_dump_json().encode() for e in transport.seen)
    assert len(transport.seen) >= 10 and len(blob) > 10_000
    leaked = [i for i in ids["payment"] | ids["lender"] if i.encode() in blob]
    assert leaked == []


def test_empty_intersection_stops_with_the_lenders_reason(tmp_path: Path) -> None:
    make_party_data(tmp_path / "a", population=500, seed=1)
    make_party_data(tmp_path / "b", population=500, seed=2)
    # payment users renamed so nobody overlaps
    import pandas as pd

    frame = pd.read_parquet(tmp_path / "a" / "payment" / "features.parquet")
    frame["id"] = "x" + frame["id"]
    frame.to_parquet(tmp_path / "a" / "payment" / "features.parquet", index=False)
    with pytest.raises(RunError, match=r"lender.*empty intersection"):
        run_inprocess(load_config(None, FAST), tmp_path / "a", tmp_path / "run", secret=SECRET)
    outcome = json.loads((tmp_path / "run" / "outcome.json").read_text())
    assert outcome["error"]["party"] == "lender"
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_bad_data_names_file_and_column(tmp_path: Path) -> None:
    import pandas as pd

    make_party_data(tmp_path / "d", population=300)
    path = tmp_path / "d" / "lender" / "applicants.parquet"
    frame = pd.read_parquet(path)
    frame["age"] = frame["age"].astype(str)
    frame.loc[frame.index[3], "age"] = "forty"
    frame.to_parquet(path, index=False)
    with pytest.raises(RunError, match=r"applicants\.parquet: column age: non-numeric value 'forty'"):
        run_inprocess(load_config(None, FAST), tmp_path / "d", tmp_path / "run", secret=SECRET)
