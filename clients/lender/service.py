"""The lender's online scoring service: POST /score {"id": ...} -> the decision for one applicant, over HTTP/JSON.

At startup it loads the bundle (hash-checked) and its applicants' raw features from DIR/lender/applicants.*. A
request looks the applicant up, asks the payment holder's gRPC service for that user's embedding and coarse signals
(with a deadline), and runs `fedscore.clients.lender.scoring.LenderScorer` — the same lender part + scorecard + reasons
as batch scoring, so with the payment side's noise off an online score equals the batch score.

Failure modes, each with a reason in `detail`:
  422  malformed body (pydantic)                       404  the lender has no such applicant
  503  payment service down / too slow / refused the release ("payment service unavailable: ..." or its refusal)
  502  the payment service answered with something this model cannot use (another model part, wrong width)
An applicant the payment holder does not serve (NOT_FOUND: outside the intersection of this model version) is not
an error: it is scored with the baseline embedding, flagged for review and given the reason "no payment history
with the partner", exactly as in batch scoring. Coarse signals the payment holder withholds (its default: empty
strings) are scored as the neutral ones (spend "mid", "stable", no anomaly).

Transport: `credentials` (grpc.ssl_channel_credentials with the lender's client pair, `fedscore.shared.tls`) for the
payment service's mutual TLS; without them the channel is plaintext, which the CLI allows to loopback only.
"""

from __future__ import annotations

import gc
import hmac
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import grpc
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fedscore.clients.lender.scoring import LenderScorer, load_applicant_features
from fedscore.proto import fedscore_scoring_pb2 as pb2
from fedscore.proto import fedscore_scoring_pb2_grpc as pb2_grpc
from fedscore.shared.scoring.bundle import ScoringBundle, load_scoring_bundle
from fedscore.shared.scoring.payment_signals import PaymentSignals
from fedscore.shared.waiting import wait_until

log = logging.getLogger(__name__)

# reconnect quickly once the payment service is back, rather than backing off for up to two minutes
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000)]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]


class ScoreResponse(BaseModel):
    id: str
    probability: float = Field(description="probability of default")
    score: int = Field(description="scorecard points")
    tier: str
    credit_limit: float
    review_flag: bool
    reasons: list[str] = Field(description="factors that lowered the score, worst first")


