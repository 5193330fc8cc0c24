"""`fedscore experiment` on a tiny grid (2 cells x 1 seed x 1 split): the three outputs, `--resume`, a bad grid."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedscore.cli import app
from tests.conftest import make_party_data

GRID = """
data = "data"
seeds = [0]
splits = 1
[grid]
"privacy.label_epsilon" = [1.0, 4.0]
[set]
"training.rounds" = 1
"baselines.enabled" = false
"privacy.outsider_epsilon" = "none"
"model.lender_hidden" = []     # linear (the default): a hidden layer learns too little in one round on 1,500 people
"model.lender_part" = "top"    # scored by the top trained on each cell's labels: the cells differ (the own GBDT part
                               # sees the clean labels and, in one round, no payment signal: the same in both cells)
"""


@pytest.mark.slow
def test_experiment_grid_outputs_and_resume(tmp_path: Path) -> None:
    make_party_data(tmp_path / "data", population=1500)
    (tmp_path / "grid.toml").write_text(GRID)
    out = tmp_path / "exp"
    args = ["experiment", "--grid", str(tmp_path / "grid.toml"), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ran 2 of 2 runs" in result.output

    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 2
    assert sorted(frame["privacy.label_epsilon"]) == [1.0, 4.0]
    assert (frame["error"].isna()).all()
    assert frame["test.auc"].between(0.5, 1.0).all()
    assert {"eps.lender.labels@payment", "test.ks", "test.gini", "test.logloss", "test.brier", "lender_only.auc",
            "wall_s", "seed", "split"} <= set(frame.columns)
    eps = frame.sort_values("privacy.label_epsilon")["eps.lender.labels@payment"].tolist()
    assert eps == pytest.approx([1.0, 4.0], rel=1e-3)
    # the lift kept between the split's tuned references, computed from the grid's data folder and secret (the
    # runs had baselines off: nothing in RUN_DIR feeds these)
    assert {"ref_lender_only_auc", "ref_ceiling_auc", "lift_kept"} <= set(frame.columns)
    assert frame["ref_ceiling_auc"].nunique() == 1 and frame["ref_lender_only_auc"].nunique() == 1  # one split
    assert (frame["ref_ceiling_auc"] > frame["ref_lender_only_auc"]).all()
    expected = (frame["test.auc"] - frame["ref_lender_only_auc"]) / (frame["ref_ceiling_auc"]
                                                                     - frame["ref_lender_only_auc"])
    assert frame["lift_kept"].tolist() == pytest.approx(expected.tolist())
    assert not any((out / "runs" / name / "parties" / "evaluation").exists() for name in frame["run"])
    markdown = (out / "results.md").read_text()
    assert sum(line.startswith("| c0") for line in markdown.splitlines()) == 2
    assert "lift_kept_median" in markdown and "lift_kept_min" in markdown and "## Frontier: lift kept" in markdown
    frontier = markdown.split("## Frontier: lift kept")[1]
    assert sum(line.startswith("| 1.0") or line.startswith("| 4.0") for line in frontier.splitlines()) == 2
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    csv_before = (out / "results.csv").read_text()
    stamps = {p.name: (p / "metrics.json").stat().st_mtime_ns for p in (out / "runs").iterdir() if p.is_dir()
              and not p.name.endswith("-homes")}
    assert len(stamps) == 2
    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert "ran 0 of 2 runs" in again.output
    assert (out / "results.csv").read_text() == csv_before
    assert stamps == {name: (out / "runs" / name / "metrics.json").stat().st_mtime_ns for name in stamps}

    without = CliRunner().invoke(app, args)  # an existing results.csv is never silently overwritten
    assert without.exit_code == 2 and "--resume" in without.output


def test_bad_grid_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "grid.toml").write_text(GRID + '[extra]\ncolour = "blue"\n')
    (tmp_path / "top.toml").write_text('data = "data"\nsedes = [0]\n')
    make_party_data(tmp_path / "data", population=200)
    (tmp_path / "cfg.toml").write_text('data = "data"\n[grid]\n"training.roundz" = [1]\n')
    (tmp_path / "nodata.toml").write_text('data = "nowhere"\n')
    for name, word in (("grid.toml", "extra"), ("top.toml", "sedes"), ("cfg.toml", "roundz"), ("nodata.toml", "data")):
        result = CliRunner().invoke(app, ["experiment", "--grid", str(tmp_path / name), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        assert word in result.output and str(tmp_path / name) in result.output.replace("\n", "")
        assert "Traceback" not in result.output
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_experiment_with_attacks_adds_the_attack_columns(tmp_path: Path) -> None:
    """`attacks = true`: every run is audited; the label attacks track the label eps (near the ceiling at eps 8,
    near chance at eps 0.2), and results.md carries their median and worst value."""
    make_party_data(tmp_path / "data", population=3000)
    grid = GRID.replace("[1.0, 4.0]", "[0.2, 8.0]").replace('"training.rounds" = 1', '"training.rounds" = 2')
    grid += '"privacy.gradient_noise_multiplier" = "none"  # randomized response alone: the attacks read its labels\n'
    (tmp_path / "grid.toml").write_text("attacks = true\n" + grid)
    out = tmp_path / "exp"
    result = CliRunner().invoke(app, ["experiment", "--grid", str(tmp_path / "grid.toml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "results.csv").set_index("privacy.label_epsilon")
    for column in ("attack.norm_auc", "attack.cosine_auc", "attack.label_inference_acc", "attack.cosine_auc.max",
                   "attack.membership_auc", "attack.label_ceiling"):
        assert frame[column].notna().all(), column
    assert frame.loc[8.0, "attack.cosine_auc"] > 0.9 > 0.65 > frame.loc[0.2, "attack.cosine_auc"]
    assert (frame["attack.cosine_auc"] <= frame["attack.label_ceiling"] + 0.05).all()
    assert (frame["attack.cosine_auc.max"] >= frame["attack.cosine_auc"]).all()
    assert "cosine_auc_max" in (out / "results.md").read_text()
    assert (out / "runs" / frame["run"].iloc[0] / "audit.json").exists()
