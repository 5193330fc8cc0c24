"""What the coordinator hands back after a run: RUN_DIR/outcome.json (rounds, alignment sizes, timing, traffic,
and the `Refusal` if a party refused or the coordinator failed). The launcher adds the baselines and writes
metrics.json from it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fedscore.server.coordinator import RunResult
from fedscore.shared.run_folder import Refusal, RunFolder


def write_outcome(run_dir: Path, result: RunResult, error: Refusal | None) -> None:
    RunFolder(run_dir).write_outcome(asdict(result), error)
