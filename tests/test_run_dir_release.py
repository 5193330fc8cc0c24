"""Nothing label-derived in RUN_DIR unaccounted: its top level holds only what reaches the coordinator.

RUN_DIR is the coordinator's folder: whoever runs `fedscore bundle` or reads the report works in it, and that may be
the payment holder. So its top-level files may hold only what the privacy report's `releases` names as leaving a
party for the coordinator: the validation/test-user metrics the lender chooses to share (per round, and the thinned
test ROC/KS curves), released counts (table, intersection and split sizes), payload sizes and timing, and ledger
records (mechanisms, no data); plus what the operator wrote itself (the run config, the launch record, the
checkpoint) and what is derived from those files alone (privacy-report.json, report.html). `model/` is walked by
tests/test_bundle_release.py; `parties/<party>/` is each party's OWN state folder (on its own machine in a
deployment) and is not walked here beyond its names.

A small private run with baselines on (so the lender's own evaluation and the operator's centralized reference
exist, to be kept out) is walked file by file and JSON key by key against the allow-list below; anything new fails.
The training loss, the lender-only baseline and the default rate must be in the lender's own evaluation file and in
no top-level file, by key or by value. The last tests plant such items and check that the walker catches them.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedscore.baselines import CENTRALIZED_FILE, local_evaluation
from fedscore.clients.lender.party import EVALUATION_FILE
from fedscore.runs import run_inprocess
from fedscore.shared.config import FedConfig, load_config
from fedscore.shared.metrics import METRIC_KEYS
from tests.conftest import SECRET, fresh_homes, make_party_data

PRIVATE = ["training.rounds=2", "training.local_epochs=1", "training.batch_size=64", "baselines.epochs=2",
           "privacy.dpsgd_batch_size=256", "privacy.dpsgd_lr=0.02"]


class Unaccounted(AssertionError):
    """An item in RUN_DIR's top level that no release names."""


# -- the allow-list ---------------------------------------------------------------------------------------------------
# A key path is a tuple of segments ("[]" for a list item). Pattern segments: a literal, PARTY, GUARANTEE (a
# ledger's guarantee key), METRIC (val_/test_ + a shared metric), ONE (any single segment), REST (any subtree: used
# only for mechanism records and the accountant's event tree, which hold no data). Each pattern names the release
# class it belongs to; the classes that leave a party must be named in the privacy report's `releases`.
PARTY, GUARANTEE, METRIC, ONE, REST = "<party>", "<guarantee>", "<metric>", "<one>", "<rest>"
RELEASED_AS = {  # release class -> how the privacy report's `releases` names it (a covered_by prefix), to coordinator
    "metrics": "unprotected: validation/test-user metrics the lender chooses to share",
    "counts": "unprotected: released counts",
    "sizes": "unprotected: sizes",
    "records": "public: mechanism records",
}
OPERATOR = {"config", "launch", "checkpoint", "report"}  # written by the operator / derived from the files above

ALIGNMENT = [((k,), "counts") for k in ("method", "payment_rows", "lender_rows", "intersection", "train", "val",
                                         "test")]
