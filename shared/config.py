"""The one run configuration both transports read: a TOML file validated by pydantic, plus `key=value` overrides.

The coordinator and both parties get the same config, so the in-process and the Flower path train the same model
for the same seed. Party-private settings (data paths, the alignment secret) are not here: each party gets those
from its own node config.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """What crosses between the parts (issue 18): with `payment_output="partial_logit"` the payment holder owns the
    projection w_P . h(x) of its embedding and sends ONE number per user, its partial logit, which the lender's top
    adds to the logit of its own columns (z = f_L(x_L) + c s); with "embedding" it sends the `embedding_dim`-wide
    h(x) and the lender's top combines it (needed only for a top that is not additive in the payment side)."""

    # issue 18 (BENCHMARKS.md), 3 seeds x 2 splits, privacy defaults: the partial logit (learned c, 4 rounds) median
    # 0.7323 / min 0.7188 against the 8-wide embedding's 0.7315 / 0.7151, with 4 numbers per user reaching the
    # lender instead of 32 (reconstruction excess over the final score 0.13-0.27 instead of ~0.50)
    payment_output: Literal["partial_logit", "embedding"] = Field(
        "partial_logit", description="what the payment holder sends per user: one partial logit, or its embedding")
    embedding_dim: int = Field(8, ge=1, le=256, description="width of the payment holder's embedding h(x) (what "
                               "crosses in 'embedding' mode; projected to one number first in 'partial_logit')")
    partial_logit_weight: Literal["fixed", "learned"] = Field(
        "learned", description="the lender's coefficient c on the partial logit: fixed at 1 (the payment holder's "
        "head sets the scale; d logit / d s = 1, so the residual reaches it at full strength), or learned from 1")
    payment_head_init: Literal["zero", "random"] = Field(
        "zero", description="the payment holder's projection head starts at zero (its first release is the "
        "constant 0: the lender's round 0 is lender-only and the first real release is already fitted to its "
        "residuals) or random, like the other layers")
    # issue 18, sixth session (BENCHMARKS.md "A linear payment part"): at 2 rounds the payment part trains in one
    # round of DP-SGD (~10 steps on UCI), too few for [128, 64]; linear (columns -> embedding -> its head) kept a
    # median 0.660 of FATE's lift (min 0.493) against 0.458 (min 0.177), and 0.819 of the scenario split's over 12
    # runs against 0.804
    payment_hidden: list[int] = Field(default_factory=list, description="[] = a linear payment part")
    # issue #13 (BENCHMARKS.md): a hidden layer of 16 tied the linear top over 3 seeds x 2 splits on UCI, with and
    # without privacy, so the simpler, additive top stays
    lender_hidden: list[int] = Field(default_factory=list, description="[] = a linear top (logistic) on the "
                                     "lender's features + the embedding: few parameters is what DP-SGD favours")
    # issue 18 item 5 (BENCHMARKS "Issue 18: the lender's own final part"): the part the lender scores with is its
    # own, fitted on its clean labels after the last exchange; the payment holder never receives it, so nothing of it
    # is charged against the payment holder, and it is not DP against anyone else handed model/
    lender_part: Literal["gbdt", "top"] = Field(
        "gbdt", description="the lender's scoring part: 'gbdt' = its own gradient-boosted model on its columns + the "
        "last partial logit, fitted on clean labels after the last round and chosen on validation (held by the "
        "lender, not DP); 'top' = the DP-SGD top trained on randomized-response labels (DP against an outsider)")


    @property
    def sent_dim(self) -> int:
        """Numbers per user the payment holder sends (each round, each online answer)."""
        return 1 if self.payment_output == "partial_logit" else self.embedding_dim