class PaymentServiceError(Exception):
    """The payment side could not give a usable answer; `status` is the HTTP status to return."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class PaymentAnswer:
    embedding: np.ndarray  # float32 [1, d]
    signals: PaymentSignals


class PaymentClient:
    """GetEmbedding over gRPC with a deadline; translates status codes into what the lender does about them."""

    def __init__(self, address: str, bundle: ScoringBundle, timeout_s: float,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.expected_sha256 = bundle.part_sha256("payment")
        self.embedding_dim = bundle.embedding_dim
        self.channel = (grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS) if credentials
                        else grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
        self.stub = pb2_grpc.PaymentScoringStub(self.channel)

    def fetch(self, user_id: str) -> PaymentAnswer | None:
        """The user's embedding and signals; None if the payment holder does not serve this user (NOT_FOUND: not in
        the intersection of this model version, whether or not it is a customer there)."""
        try:
            reply = self.stub.GetEmbedding(pb2.EmbeddingRequest(user_id=user_id), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.NOT_FOUND:
                return None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise PaymentServiceError(503, details or "release refused by the payment holder") from exc
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise PaymentServiceError(503, f"payment service unavailable: {code.name}: {details}") from exc
            raise PaymentServiceError(502, f"payment service error: {code.name}: {details}") from exc
        return self._check(reply)

    def _check(self, reply: pb2.EmbeddingReply) -> PaymentAnswer:
        if reply.payment_part_sha256 != self.expected_sha256:
            raise PaymentServiceError(502, f"payment service runs another model part (sha256 "
                                           f"{reply.payment_part_sha256[:12]}..., this lender expects "
                                           f"{self.expected_sha256[:12]}...); deploy the same bundle on both sides")
        embedding = np.asarray(reply.embedding, dtype=np.float32)
        if embedding.shape != (self.embedding_dim,) or not np.isfinite(embedding).all():
            raise PaymentServiceError(502, f"payment service sent an embedding of {embedding.size} values, "
                                           f"expected {self.embedding_dim} finite ones")
        if not reply.spend_level and not reply.stability and not reply.recent_spend_anomaly:
            return PaymentAnswer(embedding[None, :], PaymentSignals.neutral(1))  # withheld: no evidence either way
        try:
            signals = PaymentSignals.single(reply.spend_level, reply.stability, reply.recent_spend_anomaly)
        except ValueError as exc:
            raise PaymentServiceError(502, f"payment service sent unusable signals: {exc}") from exc
        return PaymentAnswer(embedding[None, :], signals)

    def ready(self, timeout_s: float = 0.5) -> bool:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            return False
        return True

    def close(self) -> None:
        self.channel.close()


class LenderService:
    """Applicants in memory + the lender part; `score(id)` is one online decision."""

    def __init__(self, bundle: ScoringBundle, data_dir: Path, payment: PaymentClient,
                 blacklist: set[str] | None = None) -> None:
        self.bundle = bundle
        self.scorer = LenderScorer(bundle)
        self.applicants = load_applicant_features(bundle, data_dir)
        self.rows = self.applicants.index()
        self.payment = payment
        self.blacklist = frozenset(blacklist or ())

    def score(self, applicant_id: str) -> ScoreResponse:
        row = self.rows.get(applicant_id)
        if row is None:
            raise HTTPException(404, f"no applicant with id {applicant_id!r} in the lender's applicant file")
        try:
            answer = self.payment.fetch(applicant_id)
        except PaymentServiceError as exc:
            raise HTTPException(exc.status, exc.reason) from exc
        has_payment = answer is not None
        embedding = answer.embedding if answer is not None else self.scorer.baseline[None, :]
        signals = answer.signals if answer is not None else PaymentSignals.neutral(1)
        result = self.scorer.score(self.applicants.features[row:row + 1], embedding, np.array([has_payment]),
                                   signals, np.array([applicant_id in self.blacklist]))
        return ScoreResponse(id=applicant_id, probability=float(result.probability[0]), score=int(result.score[0]),
                             tier=str(result.tier[0]), credit_limit=float(result.credit_limit[0]),
                             review_flag=bool(result.review_flag[0]), reasons=result.reasons[0])


def create_app(model_dir: Path, data_dir: Path, payment_address: str, timeout_s: float = 2.0,
               blacklist: set[str] | None = None, credentials: grpc.ChannelCredentials | None = None, *,
               api_token: str) -> FastAPI:
    """Load the bundle and the applicants now (errors surface at startup, not at the first request).

    Every request must carry `Authorization: Bearer <api_token>` (compared in constant time): a score is a credit
    decision built from the payment holder's noisy answer, which the payment holder charges to its privacy budget,
    so an unauthenticated caller must not be able to spend it. A refused request is logged with its source."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if len(api_token) < 16:
        raise ValueError("api_token must be at least 16 characters")
    bundle = load_scoring_bundle(model_dir)
    payment = PaymentClient(payment_address, bundle, timeout_s, credentials)
    service = LenderService(bundle, data_dir, payment, blacklist)
    log.info("lender service: %d applicants from %s, payment service at %s", len(service.rows),
             service.applicants.source, payment_address)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        payment.close()

    async def authorised(request: Request) -> None:  # async: checked on the event loop, no thread hop per request
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), api_token.encode()):
            source = request.client.host if request.client else "?"
            log.warning("refused %s %s from %s: %s bearer token", request.method, request.url.path, source,
                        "wrong" if given else "no")
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="fedscore lender scoring", lifespan=lifespan, dependencies=[Depends(authorised)])
    app.state.service = service

    @app.post("/score", response_model=ScoreResponse)
    def score(request: ScoreRequest) -> Response:
        # a plain def: FastAPI runs it in its worker threads, so the blocking gRPC call does not stall the loop.
        # The answer is built (and validated) once as a ScoreResponse and sent as its JSON: returned as a model,
        # FastAPI would dump it, validate it again against response_model and encode it again
        return Response(service.score(request.id).model_dump_json(), media_type="application/json")

    @app.get("/health")
    def health() -> dict[str, object]:
        return {"status": "ok", "applicants": len(service.rows),
                "payment_service": "ready" if payment.ready() else "unreachable",
                "model": {party: bundle.part_sha256(party) for party in ("payment", "lender")}}

    return app


def run_lender_service(model_dir: Path, data_dir: Path, payment_address: str, host: str = "127.0.0.1",
                       port: int = 8080, timeout_s: float = 2.0, blacklist: set[str] | None = None,
                       credentials: grpc.ChannelCredentials | None = None, *, api_token: str) -> None:
    """create_app, served by uvicorn until interrupted; `credentials` for mutual TLS to the payment service,
    `api_token` the bearer token every caller must present."""
    import uvicorn

    app = create_app(model_dir, data_dir, payment_address, timeout_s, blacklist, credentials, api_token=api_token)
    gc.freeze()  # what startup loaded is never garbage: keep it out of every later collection (shorter pauses)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, ws="none")


class LenderThread:
    """Serve an app with uvicorn in a background thread (tests, benchmarks, embedding in another process).

    `start()` returns once the socket is listening; `port` is the bound port (ask for 0 to get a free one).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="on", ws="none"))
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self.server.run, name="lender-http", daemon=True)

    def start(self, timeout_s: float = 10.0) -> LenderThread:
        self._thread.start()

        def started() -> bool:
            if not self._thread.is_alive():
                raise RuntimeError(f"lender service did not start on {self.host}:{self.port}: its thread ended")
            return bool(self.server.started)

        wait_until(started, timeout_s, 0.01, f"lender service did not start on {self.host}:{self.port}", RuntimeError)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
