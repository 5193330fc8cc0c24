"""Nothing unaccounted in the bundle: every item in RUN_DIR/model is public or recorded in a privacy ledger.

A small private run (DP-SGD on both parts, baselines on so that there are clean-label figures to leak) is
walked file by file: the manifest key by key, each ONNX graph initializer by initializer (plus Constant nodes and
metadata). Each item must be on the allow-list below, checked by value:

- model weights: equal to the party's trained parameters, and that party's ledger records DP-SGD releases
  (joint.records@outsider) for every round, or, for a payment part fitted from noisy statistics
  (privacy.payment_fit), the fit's Gram matrix and moments;
- preprocessing constants: equal to those recomputed from the party's schema.toml alone (bounds, levels);
- the lender reference: equal to the schema's declared references;
- the run config, the privacy report's guarantees, the scorecard policy, feature names, sha256 hashes, I/O names;
- a handful of code constants of the graph (1, the probability clips 1e-7 / 1e-3) and scalars the config implies (the
  label-flip rate of randomized response, the payment part's squash scale embedding_clip / sqrt(d));
- the lender part's statement that its top is linear (metadata "fedscore.linear_top", read by the scorers' exact
  reason-code shortcut): the same trained weights and bias as the graph's initializers, so the same release, and
  public scalars (flip rate, probability clips).

Anything else fails, e.g. a scaler mean fitted on the rows, a median reference, a mean training embedding, metrics.
The last tests plant such items and check the walker catches them, so it cannot pass vacuously.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fedscore.runs import run_inprocess
from fedscore.shared.config import FedConfig, load_config
from fedscore.shared.data.schema import load_schema
from fedscore.shared.model.manifest import LENDER_FILE, MANIFEST_NAME, PAYMENT_FILE, sha256_file
from fedscore.shared.model.preprocessing import Scaler, ScalerModule
from fedscore.shared.party_home import PartyHome
from fedscore.shared.privacy.ledger import ledger_entries
from fedscore.shared.scoring.linear import METADATA_KEY as LINEAR_KEY
from fedscore.shared.scoring.scorecard import ScorecardParams
from tests.conftest import SECRET, fresh_homes, make_party_data

# the DP top as the scoring part: every number it ships is public or ledger-recorded, which this walker proves; the
# default own GBDT part is named unprotected in the privacy report instead (tests/test_lender_gbdt.py checks that)
PRIVATE = ["training.rounds=2", "training.local_epochs=1", "training.batch_size=64", "baselines.epochs=2",
           "privacy.dpsgd_batch_size=256", "privacy.dpsgd_lr=0.02", "privacy.feature_epsilon=8",
           "model.lender_part=top"]
FILES = {"payment": PAYMENT_FILE, "lender": LENDER_FILE}
CODE_CONSTANTS = (0.0, 1.0, 1e-7, 1.0 - 1e-7, 1e-3, 1.0 - 1e-3)  # graph arithmetic (log1p, probability clips)


class Unaccounted(AssertionError):
    """An item in model/ that is neither public nor ledger-recorded."""


@pytest.fixture(scope="module")
def private_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("release")
    make_party_data(root / "data", population=2500, seed=3)
    run_inprocess(load_config(None, PRIVATE), root / "data", root / "run", secret=SECRET, homes=fresh_homes(root))
    return root / "data", root / "run"


# ------------------------------------------------------------------------------------------------ allow-list


def _schema_constants(data: Path, party: str, run: Path | None = None) -> dict[str, np.ndarray]:
    """The preprocessing buffers recomputed from the party's schema.toml alone, plus (when `run` is given and the
    party's ledger records them) the DP standardisation statistics the party released: its centre and scale."""
    scaler = Scaler.from_schema(load_schema(data / party))
    allowed = {f"scale.{k}": v.numpy() for k, v in ScalerModule(scaler).state_dict().items()}
    if run is not None and _dp_statistics_recorded(run, party):
        released = Scaler(**torch.load(run / "parties" / party / "state.pt", weights_only=True)["scaler"])
        buffers = ScalerModule(released).state_dict()
        allowed.update({f"dp.scale.{k}": buffers[k].numpy() for k in ("mean", "std")})
    return allowed


def _dp_statistics_recorded(run: Path, party: str) -> bool:
    entries = ledger_entries(run.parent / "homes" / party / PartyHome.LEDGER, party)
    return any(e["guarantee"] == "joint.records@outsider" and "standardisation" in e["note"] for e in entries)


def _weights(run: Path, party: str) -> list[np.ndarray]:
    state = torch.load(run / "parties" / party / "state.pt", weights_only=True)
    return [t.numpy() for t in state["model"].values()]


