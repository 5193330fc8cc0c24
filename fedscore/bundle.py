"""RUN_DIR/model: the two parts each party exported, gathered with one manifest.

Each party wrote its own part to its own state directory (parties/<party>/export); in a local run the operator
holds both folders, so the bundle is assembled here: ONNX files copied, sha256 recorded, manifest written last.

No metrics go into the bundle (they stay in RUN_DIR/metrics.json, evaluation only), and the sidecars carry only
schema-derived scalers, the declared lender reference and the feature definition (tests/test_bundle_release.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fedscore.shared.model.export_onnx import LENDER_FILE, PAYMENT_FILE, ModelManifest, describe_part, write_manifest
from fedscore.shared.model.manifest import EMBEDDING
from fedscore.shared.model.preprocessing import Scaler
from fedscore.shared.run_folder import RunFolder
from fedscore.shared.scoring.scorecard import ScorecardParams


def assemble_bundle(run_dir: Path, config: dict[str, Any], privacy: list[dict[str, Any]] | None = None,
                    exports: dict[str, Path] | None = None) -> ModelManifest:
    """`exports` (party -> its export folder) for parts that are not in RUN_DIR/parties/<party>/export: after a
    deployment each party's part is in its own node state (`fedscore bundle`)."""
    exports = exports or {}
    folder = RunFolder(run_dir)
    out = folder.model
    out.mkdir(parents=True, exist_ok=True)
    sidecars: dict[str, dict[str, Any]] = {}
    parts = {}
    for party, file in (("payment", PAYMENT_FILE), ("lender", LENDER_FILE)):
        source = exports.get(party, folder.party_state(party) / "export")
        if not (source / file).exists():
            raise FileNotFoundError(f"{source / file}: the {party} party exported no model part")
        shutil.copy2(source / file, out / file)
        sidecars[party] = json.loads((source / f"{party}_part.json").read_text())
        parts[party] = describe_part(out / file, Scaler(**sidecars[party]["scaler"]))
    # what crosses per applicant (1 for a partial logit), read from the lender graph's input, not from the config
    width = parts["lender"].input_shapes[EMBEDDING][1]
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"{out / LENDER_FILE}: input {EMBEDDING!r} has no fixed width ({width!r})")
    manifest = ModelManifest(
        parts=parts, embedding_dim=width, training_config=config,
        privacy=privacy or [], scorecard=ScorecardParams(),
        payment_feature_definition=sidecars["payment"]["feature_definition"],
        lender_reference=sidecars["lender"]["reference"],
    )
    write_manifest(out, manifest)
    return manifest