class TrainingConfig(_Strict):
    # issue 18 (BENCHMARKS.md "the lender's own final part"): with 2 rounds the partial logit starts at 0 (round 0
    # the lender's alone) and round 1's release is the only real one, the one the score uses. With the DP top as the
    # scoring part, 2 rounds kept less of the lift than 4 (median 0.716 against 0.781); with the lender's own GBDT
    # part (model.lender_part) they keep 0.852 on UCI's scenario split. What that one release adds to the score, for
    # a lender that inverts its own part (fedscore/audit/reconstruction.py), is at most 0.016 in pooled R^2 over 12
    # runs; a third round would add an earlier projection the score does not give
    rounds: int = Field(2, ge=1, le=100, description="exchanges: the payment side's outputs one way, gradients back")
    local_epochs: int = Field(3, ge=1, le=100, description="epochs each party takes on its side per round")
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    proximal_eta: float = Field(
        2.0, gt=0, description="payment pull toward the embedding it released: g + (h - H_r)/eta"
    )


class SplitConfig(_Strict):
    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)


class BaselineConfig(_Strict):
    enabled: bool = True
    epochs: int = Field(30, ge=1, description="MLP epochs at most (early-stopped on validation AUC)")
    references: bool = Field(True, description="with enabled, a local run also tunes the lender-only and centralized "
                             "GBDT references and writes the lift kept to RUN_DIR/parties/evaluation/ "
                             "(fedscore/references.py;"
                             " cached per data folder and secret)")


GRADIENT_NOISE_DEFAULT = 2.5


