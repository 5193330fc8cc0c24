"""Export each party's model part as one self-contained ONNX graph, plus a hash-checked manifest.

Why one graph per party with the preprocessing inside: at scoring time each party runs only its own part, on raw
feature values, with nothing but onnxruntime. If the signed log1p + standardisation lived in Python next to the
graph, a scorer could silently skip it or use another version of it, and the scores would be wrong without any
error. Baking the scaler's numbers into the graph makes "raw features in, embedding / probability out" the only way
to use a part.

Exporter: the legacy TorchScript exporter (`torch.onnx.export(..., dynamo=False)`), opset 17. For these small MLPs
it takes ~0.1 s per part, against ~2 s for the dynamo exporter, and produces the same operators (MatMul/Gemm, Relu,
Log, Sign, Abs, Where, Sigmoid). torch is pinned, so its deprecation warning is silenced here on purpose.

Each party exports only its own part (its `on_export`); the operator gathers both into RUN_DIR/model with the
manifest (fedscore/bundle.py, `assemble_bundle`; the manifest model is shared/model/manifest.py, re-exported here).
`describe_part` reads a part's manifest entry from the file itself. `verify_parts` checks an export against the
training-time path (numpy Scaler + torch): tests use it, scoring never does.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedscore.shared.model.manifest import (  # noqa: F401 - re-exported: the names exporters and scorers share
    EMBEDDING,
    FORMAT_VERSION,
    LENDER_FILE,
    LENDER_INPUT,
    LOGIT,
    MANIFEST_NAME,
    PART_NAMES,
    PAYMENT_FILE,
    PAYMENT_INPUT,
    PROBABILITY,
    ModelManifest,
    PartManifest,
    load_manifest,
    sha256_file,
    write_manifest,
)
from fedscore.shared.model.parts import LenderTop, PaymentBottom
from fedscore.shared.model.preprocessing import Scaler
from fedscore.shared.scoring.linear import METADATA_KEY as LINEAR_METADATA_KEY
from fedscore.shared.scoring.linear import LinearTopDescription

OPSET = 17
BATCH = "batch"


class PaymentScoring(nn.Module):
    """Raw payment features -> embedding: what the payment holder runs at scoring time."""

    def __init__(self, model: PaymentBottom, scaler: Scaler) -> None:
        super().__init__()
        _check_width(model, len(scaler.output_names), "payment")
        self.scale = scaler.as_module()
        self.model = model

    def forward(self, payment_features: torch.Tensor) -> torch.Tensor:
        return self.model(self.scale(payment_features))


class LenderScoring(nn.Module):
    """Raw lender features + the payment embedding -> (probability of default, default logit)."""

    def __init__(self, model: LenderTop, scaler: Scaler) -> None:
        super().__init__()
        if model.embedding_dim < 1:
            raise ValueError("lender model has embedding_dim=0 (lender-only baseline): there is no payment part "
                             "to pair it with, so it cannot be exported as a federated lender part")
        # an additive top (partial logit) takes the lender's columns only; the embedding joins after its net
        _check_width(model, len(scaler.output_names) + (0 if model.partial_logit else model.embedding_dim), "lender")
        self.scale = scaler.as_module()
        self.model = model

    def forward(self, lender_features: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probability = self.model.probability(self.scale(lender_features), embedding)
        return probability, torch.log(probability) - torch.log1p(-probability)


def _check_width(model: nn.Module, expected: int, party: str) -> None:
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    if first.in_features != expected:
        raise ValueError(f"{party} model takes {first.in_features} inputs but its scaler (+ embedding) gives "
                         f"{expected}: model and scaler do not belong together")


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Export in eval mode, then give the caller back the module in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            metadata: dict[str, str]) -> None:
    """Trace `module` to `path` (written atomically) with a dynamic batch axis on every input and output."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    dynamic_axes = {name: {0: BATCH} for name in [*inputs, *outputs]}
    try:
        with _eval_mode(module), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter: torch is pinned, it is there
            torch.onnx.export(module, args, str(tmp), dynamo=False, opset_version=OPSET, input_names=inputs,
                              output_names=outputs, dynamic_axes=dynamic_axes, do_constant_folding=True)
        save_part(onnx.load(str(tmp)), path, metadata)
    finally:
        tmp.unlink(missing_ok=True)


