"""Utility as the share of the lift kept: the two tuned references a federated AUC is measured between.

    lift_kept = (AUC_fed - AUC_lender_only) / (AUC_ceiling - AUC_lender_only)

Why not absolute AUC bars: on UCI the test-sampling error is ~0.006 per keyed split, so a fixed bar moves with the
split. Both references are tuned the same way (the same grid of HistGradientBoosting settings, each chosen on the
validation split, never on test) on the same aligned users and the same keyed train/val/test split as the
federation: the ceiling sees every column of both parties, the lender-only reference the lender's columns alone.
They depend on the split secret (which users align and where each lands) and the split fractions, not on the run's
seed: the GBDT's random_state is fixed.

This is the local operator's evaluation harness, like fedscore/baselines.py: it reads both parties' folders, which
only someone holding both (a demo, a simulation, a backtest) can do. Its figures land in
RUN_DIR/parties/evaluation/ (the local operator's simulation-only evaluation), the experiment's tables and the
operator's CLI output; never in model/, outcome.json or metrics.json. Results are cached on disk, keyed by the data
folder's content, the secret, the split fractions and the grid, so an experiment grid tunes each split's references
once. """

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from fedscore.shared.atomic import write_json_atomic, write_text_atomic
from fedscore.shared.config import FedConfig

# (learning rate, max leaf nodes, min samples per leaf, l2 regularization): 24 settings, as first swept by
# scripts/centralized_ceiling.py (which now calls this module)
GRID: tuple[tuple[float, int, int, float], ...] = tuple(
    itertools.product([0.03, 0.1], [7, 15, 31], [20, 200], [0.0, 1.0]))
# bump when the grid, the features or the model change: old cache entries then miss
CACHE_VERSION = "gbdt-v1"
EVALUATION_DIR = "parties/evaluation"  # beside the parties' own folders: the local operator's, never shared
REFERENCES_FILE = "references.json"
EVALUATION_README = ("Local simulation only: the operator holds both parties' data. The tuned lender-only and "
                     "centralized references and the lift kept are the operator's own evaluation "
                     "(fedscore/references.py); no party computed them, no privacy guarantee covers them, and "
                     "they never ship in model/.\n")
SIMULATION_ONLY = "local simulation only: the operator holds both parties' data"


class GbdtSetting(BaseModel):
    """One HistGradientBoosting setting of the grid."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    learning_rate: float
    max_leaf_nodes: int
    min_samples_leaf: int
    l2_regularization: float


class SettingScore(BaseModel):
    """A setting's validation and test AUC: the sweep keeps both so anyone can check the choice used validation."""

    model_config = ConfigDict(extra="forbid")
    setting: GbdtSetting
    val_auc: float
    test_auc: float


class ReferenceFit(BaseModel):
    """One tuned reference: the setting chosen on validation, its validation and test AUC, and the whole sweep."""

    model_config = ConfigDict(extra="forbid")
    columns: str  # "lender" or "all"
    setting: GbdtSetting
    val_auc: float
    test_auc: float
    sweep: list[SettingScore]


class References(BaseModel):
    """Both tuned references of one data folder under one split secret and split fractions."""

    model_config = ConfigDict(extra="forbid")
    lender_only: ReferenceFit
    ceiling: ReferenceFit
    users: int
    train: int
    val: int
    test: int
    test_fraction: float
    val_fraction: float
    data_hash: str
    cache_key: str

    @property
    def lender_only_auc(self) -> float:
        return self.lender_only.test_auc

    @property
    def ceiling_auc(self) -> float:
        return self.ceiling.test_auc


class NoLiftToKeep(ValueError):
    """The ceiling does not beat the lender-only reference: there is no lift to keep, so no share of it."""


def lift_kept(auc_fed: float, refs: References) -> float:
    """(AUC_fed - AUC_lender_only) / (AUC_ceiling - AUC_lender_only). 1 keeps all the lift pooling would give, 0 is
    no better than the lender alone, below 0 is worse. Raises NoLiftToKeep when the ceiling is not above the
    lender-only reference (the ratio would be meaningless or divide by zero)."""
    gap = refs.ceiling_auc - refs.lender_only_auc
    if not (math.isfinite(gap) and gap > 0):
        raise NoLiftToKeep(f"no lift to keep: the tuned ceiling's test AUC {refs.ceiling_auc:.4f} is not above the "
                           f"tuned lender-only test AUC {refs.lender_only_auc:.4f}")
    if not math.isfinite(auc_fed):
        raise ValueError(f"federated AUC {auc_fed} is not a number")
    return (auc_fed - refs.lender_only_auc) / gap


def lift_kept_or_nan(auc_fed: float, refs: References) -> tuple[float, str]:
    """(lift kept, "") or (NaN, the reason): for tables, where one bad split must not stop the rest."""
    try:
        return lift_kept(auc_fed, refs), ""
    except ValueError as exc:
        return float("nan"), str(exc)