class PrivacyConfig(_Strict):
    """What protects each thing that crosses. Give eps targets (noise is calibrated to them over the planned
    rounds) or noise multipliers directly; None turns a mechanism off.

    lender.labels against the payment holder counts everything it receives that depends on the training labels:
    randomized response (label_epsilon), and computed from its output the lender's DP-SGD steps and each gradient
    exchange with its Gaussian noise (gradient_noise_multiplier), composed as an RR mixture: never above
    label_epsilon, lower the more noise the exchanges carry."""

    enabled: bool = True
    delta: float = Field(1e-6, gt=0, lt=1e-3, description="for every (eps, delta) guarantee; well below 1/N")
    # lender.labels against the payment holder
    label_epsilon: float | None = Field(2.0, gt=0, description="randomized response on the training labels, once")
    rr_loss: Literal["plain", "forward"] = Field(
        "plain", description="how the lender learns from randomized-response labels: 'plain' log loss of the "
        "flipped labels, or 'forward' (forward-corrected: the model's sigmoid is the clean probability and the "
        "loss knows the public flip rate); post-processing either way")
    # issue #9 (BENCHMARKS.md): randomized response alone lets the payment holder read the released labels from the
    # gradients (norm/cosine attack AUC 0.88 at eps 2, its ceiling); this noise brings them under 0.60. Issue #18: it
    # is counted (issue 18: 2.5 for the one exchange of the default 2 rounds holds the principal-direction attack
    # under 0.60, where 2.0 reached 0.608). The lender's model is trained with DP-SGD (its steps charged to
    # lender.labels@payment as well), so
    # each exchange is a Gaussian on the residual (sensitivity 1), and behind randomized response the label claim is
    # the RR mixture of all of it (shared/privacy/accounting.py), below label_epsilon. Without DP-SGD or without this
    # noise the exchanges are charged as not DP and the claim is randomized response's alone. It is dropped when
    # label_epsilon is unset (its Gaussian bound does not hold for a model trained on clean labels)
    gradient_noise_multiplier: float | None = Field(
        GRADIENT_NOISE_DEFAULT, ge=0, description="clipped Gaussian on the returned gradients, per exchange, on top "
        "of randomized response; counted in lender.labels@payment (with the lender's DP-SGD, as an RR mixture)")
    gradient_clip: float = Field(1.0, gt=0, description="clip of the label Jacobian rows J_i")
    gradient_noise_shape: Literal["residual", "isotropic"] = Field(
        "residual", description="where the gradient noise goes: on each residual p_i - y_i, along J_i (the line a "
        "label moves g_i on), or in every coordinate; the same Gaussian guarantee either way")
    # payment.features against the lender
    feature_epsilon: float | None = Field(None, gt=0, description="Gaussian embedding noise target; None = off")
    feature_noise_multiplier: float | None = Field(None, gt=0)
    embedding_clip: float = Field(1.0, gt=0)
    feature_final_share: float | None = Field(
        None, gt=0, lt=1, description="share of the embeddings' Gaussian budget (of mu^2) spent on the last round's "
        "release, the one the final top model and its scores use; the earlier, noisier releases only carry "
        "gradients back. None = the same noise every round")
    # the lender knows who is in the intersection, so a user's record is replaced (by another's), never removed
    feature_neighbouring: Literal["add_remove", "replace_one"] = "replace_one"
    # issue 18 (BENCHMARKS.md "Issue 18 must-show"): with one partial logit per user the payment holder's update is
    # weak under its DP-SGD noise; 4 kept a median 0.781 of the lift on UCI (0.700 at 1) and 61% on the demo (23%)
    feature_gradient_scale: float = Field(
        4.0, gt=0, description="fixed, public multiplier on the gradients the payment holder receives; never "
        "computed from users (an RMS over users would make one user's update depend on the others)")
    # how the payment part learns from the gradients it receives, when it is DP against the outsider
    # (shared/privacy/statistics_fit.py). Issue 18, seventh session (BENCHMARKS "The payment part from sufficient
    # statistics"), 3 seeds x 2 splits, attacks on: the statistics fit kept a median 0.879 (min 0.794) of the
    # scenario split's lift and 0.829 (min 0.479) of FATE's, against DP-SGD's 0.826 (0.767) and 0.660 (0.493), at the
    # same label eps and outsider eps 3
    payment_fit: Literal["auto", "dp_sgd", "statistics"] = Field(
        "auto", description="'dp_sgd': Opacus DP-SGD steps on the proximal loss; 'statistics': one ridge "
        "regression of the received residuals on the payment columns per exchange, from a Gram matrix and moment "
        "vector released with Gaussian noise (a linear part sending one partial logit only); 'auto' (resolved "
        "when the run config is read): 'statistics' where the part is such, else 'dp_sgd'")
    payment_fit_noise_multiplier: float = Field(
        4.0, ge=0.5, description="the statistics fit's Gaussian noise std over sensitivity (C^2 for the Gram "
        "matrix, C B for the moments); charged to joint.records@outsider, and to payment.features@lender when "
        "features are protected")
    payment_fit_row_clip: float = Field(5.0, gt=0, description="C: L2 clip of each user's scaled payment row "
                                        "(the constant 1 of the intercept included) in the statistics fit")
    payment_fit_target_clip: float = Field(6.0, gt=0, description="B: clip of each received gradient (its "
                                           "target, negated) in the statistics fit")
    payment_fit_ridge: float = Field(1e4, gt=0, description="lambda of the statistics fit's ridge, public; large "
                                     "next to the Gram noise (z C^2 sqrt(d)) so the noisy system stays well posed")
    # the released model, against an outsider: DP-SGD (Opacus) on both parts
    outsider_epsilon: float | None = Field(3.0, gt=0, description="DP-SGD target for each released part")
    dpsgd_noise_multiplier: float | None = Field(
        None, ge=0.3, description="below ~0.3 the eps is meaningless (hundreds) and the PRV accountant crawls")
    lender_dpsgd_noise_multiplier: float | None = Field(
        None, ge=0.3, description="the lender's top's own DP-SGD noise; the payment part is then calibrated to what "
        "is left of outsider_epsilon. A noisier top (it has a handful of parameters) costs the labels' guarantee "
        "against the payment holder far less. None = both parts take the same noise")
    # tuned on UCI (BENCHMARKS.md): per-sample gradient norms are heavy-tailed (median ~0.4, p90 2-5), so a clip
    # of 1 cut the hard, mostly-default examples; at 3 the noise costs ~0.005 AUC
    dpsgd_clip: float = Field(3.0, gt=0, description="per-sample gradient clip (max_grad_norm)")
    dpsgd_batch_size: int = Field(4096, ge=1, description="expected Poisson batch size under DP-SGD")
    # issue #13 (BENCHMARKS.md): 3 epochs tied 2 over 3 seeds x 2 splits; batches of 2048 and 8192 were worse
    dpsgd_local_epochs: int = Field(2, ge=1, description="local epochs per round under DP-SGD")
    dpsgd_lr: float = Field(2e-2, gt=0, description="Adam under DP-SGD (weight decay is ~1/B as strong there)")
    scaler_noise_multiplier: float | None = Field(
        30.0, ge=1.0, description="DP per-column means/stds refine the schema's scaling (noise std / sensitivity); "
        "charged to the outsider guarantee with DP-SGD; None = bounds-only scaling")
    replayable_noise: bool = Field(
        False, description="TEST ONLY: derive every privacy draw from `seed`, so runs can be replayed and compared; "
        "voids every guarantee (reports, manifest and CLI say VOID, services refuse the bundle)")

    @model_validator(mode="after")
    def _sound(self) -> PrivacyConfig:
        if self.label_epsilon is None and "gradient_noise_multiplier" not in self.model_fields_set:
            self.gradient_noise_multiplier = None  # the default rides on randomized response only
        if self.gradient_noise_multiplier is not None and self.label_epsilon is None:
            raise ValueError("gradient_noise_multiplier needs label_epsilon: without randomized response the "
                             "lender's model is trained on clean labels, and p_i and J_i in the gradients would "
                             "carry them past the noise's sensitivity bound")
        if self.enabled and (self.feature_epsilon is not None or self.feature_noise_multiplier is not None) and (
                self.outsider_epsilon is None and self.dpsgd_noise_multiplier is None):
            raise ValueError("feature protection (feature_epsilon / feature_noise_multiplier) needs DP-SGD on the "
                             "payment part (outsider_epsilon or dpsgd_noise_multiplier): the payment model, trained "
                             "on every training user, reaches the lender through every embedding it computes")
        return self

    @property
    def labels_protected(self) -> bool:
        return self.enabled and (self.label_epsilon is not None or self.gradient_noise_multiplier is not None)

    @property
    def gradient_noise_on(self) -> bool:
        """The lender adds gradient noise (the validator ties it to randomized response, so it is on top of it)."""
        return bool(self.enabled and self.gradient_noise_multiplier)

    @property
    def features_protected(self) -> bool:
        return self.enabled and (self.feature_epsilon is not None or self.feature_noise_multiplier is not None)

    @property
    def dp_sgd(self) -> bool:
        return self.enabled and (self.outsider_epsilon is not None or self.dpsgd_noise_multiplier is not None)

    @property
    def statistics_fit(self) -> bool:
        """The payment part learns by the DP statistics fit, not DP-SGD: it is DP against the outsider and the
        config asks for it (FedConfig checks that the part is then linear with one partial logit)."""
        return self.dp_sgd and self.payment_fit == "statistics"

    @property
    def dp_scaler(self) -> bool:
        """DP standardisation statistics ship only where the released model is itself DP (otherwise the schema's
        bounds alone scale the features: a non-private model would leak far more than its scaler anyway)."""
        return self.dp_sgd and self.scaler_noise_multiplier is not None


