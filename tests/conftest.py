"""Shared fixtures: a small two-party dataset with a known structure, written in the on-disk layout."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedscore.shared.data.schema import ColumnSchema, DataSchema, LabelSchema, write_schema
from fedscore.shared.model.parts import configure_torch

os.environ.setdefault("FEDSCORE_TORCH_THREADS", "1")
# from the start, not from the first training on: a test that uses torch directly before any training would otherwise
# spin two intra-op threads against the other xdist worker (measured: a 3 s test took 144 s under `-n 2`)
configure_torch()
# never the user's ~/.fedscore: a session-wide default, replaced per test by `party_homes_in_tmp` below
os.environ["FEDSCORE_HOME"] = tempfile.mkdtemp(prefix="fedscore-test-home-")
# accountant answers shared by this test run (the xdist controller makes the folder, its workers inherit it) and the
# processes it starts, never by another test run or the user's own cache: the same calibrations recur across modules
_shared_cache = os.environ.get("FEDSCORE_TEST_RUN_ACCOUNTING_CACHE") if os.environ.get("PYTEST_XDIST_WORKER") else None
if not _shared_cache:
    _shared_cache = tempfile.mkdtemp(prefix="fedscore-test-accounting-")
    os.environ["FEDSCORE_TEST_RUN_ACCOUNTING_CACHE"] = _shared_cache
os.environ["FEDSCORE_ACCOUNTING_CACHE"] = _shared_cache
# likewise the tuned GBDT references (keyed by the data's content and the split secret): many modules train on the
# same make_party_data folder under the same SECRET, and each would otherwise tune them again in its fresh home
os.environ["FEDSCORE_REFERENCES_CACHE"] = str(Path(_shared_cache) / "references")


# the parties' public declarations for make_party_data's columns (chosen by hand, not from the generated rows)
PAYMENT_SCHEMA = DataSchema(columns=[
    ColumnSchema(name="spend", type="numeric", lower=0, upper=1_000_000, transform="log"),
    ColumnSchema(name="regularity", type="numeric", lower=-6, upper=6),
    ColumnSchema(name="night_share", type="numeric", lower=0, upper=1),
    ColumnSchema(name="devices", type="integer", lower=0, upper=20),
])
LENDER_SCHEMA = DataSchema(label=LabelSchema(), columns=[
    ColumnSchema(name="age", type="integer", lower=18, upper=100, reference=40),
    ColumnSchema(name="income_band", type="category", levels=[1, 2, 3, 4, 5, 6], transform="onehot", reference=3),
    ColumnSchema(name="requested_amount", type="numeric", lower=0, upper=1_000_000, transform="log",
                 reference=3000),
])


def make_party_data(out: Path, population: int = 4000, seed: int = 0) -> dict[str, set[str]]:
    """Payment features carry most of the signal, the lender's a little; ID sets overlap only partly."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"u{i:06d}" for i in rng.permutation(population)])
    z = rng.normal(size=population)  # latent stability, seen mostly through payment behaviour
    payment_mask = rng.random(population) < 0.8
    lender_mask = rng.random(population) < 0.6
    logit = -1.6 - 1.4 * z + 0.3 * rng.normal(size=population)
    label = (rng.random(population) < 1 / (1 + np.exp(-logit))).astype(int)
    payment = pd.DataFrame({
        "id": ids,
        "spend": np.exp(7 + 0.5 * z + 0.3 * rng.normal(size=population)),
        "regularity": z + 0.6 * rng.normal(size=population),
        "night_share": 1 / (1 + np.exp(2 * z + rng.normal(size=population))),
        "devices": rng.poisson(np.exp(0.5 - 0.3 * z)),
    })[payment_mask]
    lender = pd.DataFrame({
        "id": ids,
        "age": rng.integers(20, 70, size=population),
        "income_band": np.clip(np.round(3 + 0.4 * z + rng.normal(size=population)), 1, 6),
        "requested_amount": np.exp(8 + rng.normal(size=population)),
        "label": label,
    })[lender_mask]
    (out / "payment").mkdir(parents=True)
    (out / "lender").mkdir(parents=True)
    payment.to_parquet(out / "payment" / "features.parquet", index=False)
    lender.to_parquet(out / "lender" / "applicants.parquet", index=False)
    write_schema(out / "payment" / "schema.toml", PAYMENT_SCHEMA)
    write_schema(out / "lender" / "schema.toml", LENDER_SCHEMA)
    return {"payment": set(payment["id"]), "lender": set(lender["id"])}


@pytest.fixture(scope="session")
def party_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, set[str]]]:
    out = tmp_path_factory.mktemp("party-data")
    return out, make_party_data(out)