LEDGERS = [
    (("ledgers", PARTY, "budgets", GUARANTEE), "records"),
    *((("ledgers", PARTY, "entries", "[]", k), "records") for k in ("epsilon_after", "guarantee", "note", "run")),
    (("ledgers", PARTY, "entries", "[]", "mechanisms", "[]", REST), "records"),
]
RESULT = [  # server/coordinator.py RunResult: what the coordinator saw
    (("transport",), "sizes"), (("run_id",), "checkpoint"),
    (("rounds", "[]", "round"), "metrics"), (("rounds", "[]", METRIC), "metrics"),
    *((("alignment", *k), c) for k, c in ALIGNMENT),
    (("timing", ONE), "sizes"),
    *((("traffic", "[]", k), "sizes") for k in ("kind", "round", "to", "sent_bytes", "reply_bytes", "reply_chunks",
                                                                "reply_max_chunk_bytes", "seconds")),
    *LEDGERS,
    *((("curves", k, "[]"), "metrics") for k in ("fpr", "tpr", "population")),
]
FILES: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "config.json": [((REST,), "config")],  # checked by value: the validated run config
    "launch.json": [(("data",), "launch"), (("transport",), "launch"), (("budgets", PARTY, GUARANTEE), "launch"),
                    (("homes", PARTY), "launch"), (("party_timeout_s",), "launch"), (("insecure",), "launch")],
    "checkpoint.json": [(("run_id",), "checkpoint"), (("next_step",), "checkpoint"), (("total_steps",), "checkpoint"),
                        (("carry_kind",), "checkpoint"), (("carry_file",), "checkpoint"),
                        (("resumes",), "checkpoint"), *((("result", *k), c) for k, c in RESULT)],
    "outcome.json": [*RESULT, (("error",), "checkpoint"), (("error", ONE), "checkpoint")],
    "metrics.json": [
        (("evaluation_only",), "report"), (("transport",), "sizes"),
        *((("test", k), "metrics") for k in METRIC_KEYS), *((("val", k), "metrics") for k in METRIC_KEYS),
        (("rounds", "[]", "round"), "metrics"), (("rounds", "[]", METRIC), "metrics"),
        *((("alignment", *k), c) for k, c in ALIGNMENT),
        (("timing", ONE), "sizes"), (("traffic", "messages"), "sizes"), (("traffic", "payload_bytes"), "sizes"),
        (("e2e", "payloads"), "report"), (("e2e", "fingerprints", PARTY), "report"),
    ],
    "alignment.json": ALIGNMENT,
    "privacy-report.json": [
        *(((k,), "report") for k in ("delta", "enabled", "void", "run_id", "refusal")),
        (("refusal", ONE), "report"), (("notes", "[]"), "report"),
        (("settings", ONE), "config"),  # checked by value: the config's privacy section
        *((("guarantees", "[]", k), "report") for k in (
            "accountant", "against", "composition", "delta", "epsilon", "neighbouring", "protects", "run_epsilon",
            "scope", "status", "view")),
        # derived from the records' privacy profile (None where the guarantee has no labels to tell apart)
        (("guarantees", "[]", "attack_ceiling"), "records"), (("guarantees", "[]", "attack_ceiling", REST), "records"),
        (("guarantees", "[]", "held_by", "[]"), "report"), (("guarantees", "[]", "runs", "[]"), "report"),
        (("guarantees", "[]", "budget", PARTY), "records"),
        (("guarantees", "[]", "mechanisms", "[]", REST), "records"),
        (("guarantees", "[]", "dp_event", REST), "records"),
        *((("guarantees", "[]", "per_release", "[]", k), "records") for k in ("epsilon_after", "note", "party",
                                                                             "run")),
        *((("unprotected", "[]", k), "report") for k in ("against", "protects", "what")),
        *((("releases", PARTY, "[]", k), "report") for k in ("covered_by", "to", "what")),
    ],
}
# other top-level names: what each is, and why it may be there
OTHER = {
    "report.html": "rendered from metrics.json, outcome.json and privacy-report.json alone (checked below)",
    "run.lock": "an empty lock file",
    "model": "the bundle: walked by tests/test_bundle_release.py",
    "parties": "each party's OWN state folder (on its own machine in a deployment) and, in local runs, the shared "
               "secret and the operator's centralized reference",
}
PARTIES = {"payment", "lender", "shared-secret.hex", CENTRALIZED_FILE, "evaluation"}
FORBIDDEN_KEYS = ("train_loss", "lender_only", "default_rate", "baselines", "centralized")
METRIC_NAME = re.compile(rf"^(val|test)_({'|'.join(METRIC_KEYS)})$")


def _is_guarantee(segment: str) -> bool:
    from fedscore.shared.privacy.mechanisms import split_guarantee_key

    try:
        split_guarantee_key(segment)
    except ValueError:
        return False
    return True


def _segment_matches(pattern: str, segment: str) -> bool:
    if pattern == PARTY:
        return segment in ("payment", "lender")
    if pattern == GUARANTEE:
        return _is_guarantee(segment)
    if pattern == METRIC:
        return bool(METRIC_NAME.match(segment))
    if pattern == ONE:
        return segment != "[]"
    return pattern == segment