def data_hash(data_dir: Path) -> str:
    """sha256 over every file of DIR/payment and DIR/lender (relative path and content): any change to either
    party's data or schema changes the key, whatever the mtimes say."""
    digest = hashlib.sha256()
    for party in ("payment", "lender"):
        root = Path(data_dir) / party
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(data_dir)).encode() + b"\0")
            with open(path, "rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()


def cache_key(content_hash: str, secret: bytes, test_fraction: float, val_fraction: float) -> str:
    """What the references depend on: the data, the secret, the split fractions and the grid (never the seed)."""
    parts = [CACHE_VERSION, content_hash, hashlib.sha256(secret).hexdigest(), repr(float(test_fraction)),
             repr(float(val_fraction)), repr(GRID)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def default_cache_dir() -> Path:
    """The operator's cache, beside the party homes in $FEDSCORE_HOME (never in a party's data folder), or the folder
    FEDSCORE_REFERENCES_CACHE names: one cache for several homes (a test run, an operator's experiments). Entries are
    keyed by the data's content, the split secret and fractions, so a shared folder never mixes up two settings."""
    from fedscore.shared.party_home import fedscore_home

    shared = os.environ.get("FEDSCORE_REFERENCES_CACHE")
    return Path(shared) if shared else fedscore_home() / "cache" / "references"


Fit = Callable[[GbdtSetting, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def fit_gbdt(setting: GbdtSetting, x: np.ndarray, y: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Fit one setting on the training users (early stopping on an internal 10% of them, never on validation or
    test) and score every user. random_state fixed: the references depend on the split, not on the run's seed."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(
        learning_rate=setting.learning_rate, max_leaf_nodes=setting.max_leaf_nodes,
        min_samples_leaf=setting.min_samples_leaf, l2_regularization=setting.l2_regularization, max_iter=1000,
        early_stopping=True, validation_fraction=0.1, n_iter_no_change=30, random_state=0)
    return model.fit(x[train], y[train]).predict_proba(x)[:, 1]


def _score(setting: GbdtSetting, x: np.ndarray, y: np.ndarray, split: np.ndarray, fit: Fit) -> SettingScore:
    """One setting's validation and test AUC. One OpenMP thread per fit: the same references on any machine
    (histogram sums do not depend on the core count), and on a busy machine several times faster than threads
    spinning against other jobs (measured 6x); `jobs` parallelizes over settings instead."""
    from threadpoolctl import threadpool_limits

    from fedscore.shared.metrics import auc

    with threadpool_limits(1):
        p = fit(setting, x, y, split == 0)
    val, test = split == 1, split == 2
    return SettingScore(setting=setting, val_auc=auc(y[val], p[val]), test_auc=auc(y[test], p[test]))


def reference_jobs() -> int:
    """Settings fitted in parallel: FEDSCORE_REFERENCE_JOBS, else every core (each fit is single-threaded)."""
    value = os.environ.get("FEDSCORE_REFERENCE_JOBS")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"FEDSCORE_REFERENCE_JOBS={value!r}: expected a whole number of processes") from None
    return max(1, min(len(GRID), os.cpu_count() or 1))


def sweep(x: np.ndarray, y: np.ndarray, split: np.ndarray, columns: str, fit: Fit = fit_gbdt,
          jobs: int = 1) -> ReferenceFit:
    """Every grid setting's validation and test AUC; the reference is the setting with the best VALIDATION AUC
    (the first on ties), reported at its test AUC. Choosing on test would be optimistic by the grid's spread."""
    train, val, test = split == 0, split == 1, split == 2
    if not (train.any() and val.any() and test.any()):
        raise ValueError(f"the split has {int(train.sum())} train, {int(val.sum())} validation and "
                         f"{int(test.sum())} test users: references need all three (split.val_fraction > 0)")
    settings = [GbdtSetting(learning_rate=lr, max_leaf_nodes=leaves, min_samples_leaf=min_leaf,
                            l2_regularization=l2) for lr, leaves, min_leaf, l2 in GRID]
    if jobs > 1:
        from joblib import Parallel, delayed

        scores = Parallel(n_jobs=jobs)(delayed(_score)(s, x, y, split, fit) for s in settings)
    else:
        scores = [_score(s, x, y, split, fit) for s in settings]
    best = max(range(len(scores)), key=lambda i: (-math.inf if math.isnan(scores[i].val_auc)
                                                  else scores[i].val_auc, -i))
    chosen = scores[best]
    return ReferenceFit(columns=columns, setting=chosen.setting, val_auc=chosen.val_auc, test_auc=chosen.test_auc,
                        sweep=scores)


def aligned_features(data_dir: Path, config: FedConfig, secret: bytes
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(lender columns, payment columns, labels, split) of the users both parties hold, aligned and split exactly as
    the federation does (keyed tokens, keyed split); each party's schema-clipped raw values, as the GBDT baseline
    sees them."""
    from fedscore.baselines import _preprocessed, aligned_tables

    aligned = aligned_tables(Path(data_dir), config, secret)
    return (_preprocessed(aligned.lender)[1][aligned.lender_rows],
            _preprocessed(aligned.payment)[1][aligned.payment_rows], aligned.labels, aligned.split)


def tuned_references(data_dir: Path, config: FedConfig, secret: bytes | str, cache_dir: Path | None = None,
                     fit: Fit = fit_gbdt) -> References:
    """The tuned lender-only reference and ceiling for this data folder and split secret, from the cache when the
    same data, secret, split fractions and grid were tuned before. `fit` is for tests (the default is the GBDT)."""
    secret_bytes = bytes.fromhex(secret) if isinstance(secret, str) else secret
    content = data_hash(Path(data_dir))
    key = cache_key(content, secret_bytes, config.split.test_fraction, config.split.val_fraction)
    cache_file = (cache_dir or default_cache_dir()) / f"{key}.json"
    if fit is fit_gbdt and cache_file.exists():
        try:
            return References.model_validate_json(cache_file.read_text())
        except ValueError:
            pass  # a damaged or older entry: recompute and overwrite
    lender_x, payment_x, y, split = aligned_features(Path(data_dir), config, secret_bytes)
    jobs = reference_jobs() if fit is fit_gbdt else 1
    refs = References(
        lender_only=sweep(lender_x, y, split, "lender", fit, jobs),
        ceiling=sweep(np.hstack([lender_x, payment_x]), y, split, "all", fit, jobs),
        users=len(y), train=int((split == 0).sum()), val=int((split == 1).sum()), test=int((split == 2).sum()),
        test_fraction=config.split.test_fraction, val_fraction=config.split.val_fraction, data_hash=content,
        cache_key=key)
    if fit is fit_gbdt:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache_file, refs.model_dump_json(indent=1))
    return refs


def evaluation_record(auc_fed: float | None, refs: References) -> dict[str, Any]:
    """What RUN_DIR/parties/evaluation/references.json holds: the federated test AUC, both references and the lift kept
    (NaN and the reason when there is no lift to keep)."""
    value, reason = (lift_kept_or_nan(auc_fed, refs) if auc_fed is not None
                     else (float("nan"), "no federated test AUC"))
    return {"scope": SIMULATION_ONLY, "federated_test_auc": auc_fed, "lender_only_auc": refs.lender_only_auc,
            "ceiling_auc": refs.ceiling_auc, "lift_kept": None if math.isnan(value) else value,
            "lift_kept_note": reason, "references": refs.model_dump()}


_PREFETCHES: dict[tuple[str, str], Any] = {}  # (data folder, secret) -> the process tuning them in the background


def _prefetch(data_dir: str, config_json: str, secret: str) -> None:
    os.nice(10)  # below the federation's own processes: it only fills the cache
    tuned_references(Path(data_dir), FedConfig.model_validate_json(config_json), secret)


def prefetch_references(data_dir: Path, config: FedConfig, secret: str) -> None:
    """Start tuning the references in a background process (one fit at a time, low priority), so a Flower
    federation, which spends most of its wall time waiting on messages, hides their cost; `write_evaluation` waits
    for it and then reads the cache. Any prefetch still running when the process exits is stopped."""
    import atexit
    import multiprocessing

    key = (str(Path(data_dir).resolve()), secret)
    if key in _PREFETCHES:
        return
    process = multiprocessing.get_context("spawn").Process(
        target=_prefetch, args=(key[0], config.model_dump_json(), secret), name="fedscore-references")
    previous = os.environ.get("FEDSCORE_REFERENCE_JOBS")
    os.environ["FEDSCORE_REFERENCE_JOBS"] = "1"  # the spawned child reads it at start
    try:
        process.start()
    finally:
        if previous is None:
            os.environ.pop("FEDSCORE_REFERENCE_JOBS")
        else:
            os.environ["FEDSCORE_REFERENCE_JOBS"] = previous
    _PREFETCHES[key] = process
    atexit.register(lambda: process.is_alive() and process.terminate())


def _await_prefetch(data_dir: Path, secret: str) -> None:
    process = _PREFETCHES.pop((str(Path(data_dir).resolve()), secret), None)
    if process is not None:
        process.join()


def write_evaluation(run_dir: Path, data_dir: Path, config: FedConfig, secret: str, auc_fed: float | None,
                     cache_dir: Path | None = None) -> dict[str, Any]:
    """Tune (or read from the cache) the references for a local run and write RUN_DIR/parties/evaluation/references.json
    with a README saying it is the local operator's simulation-only evaluation. Returns the record."""
    if cache_dir is None:
        _await_prefetch(data_dir, secret)  # a background tuning of the same references (Flower runs) fills the cache
    refs = tuned_references(data_dir, config, secret, cache_dir)
    record = evaluation_record(auc_fed, refs)
    folder = Path(run_dir) / EVALUATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "README.md", EVALUATION_README)
    write_json_atomic(folder / REFERENCES_FILE, record)
    return record


def read_evaluation(run_dir: Path) -> dict[str, Any] | None:
    """RUN_DIR/parties/evaluation/references.json, if this run has one (local runs with baselines.references on)."""
    path = Path(run_dir) / EVALUATION_DIR / REFERENCES_FILE
    return json.loads(path.read_text()) if path.exists() else None