def _trained_under_dp_sgd(run: Path, party: str) -> bool:
    """The party planned DP-SGD for its part (so every update of it was a DP-SGD step) and its ledger records the
    releases as joint.records@outsider. (The payment part takes its first update once gradients arrive, so it
    records one round fewer than the lender.)"""
    state = torch.load(run / "parties" / party / "state.pt", weights_only=True)
    entries = ledger_entries(run.parent / "homes" / party / PartyHome.LEDGER, party)
    outsider = [e for e in entries if e["guarantee"] == "joint.records@outsider"]
    if "statistics_fit" in state:  # the payment part fitted from noisy statistics: its Gram matrix and moments
        return any("statistics fit" in e["note"] for e in outsider)
    return "dpsgd" in state and bool(outsider)


def _sent_dim(config: dict[str, Any]) -> int:
    """What the payment part outputs per user, from the run's config (1 when it sends a partial logit)."""
    return FedConfig.model_validate(config).model.sent_dim


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype.kind == b.dtype.kind and np.allclose(a, b, rtol=1e-6, atol=1e-7)


def check_graph(model: onnx.ModelProto, party: str, schema: dict[str, np.ndarray], weights: list[np.ndarray],
                dp_recorded: bool, config: dict[str, Any], scaler: dict[str, Any]) -> list[str]:
    """Classify every tensor the graph holds; raise Unaccounted for the first that is on no list."""
    privacy = config["privacy"]
    flip = privacy["label_epsilon"]
    public_scalars = [*CODE_CONSTANTS,
                      1.0 / (1.0 + math.exp(flip)) if flip is not None else 0.0,  # the lender's label-flip rate
                      math.tanh(flip / 2) if flip is not None else 1.0,  # 1 - 2 * flip, folded by the exporter
                      privacy["embedding_clip"] / math.sqrt(_sent_dim(config))]  # payment squash
    tensors = [(init.name, numpy_helper.to_array(init)) for init in model.graph.initializer]
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                tensors.append((f"{node.op_type}:{node.output[0]}", numpy_helper.to_array(attribute.t)))
            elif attribute.type == onnx.AttributeProto.TENSORS or attribute.type == onnx.AttributeProto.GRAPH:
                raise Unaccounted(f"{party}: node {node.name} carries nested tensors/graphs")
    seen = []
    for name, value in tensors:
        if any(_same(value, expected) for expected in schema.values()):
            seen.append(f"schema:{name}")
        elif any(_same(value, w) or (w.ndim == 2 and _same(value, w.T)) for w in weights):
            if not dp_recorded:
                raise Unaccounted(f"{party}: weight {name} shipped without a DP-SGD release in the party's ledger")
            seen.append(f"weight:{name}")
        elif value.size == 1 and value.dtype.kind == "f" and any(
                math.isclose(float(value.ravel()[0]), c, rel_tol=1e-6, abs_tol=1e-9) for c in public_scalars):
            seen.append(f"constant:{name}")
        elif value.size == 1 and value.dtype.kind == "i" and int(value.ravel()[0]) in (-1, 0, 1):
            seen.append(f"axis:{name}")
        else:
            raise Unaccounted(f"{party}: tensor {name} {value.dtype}{list(value.shape)} is neither a DP-SGD weight, "
                              f"a schema-derived constant nor a code constant: {value.ravel()[:4]}")
    metadata = {p.key: p.value for p in model.metadata_props}
    linear = metadata.pop(LINEAR_KEY, None)
    expected_meta = {"fedscore.part": party, "fedscore.format_version": "2",
                     "fedscore.feature_names": json.dumps(scaler["columns"]), "fedscore.scaler": json.dumps(scaler)}
    if metadata != expected_meta:
        raise Unaccounted(f"{party}: metadata {sorted(metadata)} differs from the schema-derived scaler and names")
    if linear is not None:
        seen += check_linear_description(json.loads(linear), party, weights, dp_recorded, public_scalars)
    return seen


def check_linear_description(described: dict[str, Any], party: str, weights: list[np.ndarray], dp_recorded: bool,
                             public_scalars: list[float]) -> list[str]:
    """The lender part's statement that its top is linear (shared/scoring/linear.py) repeats the graph's own
    weights: each array must be one of the party's trained, ledger-recorded parameters (the same release as the
    graph's initializers), every scalar a public one."""
    if party != "lender" or set(described) != {"form", "weights", "embedding_weights", "bias", "label_flip",
                                               "probability_floor", "probability_ceiling"}:
        raise Unaccounted(f"{party}: linear description with keys {sorted(described)}")
    seen = []
    for key in ("weights", "embedding_weights", "bias"):
        value = np.atleast_1d(np.asarray(described[key], dtype=np.float32))
        if any(_same(value, w.ravel()) for w in weights):
            if not dp_recorded:
                raise Unaccounted(f"{party}: {LINEAR_KEY}.{key} shipped without a DP-SGD release in the ledger")
            seen.append(f"weight:{LINEAR_KEY}.{key}")
        elif value.size == 1 and any(math.isclose(float(value[0]), c, rel_tol=1e-6) for c in public_scalars):
            seen.append(f"constant:{LINEAR_KEY}.{key}")  # a fixed partial-logit weight of 1
        else:
            raise Unaccounted(f"{party}: {LINEAR_KEY}.{key} is not the party's trained parameter: {value[:4]}")
    for key in ("label_flip", "probability_floor", "probability_ceiling"):
        if not any(math.isclose(described[key], c, rel_tol=1e-6, abs_tol=1e-9) for c in public_scalars):
            raise Unaccounted(f"{party}: {LINEAR_KEY}.{key} = {described[key]} is no public constant")
    return seen


