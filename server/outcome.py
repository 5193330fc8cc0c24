"""What the coordinator hands back after a run: RUN_DIR/outcome.json (rounds, alignment sizes, timing, traffic,
and the refusal or failure if there was one). The launcher adds the baselines and writes metrics.json from it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedscore.server.coordinator import RunResult
from fedscore.shared.atomic import write_json_atomic


def write_outcome(run_dir: Path, result: RunResult, error: dict[str, str] | None) -> None:
    write_json_atomic(run_dir / "outcome.json", {**asdict(result), "error": error})


def read_outcome(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "outcome.json").read_text())