class AuditConfig(_Strict):
    """What an audit run adds (`fedscore audit`, experiments): transcripts of what each party received, and
    canary users the one-run audit scores. Neither changes a guarantee: canaries are extra synthetic rows,
    forced into the training split, that the run's metrics never see."""

    record_transcripts: bool = Field(
        False, description="each party writes what it received, as received, to its state directory "
        "(clients/transcript.py); the run copies them to RUN_DIR/transcripts/")
    canaries: int = Field(0, ge=0, le=100_000, description="synthetic canary users added to both parties' tables "
                          "(clients/canaries.py), each with a label drawn uniformly at random by the lender")
    gradient_canaries: int = Field(0, ge=0, le=100_000, description="Dirac gradient canaries in each party's "
                                   "DP-SGD, or on the payment part's statistics fit, for the white-box one-run audit "
                                   "of each released part (shared/privacy/gradient_canaries.py, statistics_fit.py); "
                                   "they change the part like extra users")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="the one-run audits' confidence: a reported lower "
                              "bound holds with this probability, so a mechanism exactly as tight as its claim (such "
                              "as randomized response read perfectly) is flagged with probability up to 1 - "
                              "confidence; raise it to trade power for fewer false alarms")


# Flower moves each Array in pieces of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (5 MiB) over its HTTP fleet API, and every
# gRPC channel Flower opens allows 2 GiB (flwr/supercore/grpc.py); our launcher raises nothing. gRPC's own default
# receive limit is 4 MiB, the tightest limit anything on the path could have, so a chunk stays well under it.
DEFAULT_CHUNK_BYTES = 2 << 20
MIN_CHUNK_BYTES = 2048  # room for one row and the chunk's own framing (shared/protocol/chunks.py CHUNK_OVERHEAD)


