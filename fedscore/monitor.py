"""Monthly monitoring of a trained model: population stability (PSI) per column, characteristic analysis, score
drift, and once outcomes mature, realised AUC, KS and bad rate per score band against the expected (issue 21).

Who computes what. Each party bins its own columns on PUBLIC bins (the schema's declared bounds on its transformed
scale, `BINS` equal steps; a category per level), for the training reference (the run's data folder) and for the
month's snapshot:
- The payment holder releases only noisy bin counts (Gaussian mechanism, CSPRNG noise): one user moves one count in
  each of its D columns, so the count vector has L2 sensitivity sqrt(2 D) under replace-one (clip sqrt(D),
  sensitivity sqrt(2) in its units). Each release is charged to the payment holder's lifetime ledger under
  payment.features@lender before it leaves (the same records the training's releases use), and kept in its home
  (`monitor/`), so asking again for the same month or reference releases nothing new. The lender (who runs the
  monitoring) computes the payment columns' PSI from these noisy counts; bins whose noisy reference share is small
  are merged with a neighbour (post-processing of the released reference counts, free), and each month's counts
  are released on those merged bins, so the noise falls on few, full bins and does not read as drift.
- The lender's own columns, the scores and the labels never leave the lender: monitor.json and monitor.html are the
  lender's files (its characteristic analysis, score distribution, realised AUC/KS and bad rates per band).
Scores come from the exported model (fedscore.scoring.score_batch, as `fedscore score`): a local operator holds both
folders here; in a deployment the lender gets the partial logits from `serve payment`, whose guard charges each
answer.

Traffic lights: PSI < 0.1 stable, 0.1-0.25 watch, > 0.25 act (the industry's thresholds).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedscore.shared.atomic import write_json_atomic, write_text_atomic
from fedscore.shared.data.party_data import PartyTable
from fedscore.shared.data.schema import ColumnSchema, DataSchema
from fedscore.shared.data.tables import DataError
from fedscore.shared.run_folder import RunFolder

PSI_WATCH, PSI_ACT = 0.1, 0.25
BINS = 20
MIN_REFERENCE_SHARE = 0.05  # merge bins until each holds this much of the (noisy) reference
SHARE_FLOOR = 1e-4  # keeps PSI finite when a bin empties
MONITOR_GUARANTEE = "payment.features@lender"
# noise std per count = NOISE_MULTIPLIER * sqrt(D); eps per release ~0.7 at delta 1e-6 for the synthetic payment
# columns (BENCHMARKS.md "Issue 21"); 24 monthly releases + the reference compose to ~3.3
DEFAULT_NOISE_MULTIPLIER = 10.0
DEFAULT_MONITOR_BUDGET = 4.0
DEFAULT_DELTA = 1e-6
SCORE_EDGES = [500.0 + 20.0 * i for i in range(9)]  # public points bands: < 500, 500-520, ..., >= 660
MONITOR_FILE, HTML_FILE = "monitor.json", "monitor.html"


class MonitorError(ValueError):
    """Monitoring cannot run (missing model, data, month); the message names the file or option."""


def light(psi: float) -> str:
    return "stable" if psi < PSI_WATCH else "watch" if psi <= PSI_ACT else "act"


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index sum (c - r) ln(c / r) over bins, on shares floored at SHARE_FLOOR."""
    r = np.maximum(np.asarray(reference, float), 0.0)
    c = np.maximum(np.asarray(current, float), 0.0)
    r = np.maximum(r / max(r.sum(), 1e-12), SHARE_FLOOR)
    c = np.maximum(c / max(c.sum(), 1e-12), SHARE_FLOOR)
    return float(np.sum((c - r) * np.log(c / r)))


def _forward(values: np.ndarray, column: ColumnSchema) -> np.ndarray:
    return np.sign(values) * np.log1p(np.abs(values)) if column.transform == "log" else values


def bin_codes(values: np.ndarray, column: ColumnSchema) -> tuple[np.ndarray, int]:
    """Each value's public bin: its level for a category/levelled column, else one of BINS equal steps of the
    declared bounds on the column's transformed scale (values outside are clipped, as training does)."""
    values = np.asarray(values, float)
    if column.levels is not None:
        levels = np.asarray(column.levels, float)
        idx = np.abs(values[:, None] - levels[None, :]).argmin(axis=1)
        return idx, len(levels)
    lo, hi = column.bounds
    flo, fhi = _forward(np.array([lo, hi], float), column)
    x = _forward(np.clip(values, lo, hi), column)
    idx = np.floor((x - flo) / max(fhi - flo, 1e-12) * BINS).astype(np.int64)
    return np.clip(idx, 0, BINS - 1), BINS