def check_manifest(manifest: dict[str, Any], model_dir: Path, run: Path, data: Path) -> None:
    """Every key of the manifest, against what it may be; unknown keys fail."""
    config = json.loads((run / "config.json").read_text())
    privacy = json.loads((run / "privacy-report.json").read_text())["guarantees"]
    lender_schema, payment_schema = load_schema(data / "lender"), load_schema(data / "payment")
    schemas = {"lender": lender_schema, "payment": payment_schema}
    allowed: dict[str, Any] = {
        "format_version": lambda v: v == "2",
        "created_at": lambda v: isinstance(v, str),
        "parts": lambda v: set(v) == set(FILES),
        "embedding_dim": lambda v: v == _sent_dim(config),  # numbers per applicant: 1 for a partial logit
        "training_config": lambda v: v == config,
        "privacy": lambda v: v == privacy,
        "scorecard": lambda v: v == json.loads(ScorecardParams().model_dump_json()),
        "payment_feature_definition": lambda v: v is None,  # a ready feature table: no definition to carry
        "lender_reference": lambda v: v == lender_schema.references(),
    }
    for key, value in manifest.items():
        if key not in allowed:
            raise Unaccounted(f"manifest key {key!r} is not on the allow-list")
        if not allowed[key](value):
            raise Unaccounted(f"manifest key {key!r} holds {str(value)[:80]}, not the public/recorded value")
    for party, part in manifest["parts"].items():
        scaler = Scaler.from_schema(schemas[party])
        checks = {
            "file": part.get("file") == FILES[party],
            "sha256": part.get("sha256") == sha256_file(model_dir / FILES[party]),
            "inputs": isinstance(part.get("inputs"), list), "outputs": isinstance(part.get("outputs"), list),
            "input_dtypes": set(part.get("input_dtypes", {}).values()) <= {"float32"},
            "input_shapes": all(d == "batch" or isinstance(d, int) for s in part.get("input_shapes", {}).values()
                                for d in s),
            "feature_names": part.get("feature_names") == scaler.columns,
            "log_columns": part.get("log_columns") == scaler.log_columns,
        }
        for key in part:
            if key not in checks:
                raise Unaccounted(f"manifest parts.{party}.{key} is not on the allow-list")
            if not checks[key]:
                raise Unaccounted(f"manifest parts.{party}.{key} is not the public/recorded value")


def walk_bundle(model_dir: Path, run: Path, data: Path) -> list[str]:
    names = sorted(p.name for p in model_dir.iterdir())
    if names != sorted([MANIFEST_NAME, *FILES.values()]):
        raise Unaccounted(f"model/ holds {names}; only the manifest and the two parts may ship")
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    check_manifest(manifest, model_dir, run, data)
    config = json.loads((run / "config.json").read_text())
    seen = []
    for party, file in FILES.items():
        scaler = Scaler.from_schema(load_schema(data / party)).to_dict()
        scaler = torch.load(run / "parties" / party / "state.pt", weights_only=True)["scaler"]
        seen += check_graph(onnx.load(str(model_dir / file)), party, _schema_constants(data, party, run),
                            _weights(run, party), _trained_under_dp_sgd(run, party), config, scaler)
    return seen


# ------------------------------------------------------------------------------------------------------ tests


@pytest.mark.slow
def test_everything_in_model_is_public_or_ledger_recorded(private_run: tuple[Path, Path]) -> None:
    data, run = private_run
    seen = walk_bundle(run / "model", run, data)
    # the walk did look at the parts: both parts' weights and every preprocessing buffer were classified
    assert sum(s.startswith("weight:") for s in seen) >= 4
    assert sum(s.startswith("schema:scale.lower") for s in seen) == 2
    # the default lender top is linear and says so; its description holds the trained weights, nothing new
    assert {f"weight:{LINEAR_KEY}.weights", f"weight:{LINEAR_KEY}.bias"} <= set(seen)
    # the centre and scale are the DP statistics each party charged to its ledger, not fitted values
    assert all(_dp_statistics_recorded(run, party) for party in FILES)
    for party in FILES:
        from fedscore.clients.lender.data import load_lender_table
        from fedscore.clients.payment.data import load_payment_table

        table = load_lender_table(data / party)[0] if party == "lender" else load_payment_table(data / party)
        schema_scaler = Scaler.from_schema(table.schema)
        released = Scaler(**torch.load(run / "parties" / party / "state.pt", weights_only=True)["scaler"])
        z = schema_scaler.transform(table.values)[:, :len(schema_scaler.columns)].astype(np.float64)
        exact = np.asarray(schema_scaler.mean) + z.mean(0) * np.asarray(schema_scaler.std)
        assert not np.allclose(released.mean, exact, rtol=0, atol=1e-9)  # noise was added ...
        assert np.allclose(released.mean, exact, atol=0.2 * np.asarray(schema_scaler.std).max())  # ... and it is usable