def save_part(proto, path: Path, metadata: dict[str, str]) -> None:
    """Add `metadata` to the graph, check it with onnx's checker, write it to `path` atomically: every part's last
    step, whether traced from torch (`_export`) or built from trees (shared/model/lender_gbdt.py)."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def part_metadata(party: str, scaler: Scaler) -> dict[str, str]:
    """What every part says about itself: its party, the format, its feature names and its (public) scaler."""
    return {"fedscore.part": party, "fedscore.format_version": FORMAT_VERSION,
            "fedscore.feature_names": json.dumps(scaler.columns), "fedscore.scaler": json.dumps(scaler.to_dict())}


def export_payment_part(model: PaymentBottom, scaler: Scaler, path: Path) -> None:
    """Write the payment part: input "payment_features" float32 [N, n_payment] raw values in `scaler.columns`
    order -> output "embedding" float32 [N, d]."""
    module = PaymentScoring(model, scaler)
    example = torch.zeros(2, len(scaler.columns))
    _export(module, (example,), path, [PAYMENT_INPUT], [EMBEDDING], part_metadata("payment", scaler))


def export_lender_part(model: LenderTop, scaler: Scaler, path: Path) -> None:
    """Write the lender part: inputs "lender_features" float32 [N, n_lender] raw values in `scaler.columns` order
    and "embedding" float32 [N, d] -> outputs "probability" float32 [N] (sigmoid applied) and "logit" float32 [N].
    A top that is one linear layer also says so in the metadata (`linear_top_description`)."""
    module = LenderScoring(model, scaler)
    example = (torch.zeros(2, len(scaler.columns)), torch.zeros(2, model.embedding_dim))
    metadata = part_metadata("lender", scaler)
    linear = linear_top_description(model)
    if linear is not None:
        metadata[LINEAR_METADATA_KEY] = linear.model_dump_json()
    _export(module, example, path, [LENDER_INPUT, EMBEDDING], [PROBABILITY, LOGIT], metadata)


def linear_top_description(model: LenderTop) -> LinearTopDescription | None:
    """The top's own weights, bias and output form when it is ONE linear layer on the preprocessed features and the
    embedding (or partial logit), else None. Scorers use it for exact reason codes without occlusion runs
    (fedscore/shared/scoring/linear.py); it repeats the graph's initializers, so it releases nothing new."""
    layers = list(model.net)
    if len(layers) != 1 or not isinstance(layers[0], nn.Linear) or layers[0].bias is None:
        return None
    weight = layers[0].weight.detach().double().reshape(-1).tolist()
    if model.partial_logit is None:  # the embedding is concatenated after the preprocessed features
        width = len(weight) - model.embedding_dim
        weights, embedding_weights = weight[:width], weight[width:]
    elif model.partial_logit == "learned":
        weights, embedding_weights = weight, model.payment_weight.weight.detach().double().reshape(-1).tolist()
    else:
        weights, embedding_weights = weight, [float(model.payment_weight_fixed)]
    # the clip bounds exactly as the graph holds them (float32 constants: 1 - 1e-7 is 1 - 1.19e-7 there)
    floor = torch.where(model.label_flip > 0, 1e-3, 1e-7)
    return LinearTopDescription(form="logistic-after-preprocessing", weights=weights,
                                embedding_weights=embedding_weights, bias=float(layers[0].bias.detach()[0]),
                                label_flip=float(model.label_flip), probability_floor=float(floor),
                                probability_ceiling=float(1 - floor))


def _onnx_type_name(elem_type: int) -> str:
    import onnx

    return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))


def describe_part(path: Path, scaler: Scaler) -> PartManifest:
    """A PartManifest read from the exported file itself (names, dtypes, shapes), so it cannot drift from it."""
    import onnx

    path = Path(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in inputs}
    return PartManifest(
        file=path.name, sha256=sha256_file(path), inputs=[i.name for i in inputs],
        input_dtypes={i.name: _onnx_type_name(i.type.tensor_type.elem_type) for i in inputs}, input_shapes=shapes,
        feature_names=list(scaler.columns), log_columns=list(scaler.log_columns),
        outputs=[o.name for o in graph.output],
    )


# ------------------------------------------------------------------------------------------------ verification


def onnx_score(payment_onnx: Path, lender_onnx: Path, raw_p: np.ndarray, raw_l: np.ndarray) -> np.ndarray:
    """Probability of default from raw feature rows of both parties, using onnxruntime only (rows aligned), with
    the sessions the scorers open."""
    from fedscore.shared.scoring.bundle import ort_session

    embedding = ort_session(payment_onnx).run([EMBEDDING], {PAYMENT_INPUT: np.asarray(raw_p, dtype=np.float32)})[0]
    return ort_session(lender_onnx).run([PROBABILITY], {LENDER_INPUT: np.asarray(raw_l, dtype=np.float32),
                                                     EMBEDDING: embedding})[0]


def torch_score(model_p: PaymentBottom, scaler_p: Scaler, model_l: LenderTop, scaler_l: Scaler, raw_p: np.ndarray,
                raw_l: np.ndarray) -> np.ndarray:
    """The same probability through the training-time path (numpy Scaler + torch), the reference for the export."""
    with _eval_mode(model_p), _eval_mode(model_l), torch.no_grad():
        embedding = model_p(torch.from_numpy(scaler_p.transform(np.asarray(raw_p, dtype=np.float32))))
        probability = model_l.probability(torch.from_numpy(scaler_l.transform(np.asarray(raw_l, dtype=np.float32))),
                                          embedding)
    return probability.numpy()


def verify_parts(payment_onnx: Path, lender_onnx: Path, model_p: PaymentBottom, scaler_p: Scaler,
                 model_l: LenderTop, scaler_l: Scaler, raw_p: np.ndarray, raw_l: np.ndarray) -> float:
    """Max |p_onnx - p_torch| over the rows: the ONNX chain (payment graph's embedding fed to the lender graph)
    against numpy preprocessing + torch. Raw inputs are cast to float32 first, as a scorer would have to."""
    onnx_p = onnx_score(payment_onnx, lender_onnx, raw_p, raw_l)
    torch_p = torch_score(model_p, scaler_p, model_l, scaler_l, raw_p, raw_l)
    if onnx_p.shape != torch_p.shape:
        raise ValueError(f"ONNX gives shape {onnx_p.shape}, torch {torch_p.shape}")
    return float(np.max(np.abs(onnx_p.astype(np.float64) - torch_p.astype(np.float64)))) if len(onnx_p) else 0.0