def histograms(table: PartyTable, schema: DataSchema) -> dict[str, np.ndarray]:
    counts = {}
    for j, name in enumerate(table.columns):
        codes, n = bin_codes(table.values[:, j], schema.column(name))
        counts[name] = np.bincount(codes, minlength=n).astype(float)
    return counts


def merge_plan(reference: np.ndarray, min_share: float = MIN_REFERENCE_SHARE) -> list[list[int]]:
    """Adjacent bins grouped until each group holds min_share of the reference (a function of released counts)."""
    r = np.maximum(reference, 0.0)
    total = max(r.sum(), 1e-12)
    groups: list[list[int]] = []
    current: list[int] = []
    mass = 0.0
    for i, v in enumerate(r):
        current.append(i)
        mass += v
        if mass / total >= min_share:
            groups.append(current)
            current, mass = [], 0.0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return groups


def apply_plan(counts: np.ndarray, plan: list[list[int]]) -> np.ndarray:
    return np.array([counts[g].sum() for g in plan])


# ------------------------------------------------------------------------------------------ the payment holder


@dataclass
class PaymentRelease:
    """Noisy bin counts of every payment column for one data folder, as released (cached in the payment home)."""

    key: str
    counts: dict[str, list[float]]
    noise_multiplier: float
    epsilon_after: float | None  # the guarantee's lifetime eps right after this release was charged
    fresh: bool  # charged now (False: the cached release of an earlier call)