class ExchangeConfig(_Strict):
    """How the per-user payloads (embeddings one way, gradients back) cross: in chunks of users, each sealed on its
    own (shared/protocol/chunks.py). Why: one message holding every user's row grows without bound with the
    portfolio (32 MB of embeddings at 1M users x 8 numbers) and would meet a transport's message limit; chunks of
    whole users under a byte cap never do, and several of them still travel in one Flower message."""

    chunk_bytes: int = Field(DEFAULT_CHUNK_BYTES, ge=0, description="most bytes one sealed chunk of embeddings or "
                             "gradients may take (framing included); 0 = no cap, every user in one chunk")

    @model_validator(mode="after")
    def _room_for_a_row(self) -> ExchangeConfig:
        if 0 < self.chunk_bytes < MIN_CHUNK_BYTES:
            raise ValueError(f"exchange.chunk_bytes = {self.chunk_bytes}: a chunk needs at least {MIN_CHUNK_BYTES} "
                             "bytes (one user's row plus its framing); 0 turns the cap off")
        return self


class AlignmentConfig(_Strict):
    """How the parties find their common users: ECDH private set intersection (shared/alignment/psi.py), over
    X25519 (shared/alignment/x25519.py, SecretFlow's default) or over P-256 with OpenMined's openmined-psi. Both
    reveal the same (the lender: the intersection and the payment holder's set size; the payment holder: the
    lender's set size); x25519 costs about a third of the CPU (BENCHMARKS.md, "PSI at 1M x 500k")."""

    psi: Literal["x25519", "openmined"] = Field("x25519", description="the PSI implementation the lender asks for; "
                                                "the payment holder refuses a request in the other one")


class FedConfig(_Strict):
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    baselines: BaselineConfig = Field(default_factory=BaselineConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    exchange: ExchangeConfig = Field(default_factory=ExchangeConfig)
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig)

    @model_validator(mode="after")
    def _statistics_fit_fits_the_part(self) -> FedConfig:
        """Resolve payment_fit = 'auto' (written resolved in every config.json) and refuse a statistics fit of a
        part it cannot write."""
        linear = not self.model.payment_hidden and self.model.payment_output == "partial_logit"
        if self.privacy.payment_fit == "auto":
            self.privacy.payment_fit = "statistics" if linear else "dp_sgd"
        if self.privacy.statistics_fit and not linear:
            raise ValueError("privacy.payment_fit = 'statistics' fits a linear part that sends one partial logit: "
                             "it needs model.payment_hidden = [] and model.payment_output = 'partial_logit' (or use "
                             "privacy.payment_fit = 'dp_sgd')")
        return self


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the field."""


def _parse_value(text: str) -> Any:
    """An override value is read as TOML (numbers, booleans, lists, quoted strings); `none` unsets an optional
    setting (TOML has no null); other bare words stay strings."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. training.rounds=5")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_value(raw.strip())
    return data


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> FedConfig:
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML: {exc}") from exc
    data = apply_overrides(data, overrides or [])
    try:
        return FedConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"config ({source}{', with overrides' if overrides else ''}): {problems}") from exc
