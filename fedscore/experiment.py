"""`fedscore experiment`: run a grid of configs x seeds x keyed splits and tabulate the privacy/utility frontier.

One run is one ordinary `train`/`federate` run in DIR/runs/<name>/, with party homes of its own: each party keeps a
lifetime privacy ledger, so a second run on the same people in the same homes would (rightly) be refused. A grid
measures what one run would cost; it is not a deployment spending one party's budget many times.

DIR/results.csv is rewritten atomically after every run, so `--resume` can skip what already finished.

Utility is the share of the lift kept (fedscore/references.py): before any run, the grid's data folder is tuned
once per keyed split (the lender-only and centralized GBDT references, chosen on validation, cached on disk), and
every row gets `ref_lender_only_auc`, `ref_ceiling_auc` and `lift_kept`. They come from the data folder and the
secret, not from anything the run wrote.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedscore.shared.atomic import write_text_atomic
from fedscore.shared.config import ConfigError, load_config
from fedscore.shared.metrics import METRIC_KEYS
from fedscore.shared.run_folder import RunFolder

LABEL_EPS, OUTSIDER_EPS = "privacy.label_epsilon", "privacy.outsider_epsilon"
Scalar = bool | int | float | str


class GridFile(BaseModel):
    """GRID.toml: the data, transport, seeds and splits, the axes to cross ([grid]) and fixed overrides ([set])."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    data: Path
    transport: Literal["inprocess", "flower"] = "inprocess"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    splits: int | list[str] = Field(1, description="how many keyed splits, or the parties' hex secrets")
    grid: dict[str, list[Scalar | list[Scalar]]] = Field(default_factory=dict)
    fixed: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict, alias="set")
    attacks: bool = Field(False, description="run `fedscore audit` on every run and add the pooled attack figures "
                          "(and the one-run audit bounds, with audit.canaries / audit.gradient_canaries set) to "
                          "results.csv")


def _override(key: str, value: Any) -> str:
    """A config override string; TOML has no null, so the string "none" unsets an optional setting."""
    if isinstance(value, str) and value.lower() in ("none", "null"):
        return f"{key}=none"
    return f"{key}={json.dumps(value)}"


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs, picklable for a worker process."""

    name: str
    cell: str
    settings: dict[str, Any]
    overrides: list[str]
    seed: int
    split: int
    secret: str
    data: Path
    transport: str
    run_dir: Path
    attacks: bool = False


def split_secrets(splits: int | list[str]) -> list[str]:
    """Split k's shared secret keys the alignment tokens and the train/val/test split: deterministic, so a rerun
    (or another machine) gets the same split k."""
    if isinstance(splits, int):
        return [hashlib.sha256(f"fedscore-split-{k}".encode()).hexdigest() for k in range(splits)]
    return list(splits)


def load_grid(path: Path, out: Path) -> list[RunSpec]:
    """Read and check GRID.toml and every cell's config before anything runs; errors name the file and the key."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"grid file {path} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"grid file {path}: not valid TOML: {exc}") from exc
    try:
        grid = GridFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"grid file {path}: {problems}") from exc
    secrets = split_secrets(grid.splits)
    for k, secret in enumerate(secrets):
        try:
            bytes.fromhex(secret)
        except ValueError as exc:
            raise ConfigError(f"grid file {path}: splits[{k}]: not a hex secret") from exc
        if len(secret) < 32:
            raise ConfigError(f"grid file {path}: splits[{k}]: too short (need at least 16 bytes as hex)")
    if not secrets:
        raise ConfigError(f"grid file {path}: splits: need at least one split")
    if "seed" in grid.grid or "seed" in grid.fixed:
        raise ConfigError(f"grid file {path}: seed: set by `seeds`, not in [grid] or [set]")
    if both := sorted(set(grid.grid) & set(grid.fixed)):
        raise ConfigError(f"grid file {path}: {', '.join(both)}: in both [grid] and [set]")
    data = grid.data if grid.data.is_absolute() else (path.parent / grid.data)
    if not all((data / party).is_dir() for party in ("payment", "lender")):
        raise ConfigError(f"grid file {path}: data: {data} has no payment/ and lender/ folders")
    # every run records what each party received, so `fedscore audit RUN` can attack it later ([set] may turn it off)
    fixed = ["audit.record_transcripts=true", *(_override(k, v) for k, v in grid.fixed.items())]
    runs = []
    for values in itertools.product(*grid.grid.values()):
        settings = dict(zip(grid.grid, values, strict=True))
        overrides = [*fixed, *(_override(k, v) for k, v in settings.items())]
        try:
            load_config(None, overrides)
        except ConfigError as exc:
            raise ConfigError(f"grid file {path}: cell {settings}: {exc}") from exc
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:6]
        cell = f"c{len(runs) // (len(grid.seeds) * len(secrets)):02d}-{digest}"
        for seed, (k, secret) in itertools.product(grid.seeds, enumerate(secrets)):
            name = f"{cell}-s{seed}-p{k}"
            runs.append(RunSpec(name, cell, settings, [*overrides, f"seed={seed}"], seed, k, secret, data.resolve(),
                                grid.transport, (out / "runs" / name).resolve(), grid.attacks))
    return runs


