"""The lender's model registry: versions, the champion, challengers, promotion and rollback (issue 21).

Why in the lender's home: the lender decides which version scores its applicants, and the registry outlives every
run folder like the ledger does. `LENDER_HOME/registry.json` lists each version (its run folder, the sha256 of its
model/manifest.json and of every file the manifest names, the trained window, its test metrics, when it was
registered and promoted). `LENDER_HOME/champion` is a symlink to the champion's model folder, replaced atomically
(a new link renamed over the old), so `fedscore serve lender --model LENDER_HOME/champion` serves the promoted
version after a restart of the service (documented restart: the service loads its model once at start-up).

A challenger is promoted only if it beats the champion on the latest matured window (months whose outcomes have
matured and that neither trained on), on both AUC and KS; rollback makes the previous champion the champion again.
Every promotion and rollback is appended to the registry's history.
"""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from fedscore.shared.atomic import write_text_atomic
from fedscore.shared.party_home import PartyHome
from fedscore.shared.run_folder import RunError, RunFolder

REGISTRY_FILE = PartyHome.REGISTRY
CHAMPION_LINK = PartyHome.CHAMPION


class Version(BaseModel):
    version: int
    run_dir: str
    run_id: str
    manifest_sha256: str
    files_sha256: dict[str, str]
    window: list[int] | None = Field(None, description="[first, last] month trained on")
    warm_from: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="the run's test metrics")
    registered_at: str
    promoted_at: str | None = None
    status: Literal["candidate", "champion", "retired", "rejected"] = "candidate"
    comparisons: list[dict[str, Any]] = Field(default_factory=list)


class Registry(BaseModel):
    versions: list[Version] = Field(default_factory=list)
    champion: int | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)

    def get(self, version: int) -> Version:
        for v in self.versions:
            if v.version == version:
                return v
        raise RunError(f"registry: no version {version} (have {[v.version for v in self.versions]})")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load(home: Path) -> Registry:
    path = Path(home) / REGISTRY_FILE
    if not path.exists():
        return Registry()
    try:
        return Registry.model_validate_json(path.read_text())
    except ValueError as exc:
        raise RunError(f"{path}: not a readable registry ({exc})") from None


def save(home: Path, registry: Registry) -> None:
    Path(home).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(home) / REGISTRY_FILE, registry.model_dump_json(indent=1))


def _point_champion(home: Path, model_dir: Path) -> None:
    """LENDER_HOME/champion -> model_dir, swapped atomically (rename of a fresh link over the old one)."""
    Path(home).mkdir(parents=True, exist_ok=True)
    link = Path(home) / CHAMPION_LINK
    tmp = Path(home) / f".{CHAMPION_LINK}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(Path(model_dir).resolve(), target_is_directory=True)
    os.replace(tmp, link)


def fingerprint(run_dir: Path) -> tuple[str, dict[str, str]]:
    """sha256 of model/manifest.json and of each file in model/ (what serving loads)."""
    model = RunFolder(run_dir).model
    manifest = model / "manifest.json"
    if not manifest.exists():
        raise RunError(f"{run_dir}: no model/manifest.json (not a finished run with a bundle)")
    files = {p.name: _sha(p) for p in sorted(model.iterdir()) if p.is_file() and p.name != "manifest.json"}
    return _sha(manifest), files


def verify(version: Version) -> None:
    """Refuse a version whose files changed since registration (a model is promoted as it was compared)."""
    manifest, files = fingerprint(Path(version.run_dir))
    if manifest != version.manifest_sha256 or files != version.files_sha256:
        raise RunError(f"version {version.version} ({version.run_dir}): its model files changed since it was "
                       "registered; register the run again as a new version")


def register(home: Path, run_dir: Path, window: tuple[int, int] | None = None, warm_from: int | None = None,
             champion_if_first: bool = True) -> Version:
    """Add a finished run as a new version; the first version becomes the champion."""
    from fedscore.retrain import run_id_of

    run_dir = Path(run_dir).resolve()
    registry = load(home)
    for v in registry.versions:
        if Path(v.run_dir) == run_dir:
            raise RunError(f"{run_dir} is already version {v.version}")
    manifest, files = fingerprint(run_dir)
    folder = RunFolder(run_dir)
    metrics = folder.read_json(folder.metrics)["test"] if folder.finished else {}
    version = Version(version=max((v.version for v in registry.versions), default=0) + 1, run_dir=str(run_dir),
                      run_id=run_id_of(run_dir), manifest_sha256=manifest, files_sha256=files,
                      window=list(window) if window else None, warm_from=warm_from,
                      metrics={k: float(v) for k, v in metrics.items()}, registered_at=_now())
    registry.versions.append(version)
    if registry.champion is None and champion_if_first:
        _promote(home, registry, version, "first version")
    save(home, registry)
    return version


