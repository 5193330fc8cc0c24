"""The privacy guarantees attacked as a curious party would: replay, read the gradients, train twice.

An audit once rebuilt the randomized-response flip mask from the run's seed and recovered every clean label. These
tests play that payment holder against the fixed protocol (and against the VOID replayable mode, to show the
attacks have the power to catch a regression).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedscore.audit.label_leakage import replayed_flip_masks
from fedscore.budgets import default_budgets
from fedscore.cli import app
from fedscore.clients.parties import make_party
from fedscore.clients.state_store import read_state
from fedscore.local_parties import party_settings
from fedscore.runs import run_inprocess
from fedscore.server.coordinator import Coordinator
from fedscore.shared.config import FedConfig, load_config
from fedscore.shared.party_home import PartyHome
from fedscore.shared.privacy.ledger import ledger_entries
from fedscore.shared.protocol.messages import Envelope, unpack_arrays
from fedscore.shared.protocol.transport import InProcessTransport
from fedscore.shared.run_folder import RunError, RunFolder
from tests.conftest import SECRET, fresh_homes, make_party_data

LABEL_EPS = 2.0
CEILING = math.exp(LABEL_EPS) / (1 + math.exp(LABEL_EPS))  # randomized response's best possible accuracy, 0.881
# labels only (fast): RR at eps 2 and nothing else (not the default gradient noise either); the attack reads the
# gradients, which carry the released labels
LABELS_ONLY = ["training.rounds=2", "training.local_epochs=1", "training.batch_size=512", "baselines.enabled=false",
               "privacy.outsider_epsilon=none", f"privacy.label_epsilon={LABEL_EPS}",
               "privacy.gradient_noise_multiplier=none"]
# both label RR and DP-SGD on both parts: everything a released part rests on
PRIVATE = ["training.rounds=2", "training.local_epochs=1", "training.batch_size=64", "baselines.enabled=false",
           "privacy.dpsgd_batch_size=256", "privacy.dpsgd_local_epochs=1"]


class RecordingTransport(InProcessTransport):
    """Keeps every message the payment holder receives, as it reads them once its channel has opened the payload
    (it holds the key): the attacker's whole view of the exchange."""

    def __init__(self, parties: dict) -> None:
        super().__init__(parties)
        self.to_payment: list[Envelope] = []
        channel = parties["payment"].e2e
        receive = channel.receive

        def opened(message: Envelope) -> Envelope:
            plain = receive(message)
            self.to_payment.append(plain)
            return plain

        channel.receive = opened


def _run_recorded(config: FedConfig, data: Path, run_dir: Path) -> tuple[RecordingTransport, dict]:
    RunFolder(run_dir).create(config, SECRET)
    settings = party_settings(run_dir, data, SECRET, default_budgets(config), fresh_homes(run_dir.parent))
    parties = {name: make_party(s) for name, s in settings.items()}
    transport = RecordingTransport(parties)
    Coordinator(config, transport).run()
    return transport, parties


def _gradient_attack(gradients: np.ndarray, clean: np.ndarray) -> tuple[np.ndarray, float]:
    """Li et al.'s direction attack for a linear top: g_i = (p_i - y_i) v, so the sign along the dominant direction
    gives the label the gradient was computed from. Both orientations are tried against the truth (the strongest
    possible attacker)."""
    direction = np.linalg.svd(gradients - gradients.mean(0), full_matrices=False)[2][0]
    guess = (gradients @ direction < 0).astype(np.float32)
    best = max((guess, 1 - guess), key=lambda g: float((g == clean).mean()))
    return best, float((best == clean).mean())


def _replayed_flips(config: FedConfig, n_total: int, train: np.ndarray) -> list[np.ndarray]:
    """Every way the flip mask could be replayed from public values (fedscore.audit's replay attack): the old torch
    generator seeded from `seed`, and the VOID replayable stream (which a test-mode run uses)."""
    return list(replayed_flip_masks(config.seed, int(train.sum()), LABEL_EPS).values())


def _best_label_guess(transport: RecordingTransport, parties: dict, config: FedConfig) -> tuple[float, float]:
    """(best accuracy on the clean training labels over every attack, how well the released labels were read)."""
    lender, payment = parties["lender"], parties["payment"]
    lender.load_state()
    payment.load_state()
    train = (payment.state["split"] == 0).numpy()
    clean = lender.state["y"][lender.state["rows"]].numpy()[train]
    released = lender.state["y_release"].numpy()[train]
    received = [unpack_arrays(m.payload)["gradients"] for m in transport.to_payment
                if m.header.payload_kind == "gradients"]
    assert received, "the payment holder received no gradients"
    accuracies, read = [], 0.0
    for gradients in received:
        guess, accuracy = _gradient_attack(np.asarray(gradients), clean)
        read = max(read, float((guess == released).mean()))
        accuracies.append(accuracy)
        for flips in _replayed_flips(config, len(clean), train):
            accuracies.append(float((np.where(flips, 1 - guess, guess) == clean).mean()))
    return max(accuracies), read


