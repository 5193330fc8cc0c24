"""What the coordinator hands back after a run: RUN_DIR/outcome.json (rounds, alignment sizes, timing, traffic,
and the refusal or failure if there was one). The launcher adds the baselines and writes metrics.json from it."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from server.coordinator import RunResult


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, allow_nan=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outcome(run_dir: Path, result: RunResult, error: dict[str, str] | None) -> None:
    write_json_atomic(run_dir / "outcome.json", {**asdict(result), "error": error})


def read_outcome(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "outcome.json").read_text())