def result_row(spec: RunSpec, metrics: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """One results.csv row: the cell's settings, seed, split, every guarantee's eps, the test metrics, baselines."""
    row: dict[str, Any] = {"run": spec.name, "cell": spec.cell, **spec.settings, "seed": spec.seed,
                           "split": spec.split}
    folder = RunFolder(spec.run_dir)
    privacy = folder.read_json(folder.privacy_report)
    for g in privacy.get("guarantees", []):
        row[f"eps.{g['protects']}@{g['against']}"] = g["epsilon"]
    row.update({f"test.{k}": metrics["test"][k] for k in METRIC_KEYS})
    from fedscore.baselines import local_evaluation

    local = local_evaluation(spec.run_dir)  # the lender's own evaluation and the operator's reference (local runs)
    for base in ("lender_only", "centralized"):
        row[f"{base}.auc"] = (local.get(base) or {}).get("auc")
    if spec.attacks:
        row.update(attack_columns(spec.run_dir))
    row["wall_s"] = round(wall_s, 2)
    row["error"] = ""
    return row


def attack_column_names() -> dict[str, str]:
    """Report row name -> results.csv column, from the attacks' own names (imported late: sklearn, torch)."""
    from fedscore.audit.label_leakage import LABEL_INFERENCE, SCORE_ATTACKS

    return {**{label: f"attack.{key}_auc" for key, label in SCORE_ATTACKS.items()},
            LABEL_INFERENCE: "attack.label_inference_acc"}


def attack_columns(run_dir: Path) -> dict[str, Any]:
    """`fedscore audit RUN` on the finished run (audit.json, the report section): the payment holder's attacks
    pooled over exchanges, their ceiling, membership AUC and each one-run audit's lower bound."""
    from fedscore.audit.section import run_audit

    section = run_audit(run_dir)
    columns = attack_column_names()
    row: dict[str, Any] = {}
    for attack in section["labels_vs_payment"]["attacks"]:  # pooled, and the worst of pooled and each exchange
        column = columns.get(attack["attack"])
        if column is None:
            continue
        if attack["exchange"] == "pooled over exchanges":
            row[column] = attack["value"]
            row["attack.label_ceiling"] = attack["ceiling"]
        row[f"{column}.max"] = max(row.get(f"{column}.max", attack["value"]), attack["value"])
    row["attack.membership_auc"] = section["membership_vs_outsider"]["value"]
    excess = section["features_vs_lender"].get("excess_over_score")
    if excess:  # the lender's reconstruction of the payment columns: with everything received, with the score
        from fedscore.audit.reconstruction import RECEIVED, SCORE

        row["attack.recon_received_r2"] = excess["inputs"][RECEIVED]["pooled_r2"]
        row["attack.recon_score_r2"] = excess["inputs"][SCORE]["pooled_r2"]
        row["attack.recon_excess"] = excess["excess"]  # the attacker inverts the lender's part (reconstruction.py)
        row["attack.recon_plain_excess"] = excess.get("plain_excess", excess["excess"])  # a regressor alone
    for audit in section["one_run_audits"]:
        if audit.get("epsilon_lower_bound") is not None:
            row[f"audit.{audit['guarantee']}"] = audit["epsilon_lower_bound"]
    row["audit.violations"] = len(section["violations"])
    return row


REF_COLUMNS = ("ref_lender_only_auc", "ref_ceiling_auc", "lift_kept", "lift_kept_note")


def _reference_key(spec: RunSpec) -> tuple[str, str, float, float]:
    """What a split's references depend on: the data folder, the secret and the run's split fractions."""
    split = load_config(None, spec.overrides).split
    return str(spec.data), spec.secret, split.test_fraction, split.val_fraction


def split_references(runs: list[RunSpec], progress: Callable[[str, int, int], None] | None = None,
                     cache_dir: Path | None = None) -> dict[tuple[str, str, float, float], Any]:
    """The tuned references of every distinct (data, secret, split fractions) in the grid, each tuned once (and
    read from the on-disk cache on a later experiment)."""
    from fedscore.references import tuned_references

    refs: dict[tuple[str, str, float, float], Any] = {}
    keys = list(dict.fromkeys(_reference_key(spec) for spec in runs))
    for i, key in enumerate(keys):
        if progress:
            progress(f"tuning the lender-only and ceiling references, split {i + 1} of {len(keys)}", i, len(keys))
        data, secret, test_fraction, val_fraction = key
        config = load_config(None, [f"split.test_fraction={test_fraction}", f"split.val_fraction={val_fraction}"])
        refs[key] = tuned_references(Path(data), config, secret, cache_dir)
    return refs


def reference_columns(row: dict[str, Any], refs: Any) -> dict[str, Any]:
    """The row with both references and the lift kept (NaN, with the reason in lift_kept_note, when the run failed
    or the ceiling does not beat the lender-only reference)."""
    from fedscore.references import lift_kept_or_nan

    auc_fed = pd.to_numeric(pd.Series([row.get("test.auc")]), errors="coerce").iloc[0]
    if row.get("error") or pd.isna(auc_fed):
        lift, note = float("nan"), "the run failed" if row.get("error") else "no federated test AUC"
    else:
        lift, note = lift_kept_or_nan(float(auc_fed), refs)
    return {**row, "ref_lender_only_auc": refs.lender_only_auc, "ref_ceiling_auc": refs.ceiling_auc,
            "lift_kept": lift, "lift_kept_note": note}


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Run one grid point from scratch (a crashed earlier attempt's folder and homes are wiped: its ledgers may
    hold charges for releases that never finished). A refused run becomes a row with `error`, not a crash."""
    from fedscore.shared.run_folder import RunError

    homes_root = spec.run_dir.parent / f"{spec.name}-homes"
    for folder in (spec.run_dir, homes_root):
        shutil.rmtree(folder, ignore_errors=True)
    if spec.transport == "flower":
        from fedscore.federation import run_federated as runner
    else:
        from fedscore.runs import run_inprocess as runner
    start = time.perf_counter()
    try:
        metrics = runner(load_config(None, spec.overrides), spec.data, spec.run_dir, secret=spec.secret,
                         homes={p: homes_root / p for p in ("payment", "lender")})
    except RunError as exc:
        return {"run": spec.name, "cell": spec.cell, **spec.settings, "seed": spec.seed, "split": spec.split,
                "wall_s": round(time.perf_counter() - start, 2), "error": str(exc)}
    return result_row(spec, metrics, time.perf_counter() - start)


def _worker_init() -> None:
    os.environ.setdefault("FEDSCORE_TORCH_THREADS", "1")  # jobs share the cores: one intra-op thread each


def run_experiment(runs: list[RunSpec], out: Path, jobs: int = 1, resume: bool = False,
                   progress: Callable[[str, int, int], None] | None = None) -> tuple[pd.DataFrame, int]:
    """Run what is not finished yet; returns all rows (in grid order, each with its split's references and lift
    kept) and how many runs actually ran."""
    csv = out / "results.csv"
    refs = split_references(runs, progress)
    ref_of = {spec.name: refs[_reference_key(spec)] for spec in runs}
    rows: dict[str, dict[str, Any]] = {}
    if resume and csv.exists():
        done = pd.read_csv(csv, keep_default_na=False)
        rows = {r["run"]: reference_columns(r, ref_of[r["run"]]) for r in done.to_dict("records")
                if not r.get("error") and r["run"] in ref_of}
    todo = []
    for spec in runs:
        folder = RunFolder(spec.run_dir)
        metrics_file = folder.metrics
        if spec.name in rows:
            continue
        if resume and metrics_file.exists() and folder.privacy_report.exists():
            metrics = json.loads(metrics_file.read_text())  # finished, but its row was never written
            rows[spec.name] = reference_columns(result_row(spec, metrics, metrics["timing"].get("total_s", 0.0)),
                                                ref_of[spec.name])
        else:
            todo.append(spec)
    order = [spec.name for spec in runs]

    def save() -> pd.DataFrame:
        frame = pd.DataFrame([rows[n] for n in order if n in rows])
        write_text_atomic(csv, frame.to_csv(index=False))
        return frame

    frame = save()
    total, count = len(runs), len(runs) - len(todo)
    if progress:
        progress(f"{count} of {total} runs already done", count, total)
    if jobs <= 1:
        results = (run_one(spec) for spec in todo)
    else:
        import multiprocessing

        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
        results = (f.result() for f in as_completed([pool.submit(run_one, spec) for spec in todo]))
    try:
        for row in results:
            rows[row["run"]] = reference_columns(row, ref_of[row["run"]])
            frame = save()
            count += 1
            if progress:
                kept = rows[row["run"]]["lift_kept"]
                progress(f"{row['run']}: " + ("FAILED" if row["error"] else f"AUC {row['test.auc']:.4f}, lift kept "
                                              f"{kept:.0%}" if pd.notna(kept) else f"AUC {row['test.auc']:.4f}"),
                         count, total)
    finally:
        if jobs > 1:
            pool.shutdown(cancel_futures=True)
    return frame, len(todo)


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """A column as numbers (NaN where missing or empty): CSV round trips and failed runs leave gaps."""
    if column not in frame:
        return pd.Series(float("nan"), index=frame.index)
    return pd.to_numeric(frame[column], errors="coerce")


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["error"].fillna("") == ""] if "error" in frame else frame


def summary(frame: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Per cell, over seeds and splits: AUC mean / std / min / median, the lift kept's median and min (with the
    tuned references' means), the run's own baselines' means where present, failures, and (with
    attacks) each label attack's median (pooled over exchanges) and its worst value over runs and exchanges."""
    ok = _ok(frame)
    out = []
    for cell, group in frame.groupby("cell", sort=False):
        good = ok[ok["cell"] == cell]
        auc = _numeric(good, "test.auc")
        entry = {"cell": cell, **{a: group[a].iloc[0] for a in axes}, "n": len(good),
                 "failed": len(group) - len(good), "auc_mean": auc.mean(), "auc_std": auc.std(ddof=0),
                 "auc_min": auc.min(), "auc_median": auc.median()}
        lift = _numeric(good, "lift_kept")
        entry.update({"lift_kept_median": lift.median(), "lift_kept_min": lift.min(),
                      "ref_lender_only_auc": _numeric(good, "ref_lender_only_auc").mean(),
                      "ref_ceiling_auc": _numeric(good, "ref_ceiling_auc").mean()})
        for base in ("lender_only", "centralized"):
            if f"{base}.auc" in good and _numeric(good, f"{base}.auc").notna().any():
                entry[f"{base}_auc"] = _numeric(good, f"{base}.auc").mean()
        for column in attack_column_names().values():  # with `attacks = true`: the median and the worst run's worst
            if column in good:
                entry[f"{column.removeprefix('attack.')}_median"] = _numeric(good, column).median()
                entry[f"{column.removeprefix('attack.')}_max"] = _numeric(good, f"{column}.max").max()
        for column in ("attack.recon_received_r2", "attack.recon_score_r2", "attack.recon_excess",
                       "attack.recon_plain_excess"):
            if column in good:
                entry[f"{column.removeprefix('attack.')}_median"] = _numeric(good, column).median()
                entry[f"{column.removeprefix('attack.')}_max"] = _numeric(good, column).max()
        out.append(entry)
    return pd.DataFrame(out)


def _markdown_table(table: pd.DataFrame) -> list[str]:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]