@pytest.mark.slow
def test_metrics_stay_in_metrics_json_marked_evaluation_only(private_run: tuple[Path, Path]) -> None:
    _, run = private_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert "clean validation/test labels" in metrics["evaluation_only"]
    assert "never ship in model/" in metrics["evaluation_only"]
    assert "baselines" not in metrics  # in parties/ (tests/test_run_dir_release.py), never at the top level
    assert str(metrics["test"]["auc"]) not in (run / "model" / MANIFEST_NAME).read_text()


@pytest.mark.slow
def test_the_walker_catches_a_fitted_scaler(private_run: tuple[Path, Path], tmp_path: Path) -> None:
    """What the old code shipped: the scaler's mean fitted over all rows. Planted into the graph, it is caught."""
    from fedscore.clients.lender.data import load_lender_table

    data, run = private_run
    model = onnx.load(str(run / "model" / LENDER_FILE))
    table, _ = load_lender_table(data / "lender")
    fitted = Scaler.fit(table.columns, table.values, Scaler.from_schema(table.schema).log_columns)
    for init in model.graph.initializer:
        if init.name == "scale.mean":
            init.CopyFrom(numpy_helper.from_array(np.asarray(fitted.mean, dtype=np.float32), "scale.mean"))
    config = json.loads((run / "config.json").read_text())
    scaler = torch.load(run / "parties" / "lender" / "state.pt", weights_only=True)["scaler"]
    with pytest.raises(Unaccounted, match=r"scale\.mean"):
        check_graph(model, "lender", _schema_constants(data, "lender", run), _weights(run, "lender"), True, config,
                    scaler)
    # the released DP statistics pass only while the ledger records them
    with pytest.raises(Unaccounted, match=r"scale\.mean"):
        check_graph(onnx.load(str(run / "model" / LENDER_FILE)), "lender", _schema_constants(data, "lender"),
                    _weights(run, "lender"), True, config, scaler)
    # and weights without a DP-SGD release in the ledger are not accepted either
    with pytest.raises(Unaccounted, match="without a DP-SGD release"):
        check_graph(onnx.load(str(run / "model" / LENDER_FILE)), "lender", _schema_constants(data, "lender", run),
                    _weights(run, "lender"), False, config, scaler)


@pytest.mark.slow
@pytest.mark.parametrize("key, value", [
    ("metrics", {"test": {"auc": 0.8}}),  # clean-label evaluation figures
    ("embedding_baseline", [0.1] * 8),  # a mean training embedding
    ("lender_reference", None),  # replaced below by medians of the applicants
])
def test_the_walker_catches_unaccounted_manifest_items(private_run: tuple[Path, Path], key: str, value: Any) -> None:
    from fedscore.clients.lender.data import load_lender_table

    data, run = private_run
    manifest = json.loads((run / "model" / MANIFEST_NAME).read_text())
    if key == "lender_reference":
        table, _ = load_lender_table(data / "lender")
        value = np.median(table.values, axis=0).tolist()  # what the old code shipped
    manifest[key] = value
    with pytest.raises(Unaccounted, match=key):
        check_manifest(manifest, run / "model", run, data)


@pytest.mark.slow
def test_the_walker_catches_a_linear_description_that_is_not_the_trained_weights(
        private_run: tuple[Path, Path]) -> None:
    data, run = private_run
    model = onnx.load(str(run / "model" / LENDER_FILE))
    for prop in model.metadata_props:
        if prop.key == LINEAR_KEY:
            described = json.loads(prop.value)
            described["weights"] = [w * 1.01 for w in described["weights"]]
            prop.value = json.dumps(described)
            break
    else:
        raise AssertionError("the default (linear) lender part carries no linear description")
    config = json.loads((run / "config.json").read_text())
    scaler = torch.load(run / "parties" / "lender" / "state.pt", weights_only=True)["scaler"]
    with pytest.raises(Unaccounted, match="not the party's trained parameter"):
        check_graph(model, "lender", _schema_constants(data, "lender", run), _weights(run, "lender"), True, config,
                    scaler)