@pytest.fixture(scope="module")
def big_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough training users (~10k) that the ceiling's +0.01 margin is > 3 standard errors."""
    out = tmp_path_factory.mktemp("big-data")
    make_party_data(out, population=30_000, seed=3)
    return out


@pytest.mark.slow
def test_payment_holder_cannot_beat_randomized_response(big_data: Path, tmp_path: Path) -> None:
    config = load_config(None, LABELS_ONLY)
    transport, parties = _run_recorded(config, big_data, tmp_path / "run")
    best, read = _best_label_guess(transport, parties, config)
    assert read > 0.97  # the gradient attack works: it reads the released labels almost exactly ...
    assert best <= CEILING + 0.01, (best, CEILING)  # ... and still cannot see past randomized response


@pytest.mark.slow
def test_the_same_attack_breaks_the_void_replayable_mode(big_data: Path, tmp_path: Path) -> None:
    """Negative control: with draws derived from the seed, the replay recovers the clean labels."""
    config = load_config(None, [*LABELS_ONLY, "privacy.replayable_noise=true"])
    transport, parties = _run_recorded(config, big_data, tmp_path / "run")
    best, _ = _best_label_guess(transport, parties, config)
    assert best > 0.97


def _part_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "model").glob("*.onnx"))}


def _released_labels(run_dir: Path) -> torch.Tensor:
    return read_state(run_dir / "parties" / "lender" / "state.pt")["y_release"]


@pytest.mark.slow
@pytest.mark.parametrize("replayable", [False, True])
def test_identical_runs_differ_unless_replayable(party_data: tuple[Path, dict], tmp_path: Path,
                                                 replayable: bool) -> None:
    """Same data, config, seed and secret (fresh party homes each): under the defaults the flips and both released
    parts differ; in the replayable test mode they are identical, and every report says VOID."""
    data, _ = party_data
    config = load_config(None, [*PRIVATE, f"privacy.replayable_noise={str(replayable).lower()}"])
    runs = [tmp_path / name / "run" for name in ("a", "b")]
    for run_dir in runs:
        run_inprocess(config, data, run_dir, secret=SECRET, homes=fresh_homes(run_dir.parent))
    flips_equal = torch.equal(_released_labels(runs[0]), _released_labels(runs[1]))
    parts = [_part_bytes(r) for r in runs]
    assert set(parts[0]) == set(parts[1]) and len(parts[0]) == 2
    reports = [json.loads((r / "privacy-report.json").read_text()) for r in runs]
    manifests = [json.loads((r / "model" / "manifest.json").read_text()) for r in runs]
    if replayable:
        assert flips_equal and parts[0] == parts[1]
        for report, manifest in zip(reports, manifests, strict=True):
            assert report["void"] and all(g["status"] == "VOID" for g in report["guarantees"])
            assert all(g["status"] == "VOID" for g in manifest["privacy"])
        assert "VOID" in (runs[0] / "report.html").read_text()
        # and the lender's scoring service refuses to serve it (the payment service's refusal: tests/test_scoring.py)
        refused = CliRunner().invoke(app, ["serve", "lender", "--model", str(runs[0] / "model"), "--data", str(data),
                                           "--payment-address", "127.0.0.1:9", "--insecure-payment"])
        assert refused.exit_code == 2 and "VOID" in refused.output
    else:
        assert not flips_equal
        assert all(parts[0][name] != parts[1][name] for name in parts[0])
        assert all(r["void"] is None for r in reports)
        assert "VOID" not in (runs[0] / "report.html").read_text()


@pytest.mark.slow
def test_a_second_training_composes_with_the_first_or_is_refused(party_data: tuple[Path, dict],
                                                                  tmp_path: Path) -> None:
    data, _ = party_data
    config = load_config(None, LABELS_ONLY)
    homes = fresh_homes(tmp_path)
    run_inprocess(config, data, tmp_path / "first", secret=SECRET, homes=homes)
    # the same parties, same people, default budgets (label eps 2 over the lender's lifetime): refused
    with pytest.raises(RunError, match=r"lender.*lender\.labels@payment.*budget 2"):
        run_inprocess(config, data, tmp_path / "second", secret=SECRET, homes=homes)
    # a lender that allows eps 4 over its lifetime: the second run composes with the first
    budgets = default_budgets(config)
    budgets["lender"] = {key: 4.0 * 1.0001 for key in budgets["lender"]}
    run_inprocess(config, data, tmp_path / "third", secret=SECRET, homes=homes, budgets=budgets)
    report = json.loads((tmp_path / "third" / "privacy-report.json").read_text())
    labels = next(g for g in report["guarantees"] if g["protects"] == "lender.labels" and g["against"] == "payment")
    assert len(labels["runs"]) == 2 and report["run_id"] in labels["runs"]
    assert labels["epsilon"] == pytest.approx(4.0, abs=0.01)  # two randomized responses at eps 2: pure eps adds
    assert labels["run_epsilon"] == pytest.approx(2.0, abs=0.01)
    # no DP-SGD, no gradient noise: the exchanges are charged as not DP, each run's mixture is its RR's eps
    assert labels["composition"] == "rr_mixture"
    assert len({e["run"] for e in ledger_entries(homes["lender"] / PartyHome.LEDGER, "lender")}) == 2