def _allowed(path: tuple[str, ...], patterns: list[tuple[tuple[str, ...], str]]) -> str | None:
    """The release class of the first pattern matching `path`, None if none does."""
    for pattern, release in patterns:
        if pattern and pattern[-1] == REST:
            head = pattern[:-1]
            if len(path) > len(head) and all(_segment_matches(p, s) for p, s in zip(head, path, strict=False)):
                return release
        elif len(pattern) == len(path) and all(_segment_matches(p, s) for p, s in zip(pattern, path, strict=True)):
            return release
    return None


def _leaves(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(value, dict):
        if not value:
            yield path, value
        for key, item in value.items():
            yield from _leaves(item, (*path, str(key)))
    elif isinstance(value, list):
        if not value:
            yield path, value
        for item in value:
            yield from _leaves(item, (*path, "[]"))
    else:
        yield path, value


def check_json(name: str, data: Any) -> set[str]:
    """Every key path of one top-level JSON file against its allow-list; returns the release classes seen."""
    seen = set()
    for path, value in _leaves(data):
        release = _allowed(path, FILES[name]) if path else None
        bad = [k for k in path if k in FORBIDDEN_KEYS]
        if bad and release != "config":  # the run config (checked by value) has a `baselines` switch
            raise Unaccounted(f"{name}: {'.'.join(path)}: {bad[0]} is the lender's own evaluation or the operator's "
                              "reference, never a top-level release")
        if release is not None:
            seen.add(release)
            continue
        if not path and not data:
            continue
        raise Unaccounted(f"{name}: key {'.'.join(path)!r} is on no allow-list (value {str(value)[:60]})")
    return seen


def walk_run_dir(run: Path) -> set[str]:
    """Walk RUN_DIR's top level; raise Unaccounted for the first item on no list. Returns the release classes."""
    seen: set[str] = set()
    for item in sorted(run.iterdir()):
        if item.name in FILES:
            seen |= check_json(item.name, json.loads(item.read_text()))
        elif item.name not in OTHER:
            raise Unaccounted(f"{item.name}: a top-level item on no allow-list")
    if (run / "run.lock").exists() and (run / "run.lock").read_bytes():
        raise Unaccounted("run.lock: not empty")
    names = {p.name for p in (run / "parties").iterdir()}
    if not names <= PARTIES:
        raise Unaccounted(f"parties/: {sorted(names - PARTIES)} is neither a party's folder nor a local-run file")
    return seen


def _values(evaluation: dict[str, Any]) -> list[float]:
    """Every number of the lender's own evaluation and the operator's reference, as JSON writes floats (repr)."""
    numbers = [evaluation.get("default_rate")]
    for reference in ("lender_only", "centralized"):
        numbers += list((evaluation.get(reference) or {}).values())
    numbers += evaluation.get("train_loss", [])
    return [float(v) for v in numbers if isinstance(v, float)]


# -- the run ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def private_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run-dir-release")
    make_party_data(root / "data", population=2500, seed=3)  # tests/test_bundle_release.py's data: its tuned references
    # and calibrations come from the test run's shared caches (tests/conftest.py) when that module ran first
    run_inprocess(load_config(None, PRIVATE), root / "data", root / "run", secret=SECRET, homes=fresh_homes(root))
    return root / "run"


@pytest.mark.slow
def test_the_run_dir_holds_only_named_releases(private_run: Path) -> None:
    run = private_run
    seen = walk_run_dir(run)
    assert {"metrics", "counts", "sizes", "records"} <= seen  # the walk did look at each kind
    # each kind that leaves a party for the coordinator is named in the privacy report's `releases`
    releases = json.loads((run / "privacy-report.json").read_text())["releases"]
    to_coordinator = [r["covered_by"] for items in releases.values() for r in items if r["to"] == "coordinator"]
    for release in seen - OPERATOR:
        assert any(c.startswith(RELEASED_AS[release]) for c in to_coordinator), (release, to_coordinator)
    # the values the operator wrote are what they claim to be
    config = FedConfig.model_validate_json((run / "config.json").read_text())
    assert json.loads((run / "config.json").read_text()) == json.loads(config.model_dump_json())
    settings = json.loads((run / "privacy-report.json").read_text())["settings"]
    assert settings == json.loads(config.privacy.model_dump_json())


@pytest.mark.slow
def test_label_derived_numbers_stay_in_the_lenders_folder(private_run: Path) -> None:
    run = private_run
    evaluation = json.loads((run / "parties" / "lender" / EVALUATION_FILE).read_text())
    assert {"default_rate", "lender_only", "rounds"} <= set(evaluation) and "never leaves" in evaluation["note"]
    assert [r["round"] for r in evaluation["rounds"]] == [0, 1]
    assert all(r["train_loss"] > 0 for r in evaluation["rounds"])
    local = local_evaluation(run)
    assert {"lender_only", "centralized", "default_rate", "train_loss"} <= set(local)
    # searched by value: the numbers with enough digits not to recur by chance (an AUC or KS on a small test split
    # is often a short fraction such as 0.1875, which a curve point may equal)
    numbers = [v for v in _values(local) if len(repr(v)) >= 12]
    assert len(numbers) >= 5 and local["default_rate"] in numbers and set(local["train_loss"]) <= set(numbers)
    for item in run.iterdir():
        if item.is_file():
            text = item.read_text()
            assert not [repr(v) for v in numbers if repr(v) in text], item.name
            assert not [k for k in ("train_loss", "lender_only", "default_rate") if k in text], item.name
    # the lender's replies carried none of it: the coordinator's outcome has only validation/test metrics per round
    outcome = json.loads((run / "outcome.json").read_text())
    assert all(set(r) - {"round"} and all(METRIC_NAME.match(k) for k in set(r) - {"round"}) for r in outcome["rounds"])


@pytest.mark.slow
def test_the_report_is_built_from_the_top_level_files_alone(private_run: Path, tmp_path: Path) -> None:
    """report.html shows nothing beyond the top-level JSON files: rebuilt without parties/, it is the same page."""
    from fedscore.report import render

    copy = tmp_path / "copy"
    shutil.copytree(private_run, copy, ignore=shutil.ignore_patterns("parties", "model"))
    assert render(copy).replace(str(copy), str(private_run)) == (private_run / "report.html").read_text()
    assert "lender only" not in (private_run / "report.html").read_text()


# -- the walker can fail --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, plant, match", [
    ("outcome.json", lambda d: d["rounds"][0].update(train_loss=0.69), "train_loss"),
    ("metrics.json", lambda d: d.update(baselines={"lender_only": {"auc": 0.7}}), "baselines"),
    ("outcome.json", lambda d: d.update(lender_only={"auc": 0.7}), "lender_only"),
    ("alignment.json", lambda d: d.update(default_rate=0.2), "default_rate"),
    ("metrics.json", lambda d: d["test"].update(train_auc=0.9), "train_auc"),
    ("outcome.json", lambda d: d["rounds"][0].update(train_auc=0.9), "train_auc"),
    ("privacy-report.json", lambda d: d.update(label_mean=0.2), "label_mean"),
])
@pytest.mark.slow
def test_the_walker_catches_planted_items(private_run: Path, name: str, plant: Any, match: str) -> None:
    data = json.loads((private_run / name).read_text())
    plant(data)
    with pytest.raises(Unaccounted, match=match):
        check_json(name, data)


@pytest.mark.slow
def test_the_walker_catches_a_new_file(private_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(private_run, copy, ignore=shutil.ignore_patterns("model"))
    walk_run_dir(copy)
    (copy / "lender-evaluation.json").write_text("{}")
    with pytest.raises(Unaccounted, match=r"lender-evaluation\.json"):
        walk_run_dir(copy)
    (copy / "lender-evaluation.json").unlink()
    (copy / "parties" / "labels.csv").write_text("id,label\n")
    with pytest.raises(Unaccounted, match=r"labels\.csv"):
        walk_run_dir(copy)