def _promote(home: Path, registry: Registry, version: Version, reason: str) -> None:
    verify(version)
    if registry.champion is not None:
        registry.get(registry.champion).status = "retired"
    version.status = "champion"
    version.promoted_at = _now()
    registry.history.append({"at": version.promoted_at, "action": "promote", "version": version.version,
                             "previous": registry.champion, "reason": reason})
    registry.champion = version.version
    _point_champion(home, Path(version.run_dir) / "model")


def evaluate(run_dir: Path, cohorts: list[Path]) -> dict[str, float]:
    """AUC and KS of a version's model on the matured cohorts' applicants (their outcomes: the lender's own)."""
    import numpy as np

    from fedscore.clients.lender.data import load_lender_table
    from fedscore.scoring import score_batch
    from fedscore.shared.metrics import auc, ks

    ps, ys = [], []
    for folder in cohorts:
        ps.append(score_batch(Path(run_dir) / "model", folder)["probability"].to_numpy())
        ys.append(load_lender_table(folder / "lender")[1])
    p, y = np.concatenate(ps), np.concatenate(ys)
    return {"auc": float(auc(y, p)), "ks": float(ks(y, p)), "n": float(len(y)), "bad_rate": float(y.mean())}


def challenge(home: Path, challenger: int, data_root: Path, as_of: int | None = None,
              months: tuple[int, int] | None = None) -> dict[str, Any]:
    """Score challenger and champion side by side on the latest matured window none of them trained on; promote
    the challenger only if its AUC and KS are both higher. Returns the comparison (also kept in the registry)."""
    from fedscore.synth_monthly import month_folder, read_meta

    registry = load(home)
    if registry.champion is None:
        raise RunError("registry: no champion yet (register a version first)")
    champ, chall = registry.get(registry.champion), registry.get(challenger)
    if chall.version == champ.version:
        raise RunError(f"version {challenger} is already the champion")
    meta = read_meta(data_root)
    as_of = meta.months if as_of is None else as_of
    trained = {m for v in (champ, chall) if v.window for m in range(v.window[0], v.window[1] + 1)}
    if months is None:
        latest = as_of - meta.performance_window
        picked = [m for m in range(latest, 0, -1) if m not in trained][:1]
        if not picked:
            raise RunError(f"no matured month by month {as_of} that neither version trained on")
        months = (picked[0], picked[0])
    window = list(range(months[0], months[1] + 1))
    late = [m for m in window if meta.month(m).matures_at > as_of]
    if late:
        raise RunError(f"months {late}: outcomes not matured by month {as_of}: cannot compare on them")
    overlap = sorted(set(window) & trained)
    if overlap:
        raise RunError(f"months {overlap} were trained on by the champion or the challenger: compare on months "
                       "neither saw")
    folders = [month_folder(data_root, m) for m in window]
    verify(champ)
    verify(chall)
    result = {"at": _now(), "months": [months[0], months[1]], "as_of": as_of,
              "champion": {"version": champ.version, **evaluate(Path(champ.run_dir), folders)},
              "challenger": {"version": chall.version, **evaluate(Path(chall.run_dir), folders)}}
    better = (result["challenger"]["auc"] > result["champion"]["auc"]
              and result["challenger"]["ks"] > result["champion"]["ks"])
    result["promoted"] = better
    chall.comparisons.append(result)
    if better:
        _promote(home, registry, chall, f"beat version {champ.version} on months {months[0]}..{months[1]}: "
                 f"AUC {result['challenger']['auc']:.4f} > {result['champion']['auc']:.4f}, "
                 f"KS {result['challenger']['ks']:.4f} > {result['champion']['ks']:.4f}")
    else:
        chall.status = "rejected"
        registry.history.append({"at": result["at"], "action": "reject", "version": chall.version,
                                 "champion": champ.version})
    save(home, registry)
    return result


def rollback(home: Path) -> Version:
    """Make the champion before the current one the champion again (the last promotion undone)."""
    registry = load(home)
    promotions = [h for h in registry.history if h["action"] in ("promote", "rollback")]
    if registry.champion is None or not promotions or promotions[-1].get("previous") is None:
        raise RunError("registry: nothing to roll back to (the champion is the first version)")
    previous = registry.get(int(promotions[-1]["previous"]))
    current = registry.get(registry.champion)
    verify(previous)
    current.status = "retired"
    previous.status = "champion"
    previous.promoted_at = _now()
    # the entry before the one undone: a second rollback goes further back
    earlier = next((h.get("previous") for h in reversed(promotions) if h["version"] == previous.version), None)
    registry.history.append({"at": previous.promoted_at, "action": "rollback", "version": previous.version,
                             "previous": earlier, "undone": current.version})
    registry.champion = previous.version
    _point_champion(home, Path(previous.run_dir) / "model")
    save(home, registry)
    return previous