LIFT_NOTE = ("lift kept = (AUC_fed - AUC_lender_only) / (AUC_ceiling - AUC_lender_only), both references tuned "
             "GBDTs chosen on validation on the same users and keyed split (fedscore/references.py); local "
             "simulation only: the operator holds both parties' data")


def lift_frontier(frame: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """The frontier as lift kept: per label eps (and outsider eps), or per cell when the label eps is not an axis,
    the median and min of the lift kept and the median AUC over seeds and splits."""
    ok = _ok(frame).copy()
    if ok.empty:
        return pd.DataFrame()
    ok["_lift"], ok["_auc"] = _numeric(ok, "lift_kept"), _numeric(ok, "test.auc")
    keys = [a for a in (OUTSIDER_EPS, LABEL_EPS) if a in axes] or ["cell"]
    out = ok.groupby(keys, sort=False).agg(n=("_lift", "size"), lift_kept_median=("_lift", "median"),
                                           lift_kept_min=("_lift", "min"), auc_median=("_auc", "median"))
    return out.reset_index()


def write_markdown(table: pd.DataFrame, path: Path, frontier: pd.DataFrame | None = None) -> None:
    """results.md: the per-cell summary and, below it, the frontier as lift kept."""
    text = "# fedscore experiment: test AUC and lift kept over seeds and splits\n\n" + "\n".join(
        _markdown_table(table)) + "\n"
    if frontier is not None and not frontier.empty:
        text += ("\n## Frontier: lift kept\n\n" + LIFT_NOTE + ".\n\n" + "\n".join(_markdown_table(frontier))
                 + "\n")
    write_text_atomic(path, text)


def plot_frontier(frame: pd.DataFrame, axes: list[str], path: Path) -> None:
    """Test AUC against label eps, one line per outsider eps (median, min-max band), with the tuned references
    (their means over splits); the lift kept is tabulated in results.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(frame).copy()
    ok["test.auc"] = _numeric(ok, "test.auc")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if LABEL_EPS in axes:
        ok["_x"] = pd.to_numeric(ok[LABEL_EPS], errors="coerce")
        ok = ok.dropna(subset=["_x"])
        lines = ok.groupby(ok[OUTSIDER_EPS].astype(str)) if OUTSIDER_EPS in axes else [("(as set)", ok)]
        for outsider, group in lines:
            stats = group.groupby("_x")["test.auc"].agg(["median", "min", "max"]).sort_index()
            (line,) = ax.plot(stats.index, stats["median"], marker="o", label=f"outsider eps {outsider}")
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2, color=line.get_color())
        ax.set_xlabel("label epsilon (lender.labels vs payment)")
    else:
        cells = list(dict.fromkeys(ok["cell"]))
        stats = ok.groupby("cell", sort=False)["test.auc"].agg(["median", "min", "max"]).reindex(cells)
        ax.plot(range(len(cells)), stats["median"], marker="o", label="federated")
        ax.fill_between(range(len(cells)), stats["min"], stats["max"], alpha=0.2)
        ax.set_xticks(range(len(cells)), cells, rotation=30, fontsize=7)
        ax.set_xlabel("cell")
    for column, name, style in (("ref_lender_only_auc", "lender-only, tuned GBDT", "--"),
                                ("ref_ceiling_auc", "ceiling, tuned GBDT", ":")):
        mean = _numeric(ok, column).mean()
        if pd.notna(mean):
            ax.axhline(mean, ls=style, color="grey", label=f"{name} (mean {mean:.3f})")
    ax.set_ylabel("test AUC (median; band: min-max)")
    ax.set_title("privacy / utility frontier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