def _data_key(folder: Path) -> str:
    """What a release is of: the payment table's bytes (the same month asked twice releases nothing new)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("transactions.*")) or sorted(Path(folder).glob("features.*")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def payment_release(folder: Path, home: Path, budget: float, noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER,
                    delta: float = DEFAULT_DELTA, what: str = "",
                    plan: dict[str, list[list[int]]] | None = None) -> PaymentRelease:
    """The payment holder's side: featurise its folder, bin on public bins (grouped by `plan`, which is computed
    from an earlier release: the reference's noisy counts), add Gaussian noise, charge, release. Each user still
    adds one count per column, so grouping leaves the sensitivity as it is and spreads the noise over fewer,
    fuller bins.

    BudgetExceeded (from the ledger) when the budget would be overspent: nothing is drawn or released."""
    from fedscore.clients.payment.data import load_payment_table
    from fedscore.shared.party_home import PartyHome, ensure_party_home
    from fedscore.shared.privacy.ledger import Ledger
    from fedscore.shared.privacy.mechanisms import GaussianRelease
    from fedscore.shared.privacy.secure_random import NoiseSource

    home = ensure_party_home(home)
    key = _data_key(folder)
    if plan is not None:
        key = hashlib.sha256((key + json.dumps(plan, sort_keys=True)).encode()).hexdigest()[:24]
    cache = PartyHome(home).monitor / f"release-{key}.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        return PaymentRelease(key, saved["counts"], saved["noise_multiplier"], saved.get("epsilon_after"), False)
    table = load_payment_table(folder)
    assert table.schema is not None
    exact = histograms(table, table.schema)
    if plan is not None:
        exact = {name: apply_plan(c, plan[name]) for name, c in exact.items()}
    d = len(exact)
    record = GaussianRelease(noise_multiplier=noise_multiplier, sensitivity=math.sqrt(2.0), clip=math.sqrt(d),
                             count=1, protects="payment.features", seen_by="lender", neighbouring="replace_one")
    ledger = Ledger(PartyHome(home).ledger, {MONITOR_GUARANTEE: budget}, delta, party="payment",
                    run=f"monitor:{key[:12]}")
    eps = ledger.charge([record], MONITOR_GUARANTEE,
                        note=f"monitoring: noisy bin counts of {d} payment columns ({what or folder})")
    source = NoiseSource()  # keyed from the OS: the noise a guarantee rests on
    std = noise_multiplier * math.sqrt(d)
    noisy = {name: (c + source.normal(c.shape, std).double().numpy()).tolist() for name, c in exact.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache, {"counts": noisy, "noise_multiplier": noise_multiplier, "epsilon_after": eps,
                              "what": what, "record": record.to_dict()})
    return PaymentRelease(key, noisy, noise_multiplier, eps, True)


# ------------------------------------------------------------------------------------------------ the lender


@functools.lru_cache(maxsize=4)
def _score_cached(model_dir: str, data_dir: str, stamp: float) -> Any:
    from fedscore.scoring import score_batch

    return score_batch(Path(model_dir), Path(data_dir))


def _score(model_dir: Path, data_dir: Path):
    """score_batch, kept for the process (the reference is scored once for all the months of one call)."""
    stamp = max(p.stat().st_mtime for p in Path(model_dir).iterdir())
    return _score_cached(str(Path(model_dir).resolve()), str(Path(data_dir).resolve()), stamp).copy()


def _lender_table(folder: Path) -> tuple[PartyTable, DataSchema, np.ndarray]:
    from fedscore.clients.lender.data import load_lender_table

    table, labels = load_lender_table(folder)
    assert table.schema is not None
    return table, table.schema, labels


def realised(model_dir: Path, cohort_dir: Path) -> dict[str, Any]:
    """A matured cohort scored with the model: AUC, KS, bad rate, and per tier the expected (mean predicted
    probability) against the realised bad rate (calibration)."""
    from fedscore.shared.metrics import auc, ks

    scores = _score(model_dir, cohort_dir)
    _, _, labels = _lender_table(cohort_dir / "lender")
    p = scores["probability"].to_numpy()
    bands = []
    for tier in sorted(scores["tier"].unique()):
        mask = (scores["tier"] == tier).to_numpy()
        bands.append({"band": str(tier), "n": int(mask.sum()), "expected": float(p[mask].mean()),
                      "realised": float(labels[mask].mean())})
    return {"auc": float(auc(labels, p)), "ks": float(ks(labels, p)), "bad_rate": float(labels.mean()),
            "expected_bad_rate": float(p.mean()), "n": len(labels), "bands": bands}


def _score_counts(points: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(SCORE_EDGES, points, side="right"), minlength=len(SCORE_EDGES) + 1).astype(float)


def _column_rows(ref: dict[str, np.ndarray], cur: dict[str, np.ndarray], merge: bool) -> dict[str, dict[str, Any]]:
    rows = {}
    for name in ref:
        plan = merge_plan(ref[name]) if merge else [[i] for i in range(len(ref[name]))]
        r, c = apply_plan(np.asarray(ref[name]), plan), apply_plan(np.asarray(cur[name]), plan)
        value = psi(r, c)
        rs, cs = (np.maximum(v, 0) / max(np.maximum(v, 0).sum(), 1e-12) for v in (r, c))
        rows[name] = {"psi": round(value, 5), "light": light(value), "bins": plan,
                      "reference_share": np.round(rs, 5).tolist(), "current_share": np.round(cs, 5).tolist()}
    return rows


@dataclass
class MonitorInputs:
    model_dir: Path
    run_dir: Path
    reference_data: Path
    month_data: Path
    month: int
    cohort_data: Path | None  # the matured cohort (month - performance window), if any
    cohort: int | None


def resolve(model: Path, data: Path, month: int) -> MonitorInputs:
    """--model RUN_DIR (or RUN_DIR/model), --data ROOT of `data synth --months` (or one month folder), --month K."""
    from fedscore.synth_monthly import month_folder, read_meta

    model = Path(model)
    run_dir = model.parent if model.name == "model" else model
    model_dir = RunFolder(run_dir).model
    if not (model_dir / "manifest.json").exists():
        raise MonitorError(f"{model}: no model/manifest.json (give a finished run folder or its model/)")
    launch = RunFolder(run_dir).launch
    if not launch.exists():
        raise MonitorError(f"{run_dir}: no launch.json: the training data (the reference) is unknown")
    reference = Path(json.loads(launch.read_text())["data"])
    if not reference.is_dir():
        raise MonitorError(f"{reference}: the run's training data (the reference) is gone")
    try:
        meta = read_meta(data)
        meta.month(month)
    except ValueError as exc:
        raise MonitorError(str(exc)) from None
    cohort = month - meta.performance_window
    return MonitorInputs(model_dir, run_dir, reference, month_folder(data, month), month,
                         month_folder(data, cohort) if cohort >= 1 else None, cohort if cohort >= 1 else None)


def monitor_month(inputs: MonitorInputs, payment_home: Path, budget: float = DEFAULT_MONITOR_BUDGET,
                  noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER, delta: float = DEFAULT_DELTA) -> dict[str, Any]:
    """One month's entry of monitor.json (see the module docstring)."""
    run_id = json.loads((inputs.model_dir / "manifest.json").read_text()).get("run_id", inputs.run_dir.name)
    pay_ref = payment_release(inputs.reference_data / "payment", payment_home, budget, noise_multiplier, delta,
                              f"training reference of {run_id}")
    plan = {name: merge_plan(np.asarray(c)) for name, c in pay_ref.counts.items()}  # from released counts
    pay_cur = payment_release(inputs.month_data / "payment", payment_home, budget, noise_multiplier, delta,
                              f"month {inputs.month}", plan)
    payment = _column_rows({k: apply_plan(np.asarray(v), plan[k]) for k, v in pay_ref.counts.items()},
                           {k: np.asarray(v) for k, v in pay_cur.counts.items()}, merge=False)
    for name, row in payment.items():
        row["bins"] = plan[name]

    ref_table, schema, _ = _lender_table(inputs.reference_data / "lender")
    cur_table, _, _ = _lender_table(inputs.month_data / "lender")
    lender = _column_rows(histograms(ref_table, schema), histograms(cur_table, schema), merge=False)
    ref_scores = _score(inputs.model_dir, inputs.reference_data)
    cur_scores = _score(inputs.model_dir, inputs.month_data)
    # characteristic analysis: the shift in each bin's share times the reference's mean points in that bin
    ref_points = ref_scores["score"].to_numpy(float)
    for j, name in enumerate(ref_table.columns):
        codes, n = bin_codes(ref_table.values[:, j], schema.column(name))
        sums, counts = np.bincount(codes, ref_points, n), np.bincount(codes, minlength=n)
        mean_points = np.divide(sums, counts, out=np.full(n, ref_points.mean()), where=counts > 0)
        shift = np.asarray(lender[name]["current_share"]) - np.asarray(lender[name]["reference_share"])
        lender[name]["characteristic_points"] = round(float(np.sum(shift * (mean_points - ref_points.mean()))), 3)
    ref_s, cur_s = _score_counts(ref_points), _score_counts(cur_scores["score"].to_numpy(float))
    score_psi = psi(ref_s, cur_s)
    entry: dict[str, Any] = {
        "month": inputs.month,
        "payment": payment, "lender": lender,
        "score": {"psi": round(score_psi, 5), "light": light(score_psi), "edges": SCORE_EDGES,
                  "reference_share": (ref_s / ref_s.sum()).round(5).tolist(),
                  "current_share": (cur_s / cur_s.sum()).round(5).tolist(),
                  "mean_points": float(cur_scores["score"].mean())},
        "payment_release": {"guarantee": MONITOR_GUARANTEE, "noise_multiplier": noise_multiplier,
                            "epsilon_after": pay_cur.epsilon_after, "charged_now": pay_ref.fresh + pay_cur.fresh},
    }
    if inputs.cohort_data is not None:
        entry["realised"] = {"cohort": inputs.cohort, **realised(inputs.model_dir, inputs.cohort_data)}
    return entry


