from pathlib import Path

import pytest

from fedscore.shared.config import ConfigError, load_config


def test_defaults_and_overrides() -> None:
    config = load_config(None, ["training.rounds=7", "model.payment_hidden=[16, 8]", "seed=3"])
    assert config.training.rounds == 7
    assert config.model.payment_hidden == [16, 8]
    assert config.seed == 3
    assert load_config().training.rounds != 7


def test_file_then_override(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("seed = 5\n[training]\nrounds = 2\nlr = 0.01\n")
    config = load_config(path, ["training.rounds=3"])
    assert (config.seed, config.training.rounds, config.training.lr) == (5, 3, 0.01)


@pytest.mark.parametrize(("override", "named"), [
    ("training.rounds=0", "training.rounds"),
    ("training.nonsense=1", "training.nonsense"),
    ("split.test_fraction=abc", "split.test_fraction"),
    ("rounds", "key=value"),
])
def test_bad_override_names_the_field(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[training\nrounds = 2")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config(tmp_path / "missing.toml")


def test_every_budget_form_goes_through_one_parser() -> None:
    """Node config, `serve payment --budget` and the runner's `--budget party:...` accept and refuse alike."""
    from fedscore.budgets import apply_budget_overrides
    from fedscore.shared.privacy.budgets import parse_budgets
    from fedscore.shared.run_folder import RunError

    budgets = parse_budgets("lender.labels@payment=2; joint.records@outsider=3")
    assert budgets == {"lender.labels@payment": 2.0, "joint.records@outsider": 3.0}
    assert parse_budgets(["lender.labels@payment=2", " joint.records@outsider=3"]) == budgets
    assert apply_budget_overrides({"lender": {}}, ["lender:lender.labels@payment=1.5"]) == {
        "lender": {"lender.labels@payment": 1.5}}
    for bad, why in (("lender.labels@payment", "expected guarantee=epsilon"), ("lender.labels@payment=x", "number")):
        with pytest.raises(ValueError, match=why):
            parse_budgets(bad)
        with pytest.raises(RunError, match=why):
            apply_budget_overrides({"lender": {}}, [f"lender:{bad}"])
    with pytest.raises(RunError, match="party:guarantee=epsilon"):
        apply_budget_overrides({"lender": {}}, ["bank:lender.labels@payment=1"])
