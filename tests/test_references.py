"""The lift kept and its two tuned references (fedscore/references.py): the arithmetic, selection on validation,
the on-disk cache, and what a local run writes (RUN_DIR/parties/evaluation/ only, shown in the CLI and report.html)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedscore import references
from fedscore.cli import app
from fedscore.references import (
    GRID,
    GbdtSetting,
    NoLiftToKeep,
    ReferenceFit,
    References,
    SettingScore,
    lift_kept,
    lift_kept_or_nan,
    sweep,
    tuned_references,
)
from fedscore.shared.config import load_config
from tests.conftest import FAST, SECRET, make_party_data


def _refs(lender_only: float, ceiling: float) -> References:
    setting = GbdtSetting(learning_rate=0.1, max_leaf_nodes=7, min_samples_leaf=20, l2_regularization=0.0)

    def fit(value: float, columns: str) -> ReferenceFit:
        return ReferenceFit(columns=columns, setting=setting, val_auc=value, test_auc=value,
                            sweep=[SettingScore(setting=setting, val_auc=value, test_auc=value)])

    return References(lender_only=fit(lender_only, "lender"), ceiling=fit(ceiling, "all"), users=10, train=7, val=1,
                      test=2, test_fraction=0.2, val_fraction=0.1, data_hash="x", cache_key="y")


def test_lift_kept_arithmetic() -> None:
    refs = _refs(0.62, 0.78)
    assert lift_kept(0.62, refs) == pytest.approx(0.0)
    assert lift_kept(0.78, refs) == pytest.approx(1.0)
    assert lift_kept(0.74, refs) == pytest.approx(0.75)
    assert lift_kept(0.60, refs) == pytest.approx(-0.125)  # worse than the lender alone: negative, not clipped
    assert lift_kept(0.80, refs) == pytest.approx(1.125)


@pytest.mark.parametrize("ceiling", [0.62, 0.61, float("nan")])
def test_no_lift_to_keep_is_a_clear_error(ceiling: float) -> None:
    refs = _refs(0.62, ceiling)
    with pytest.raises(NoLiftToKeep, match=r"not above the tuned lender-only test AUC 0\.6200"):
        lift_kept(0.7, refs)
    value, reason = lift_kept_or_nan(0.7, refs)
    assert math.isnan(value) and "no lift to keep" in reason
    assert lift_kept_or_nan(0.7, _refs(0.6, 0.8)) == (pytest.approx(0.5), "")


@pytest.mark.slow
def test_the_reference_is_chosen_on_validation_not_on_test() -> None:
    """One setting ranks the validation users perfectly, another the test users: the sweep must pick the first and
    report its (worse) test AUC, not the grid's best test AUC."""
    rng = np.random.default_rng(0)
    n = 600
    y = (rng.random(n) < 0.3).astype(int)
    split = rng.choice([0, 1, 2], size=n, p=[0.6, 0.2, 0.2])
    x = rng.normal(size=(n, 2))
    val_winner, test_winner = GRID[5], GRID[17]
    noise = {s: rng.random(n) for s in GRID}

    def fake_fit(setting: GbdtSetting, x_: np.ndarray, y_: np.ndarray, train: np.ndarray) -> np.ndarray:
        key = (setting.learning_rate, setting.max_leaf_nodes, setting.min_samples_leaf, setting.l2_regularization)
        p = noise[key].copy()
        if key == val_winner:
            p[split == 1] = y[split == 1] * 0.9 + 0.05 * p[split == 1]
        if key == test_winner:
            p[split == 2] = y[split == 2] * 0.9 + 0.05 * p[split == 2]
        return p

    fit = sweep(x, y, split, "all", fake_fit)
    chosen = (fit.setting.learning_rate, fit.setting.max_leaf_nodes, fit.setting.min_samples_leaf,
              fit.setting.l2_regularization)
    assert chosen == val_winner
    assert fit.val_auc == pytest.approx(1.0)
    assert fit.test_auc < 0.7  # the val winner is noise on test
    assert max(s.test_auc for s in fit.sweep) == pytest.approx(1.0)  # the test winner was there, and not chosen
    assert len(fit.sweep) == len(GRID)
    assert sweep(x, y, split, "all", fake_fit, jobs=2) == fit  # settings fitted in parallel: the same choice


