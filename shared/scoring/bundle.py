"""A scoring bundle (RUN_DIR/model) opened for onnxruntime: the manifest checked once, sessions made the same way.

Why a separate loader: both scoring paths (batch and the two online services) must refuse the same broken bundles
with the same messages, before any applicant is scored: a manifest whose parts do not hash to what it says, graphs
whose inputs are not the ones the manifest names, or a lender reference (declared in the lender's schema) of the
wrong width. Checking once here means a scorer never finds out halfway through a file.

Only onnxruntime runs the parts, and nothing here imports torch: the manifest model comes from
`fedscore.shared.model.manifest` (pydantic and hashlib only), not from `export_onnx`, which imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fedscore.shared.data.party_data import PartyTable
from fedscore.shared.data.tables import DataError
from fedscore.shared.model.manifest import (
    EMBEDDING,
    LENDER_INPUT,
    LOGIT,
    PAYMENT_INPUT,
    PROBABILITY,
    ModelManifest,
    load_manifest,
)


class BundleError(DataError):
    """The model folder cannot be used for scoring; the message names the file and what is wrong with it.

    A DataError so that command lines that already turn DataError into one red line handle it too.
    """


def ort_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session with `threads` intra-op threads.

    One thread by default: the parts are small MLPs, and on a machine shared with the other party (or with web
    workers) more threads only contend; batch scoring may pass more.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types; the user needs the file name
        raise BundleError(f"{path}: onnxruntime cannot load this model part: {exc}") from exc


@dataclass(frozen=True)
class ScoringBundle:
    """A checked manifest and where its parts are; each party opens only its own part's session."""

    directory: Path
    manifest: ModelManifest

    @property
    def payment_features(self) -> list[str]:
        return list(self.manifest.parts["payment"].feature_names)

    @property
    def lender_features(self) -> list[str]:
        return list(self.manifest.parts["lender"].feature_names)

    @property
    def embedding_dim(self) -> int:
        return self.manifest.embedding_dim

    def part_path(self, party: str) -> Path:
        return self.directory / self.manifest.parts[party].file

    def part_sha256(self, party: str) -> str:
        return self.manifest.parts[party].sha256

    def embedding_baseline(self) -> np.ndarray:
        """float32 [d]: the embedding that stands for "no payment information": zeros, a public constant (a mean of
        training embeddings would be a statistic of training users that no guarantee covers)."""
        return np.zeros(self.embedding_dim, dtype=np.float32)

    def lender_reference(self) -> np.ndarray:
        """float32 [n_lender]: the typical applicant's raw lender features that reason codes compare against."""
        reference = self.manifest.lender_reference
        if reference is None:
            raise BundleError(f"{self.directory / 'manifest.json'}: no lender_reference (declared applicant); "
                              "reason codes need it, re-export the model with a current fedscore")
        return np.asarray(reference, dtype=np.float32)


_EXPECTED_IO = {
    "payment": ([PAYMENT_INPUT], [EMBEDDING]),
    "lender": ([LENDER_INPUT, EMBEDDING], [PROBABILITY, LOGIT]),
}


def load_scoring_bundle(model_dir: Path, parties: tuple[str, ...] = ("payment", "lender")) -> ScoringBundle:
    """Load and check RUN_DIR/model: hashes (via `load_manifest`), graph input/output names, reference widths, of
    the parts of `parties` (the payment service opens its own part only: the lender's part need not be there)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BundleError(f"{model_dir}: model folder not found (expected RUN_DIR/model with manifest.json)")
    if not (model_dir / "manifest.json").is_file() and (model_dir / "model" / "manifest.json").is_file():
        raise BundleError(f"{model_dir}: no manifest.json here; this is a run folder, use {model_dir / 'model'}")
    try:
        manifest = load_manifest(model_dir, parties)
    except ValueError as exc:
        raise BundleError(str(exc)) from exc
    manifest_path = model_dir / "manifest.json"
    for party, (inputs, outputs) in _EXPECTED_IO.items():
        if party not in parties:
            continue
        part = manifest.parts[party]
        if part.inputs != inputs or not set(outputs) <= set(part.outputs):
            raise BundleError(f"{manifest_path}: the {party} part has inputs {part.inputs} and outputs "
                              f"{part.outputs}; scoring needs inputs {inputs} and outputs {outputs}")
    bundle = ScoringBundle(model_dir, manifest)
    widths = {"lender_reference": (manifest.lender_reference, len(bundle.lender_features))} if (
        "lender" in parties) else {}
    for field, (values, width) in widths.items():
        if values is not None and (len(values) != width or not np.all(np.isfinite(values))):
            raise BundleError(f"{manifest_path}: {field} must be {width} finite numbers, got {len(values)}")
    return bundle


def ordered_matrix(table: PartyTable, columns: list[str], party: str) -> np.ndarray:
    """float32 [N, len(columns)] in the model's column order; errors name the file and the column."""
    position = {c: j for j, c in enumerate(table.columns)}
    missing = [c for c in columns if c not in position]
    if missing:
        raise DataError(f"{table.source}: missing column(s) {', '.join(missing)} that the model's {party} part was "
                        "trained on")
    values = table.values[:, [position[c] for c in columns]]
    with np.errstate(over="ignore"):
        single = values.astype(np.float32)  # what the graph sees: a value beyond float32 range would become inf
    finite = np.isfinite(single)
    if not finite.all():
        row, col = (int(i[0]) for i in np.nonzero(~finite))
        raise DataError(f"{table.source}: column {columns[col]}: value {float(values[row, col])!r} at row {row} is "
                        "not a finite float32")
    return single


def refuse_void_bundle(bundle: ScoringBundle) -> None:
    """A model trained with `privacy.replayable_noise=true` (a test mode) has no guarantee left: services refuse it."""
    privacy = bundle.manifest.training_config.get("privacy", {})
    if privacy.get("enabled", True) and privacy.get("replayable_noise"):
        raise BundleError(f"{bundle.directory / 'manifest.json'}: trained with privacy.replayable_noise=true (a test "
                          "mode): every privacy guarantee of this model is VOID; retrain without it to serve")