def record_month(out: Path, inputs: MonitorInputs, entry: dict[str, Any]) -> dict[str, Any]:
    """Merge the month into OUT/monitor.json (one file per model: months accumulate) and redraw OUT/monitor.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MONITOR_FILE
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    model = str(inputs.model_dir.resolve())
    if doc and doc.get("model") != model:
        raise MonitorError(f"{path} monitors {doc.get('model')}, not {model}: use another --out per model")
    doc.update({"model": model, "reference": str(inputs.reference_data),
                "thresholds": {"stable_below": PSI_WATCH, "act_above": PSI_ACT},
                "privacy": ("payment columns: Gaussian noisy bin counts charged to the payment holder's ledger under "
                            f"{MONITOR_GUARANTEE} (replace-one, sensitivity sqrt(2 D)); lender columns, scores and "
                            "labels: the lender's own, this file stays with the lender"),
                "characteristic_analysis": ("lender columns: sum over bins of (current share - reference share) x "
                                            "(reference mean points in the bin - overall mean): the points the "
                                            "column's shift moves the average score by; payment columns: shares "
                                            "only (the payment holder never sees scores)")})
    months = doc.setdefault("months", {})
    months[str(inputs.month)] = entry
    doc["months"] = {k: months[k] for k in sorted(months, key=int)}
    write_json_atomic(path, doc)
    from fedscore.monitor_html import write_html

    write_text_atomic(out / HTML_FILE, write_html(doc))
    return doc


def check_data(folder: Path) -> None:
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: data folder not found")