@pytest.fixture(scope="session")
def small_party_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, set[str]]]:
    """make_party_data at 1,200 people (~430 in both parties): for tests of the protocol's mechanics (alignment,
    what the coordinator sees), whose cost grows with the users (one X25519 exchange per ID and party, the training)
    and whose checks do not need party_data's 4,000."""
    out = tmp_path_factory.mktemp("small-party-data")
    return out, make_party_data(out, population=1200)


SECRET = "5e" * 16
# the protocol's mechanics, no privacy (tests/test_privacy_protocol.py covers the private runs); the tuned GBDT
# references (24 settings x 2, ~20 s) only where a test asks for them (tests/test_references.py)
FAST = ["training.rounds=3", "training.local_epochs=3", "training.batch_size=64", "training.lr=0.005",
        "baselines.epochs=8", "baselines.references=false", "privacy.enabled=false"]


@pytest.fixture(autouse=True)
def party_homes_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets fresh party homes (lifetime ledgers), never the user's ~/.fedscore."""
    home = tmp_path_factory.mktemp("fedscore-home")
    monkeypatch.setenv("FEDSCORE_HOME", str(home))
    return home


def fresh_homes(root: Path) -> dict[str, Path]:
    """Party homes of their own, for fixtures wider than one test (the autouse fixture covers single tests)."""
    return {party: root / "homes" / party for party in ("payment", "lender")}


# Seconds each module took in the fast tier (`make test-fast`, the sum of its tests' setup, call and teardown from
# `--durations=0`, two workers, load ~3; BENCHMARKS.md "Test tiers"), for the order below. Only the long ones: a
# module not listed counts as short and goes last. Remeasure when a module grows past a few seconds: one long
# module handed out last makes the other worker wait for it at the end.
FAST_TIER_SECONDS = {
    "tests/test_merged_gaussians.py": 34, "tests/test_dynamic.py": 25, "tests/test_bad_inputs.py": 24,
    "tests/test_privacy.py": 22, "tests/test_scoring.py": 20, "tests/test_lender_gbdt.py": 14,
    "tests/test_online_charges.py": 12, "tests/test_e2e.py": 12, "tests/test_label_accounting.py": 9,
    "tests/test_chunks.py": 9, "tests/test_alignment_protocol.py": 8, "tests/test_references.py": 6,
    "tests/test_synth_features.py": 6, "tests/test_psi.py": 6, "tests/test_resume_federation.py": 6,
    "tests/test_audit.py": 5, "tests/test_psi_x25519.py": 5, "tests/test_protocol.py": 4,
    "tests/test_privacy_protocol.py": 4, "tests/test_flower_patches.py": 3, "tests/test_ledger_store.py": 3,
    "tests/test_statistics_fit.py": 8,
}


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: the order is that of the tests that will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest first: under `--dist loadscope` each xdist worker takes the next module in collection order when it
    runs out of work, so a long module handed out last leaves the other worker idle at the end. The modules that
    start real Flower federations (the longest, tens of seconds each) go first, then those with `slow` tests (in
    `make test`; `make test-fast` has deselected them), then the rest by their known time in the fast tier
    (`FAST_TIER_SECONDS`; alphabetical among equals). The order within a module is kept (its module-scoped
    fixtures are shared in that order)."""
    def weight(module: str) -> tuple[int, int]:
        marks = {mark.name for item in by_module[module] for mark in item.iter_markers()}
        tier = 0 if "federation" in marks else 1 if "slow" in marks else 2
        return tier, -FAST_TIER_SECONDS.get(module, 0) if tier == 2 else 0  # `slow` ones: alphabetical, as before

    by_module: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_module.setdefault(item.nodeid.split("::")[0], []).append(item)
    stray = {m for m, its in by_module.items() if m not in FLOWER_MODULES
             and any(i.get_closest_marker("federation") for i in its)}
    if stray:  # the scheduler below groups the Flower modules by name: a new one must be listed there
        raise pytest.UsageError(f"federation tests outside FLOWER_MODULES (tests/conftest.py): {sorted(stray)}")
    items[:] = [item for module in sorted(by_module, key=weight) for item in by_module[module]]


# the modules that start real Flower federations: one xdist work unit, run one after another on one worker
FLOWER_MODULES = frozenset({"tests/test_deploy.py", "tests/test_federation.py", "tests/test_resume_federation.py"})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Under `--dist loadscope`, the Flower modules are one scope: one worker runs their federations one after the
    other while the other worker takes the in-process modules. Two federations at once (about 12 processes each,
    on 2 cores) slowed each other down to twice their time alone; the in-process tests mind much less."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FlowerModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "flower" if module in FLOWER_MODULES else module

    return FlowerModulesTogether(config, log)