def test_tuned_references_on_data_cache_hit_and_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    make_party_data(data, population=1500)
    config = load_config(None, [])
    cache = tmp_path / "cache"
    refs = tuned_references(data, config, SECRET, cache)
    for fit in (refs.lender_only, refs.ceiling):  # chosen as the argmax of validation AUC over the sweep
        best = max(fit.sweep, key=lambda s: s.val_auc)
        assert fit.setting == best.setting and fit.test_auc == best.test_auc and fit.val_auc == best.val_auc
    assert refs.train + refs.val + refs.test == refs.users > 500
    # the payment columns carry most of the signal (conftest): the ceiling is well above the lender alone
    assert refs.ceiling_auc > refs.lender_only_auc + 0.05
    assert len(list(cache.glob("*.json"))) == 1

    calls: list[bytes] = []

    def spy(data_dir: Path, config_: object, secret: bytes) -> None:
        calls.append(secret)
        raise RuntimeError("recomputed")

    monkeypatch.setattr(references, "aligned_features", spy)
    again = tuned_references(data, config, SECRET, cache)  # the same data, secret and fractions: from the cache
    assert calls == [] and again == refs
    with pytest.raises(RuntimeError, match="recomputed"):  # another secret: a miss
        tuned_references(data, config, "7a" * 16, cache)
    assert calls == [bytes.fromhex("7a" * 16)]
    with pytest.raises(RuntimeError, match="recomputed"):  # other split fractions: a miss
        tuned_references(data, load_config(None, ["split.val_fraction=0.2"]), SECRET, cache)
    changed = tmp_path / "changed"
    shutil.copytree(data, changed)
    schema = changed / "payment" / "schema.toml"
    schema.write_text(schema.read_text() + "\n")
    assert references.data_hash(changed) != references.data_hash(data)  # changed data: a different key


@pytest.mark.slow
def test_local_run_prints_and_writes_the_lift_kept(party_data: tuple[Path, dict], tmp_path: Path) -> None:
    """`fedscore train` prints the lift kept beside the AUCs; the figures land in RUN_DIR/parties/evaluation/ only
    (with a README saying it is a local simulation) and in the operator's copy of report.html there, labelled as
    such; not in
    metrics.json/outcome.json."""
    data, _ = party_data
    (tmp_path / "secret.hex").write_text(SECRET)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--secret-file", str(tmp_path / "secret.hex")]
    for item in [*FAST, "training.rounds=1", "baselines.references=true"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "lift kept:" in output and "lender only" in output and "ceiling" in output

    record = json.loads((run / "parties" / "evaluation" / "references.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert record["federated_test_auc"] == metrics["test"]["auc"]
    expected = (record["federated_test_auc"] - record["lender_only_auc"]) / (
        record["ceiling_auc"] - record["lender_only_auc"])
    assert record["lift_kept"] == pytest.approx(expected)
    assert f"{record['lift_kept']:.0%} of the lift" in output
    assert "local simulation only" in (run / "parties" / "evaluation" / "README.md").read_text().lower()
    for name in ("metrics.json", "outcome.json"):
        text = (run / name).read_text()
        assert "lift_kept" not in text and "ceiling" not in text
    html = (run / "parties" / "evaluation" / "report.html").read_text()  # the operator's copy, with the lift kept
    assert "local simulation only: the operator holds both parties&#39; data" in html
    assert "Lift kept" not in (run / "report.html").read_text()  # RUN_DIR's top level: no clean-label references
    assert f"{record['ceiling_auc']:.4f}" in html and f"{record['lift_kept']:.1%}" in html

    quiet = tmp_path / "quiet"  # baselines.references=false: no evaluation folder, no line
    args = [*[a if a != str(run) else str(quiet) for a in args][:-2], "--set", "baselines.references=false"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not (quiet / "parties" / "evaluation").exists() and "lift kept" not in result.output
    assert "Lift kept" not in (quiet / "report.html").read_text()
