"""The payment holder's online scoring service: gRPC `GetEmbedding(user_id)` answered from memory.

At startup it loads the bundle (hash-checked), featurises its whole data folder once, runs the payment part on
every user and keeps the embeddings and coarse signals in memory (`clients.payment.scoring`, the same code batch
scoring uses). A request is then a dictionary lookup, so latency does not depend on the size of the transaction
table, and the embedding is bit-for-bit the one the batch scorer would compute.

Every answer is a release of information about one user, so each one passes a `ReleaseGuard` first:

* `before_release(user_id)` is called before a known user's embedding leaves. Raise `ReleaseRefused(reason)` to
  refuse (the caller gets RESOURCE_EXHAUSTED with the reason); this is where the party's privacy ledger charges the
  release, write-ahead, before anything is sent. Any other exception also refuses (INTERNAL): fail closed.
* `noise(embedding) -> embedding` is applied to what is sent (identity by default): where embedding noise goes.

Guard calls are serialised by a lock, so a guard backed by a file ledger needs no locking of its own. The default
`OpenRelease` charges nothing and adds no noise. Not yet guarded: whether a user exists at all (NOT_FOUND) is
answered exactly, so a caller learns membership per query; a deployment that must hide membership should route
unknown ids through the guard too or only serve ids from an agreed intersection.

Transport: insecure loopback by default; pass `credentials` (grpc.ssl_server_credentials, ideally mutual TLS) for
anything beyond one machine.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Protocol, runtime_checkable

import grpc
import numpy as np

from clients.payment.grpc_gen import fedscore_scoring_pb2 as pb2
from clients.payment.grpc_gen import fedscore_scoring_pb2_grpc as pb2_grpc
from clients.payment.scoring import PaymentUsers, load_payment_users
from shared.scoring_bundle import load_scoring_bundle

log = logging.getLogger(__name__)

DEFAULT_PORT = 50061


class ReleaseRefused(Exception):
    """Raised by a ReleaseGuard to refuse one release; the message is sent to the caller as the reason."""


@runtime_checkable
class ReleaseGuard(Protocol):
    """What the payment party checks and changes before one user's embedding leaves (see the module docstring)."""

    def before_release(self, user_id: str) -> None:
        """Record or refuse the release of `user_id`'s embedding; raise ReleaseRefused to refuse."""

    def noise(self, embedding: np.ndarray) -> np.ndarray:
        """The embedding to send (float32 [d]), e.g. with calibrated noise added; must keep the shape."""


class OpenRelease:
    """The default guard: every release allowed, nothing recorded, no noise (scores equal batch scores)."""

    def before_release(self, user_id: str) -> None:
        return None

    def noise(self, embedding: np.ndarray) -> np.ndarray:
        return embedding


class PaymentScoringService(pb2_grpc.PaymentScoringServicer):
    """Answers GetEmbedding from the precomputed embeddings, through the release guard."""

    def __init__(self, users: PaymentUsers, payment_part_sha256: str, guard: ReleaseGuard | None = None) -> None:
        self.users = users
        self.payment_part_sha256 = payment_part_sha256
        self.guard: ReleaseGuard = guard if guard is not None else OpenRelease()
        self._lock = threading.Lock()

    @classmethod
    def from_dirs(cls, model_dir: Path, data_dir: Path, guard: ReleaseGuard | None = None,
                  threads: int = 1) -> PaymentScoringService:
        """Load the bundle and DIR/payment, featurise and embed every user once."""
        bundle = load_scoring_bundle(model_dir)
        users = load_payment_users(bundle, data_dir, threads)
        log.info("payment service: %d users from %s", len(users.ids), users.source)
        return cls(users, bundle.part_sha256("payment"), guard)

    def _release(self, user_id: str, row: int) -> tuple[np.ndarray | None, grpc.StatusCode, str]:
        """(embedding, OK, "") or (None, status, reason); never raises, so the caller can abort cleanly."""
        with self._lock:
            try:
                self.guard.before_release(user_id)
            except ReleaseRefused as exc:
                return None, grpc.StatusCode.RESOURCE_EXHAUSTED, f"release refused by the payment holder: {exc}"
            except Exception as exc:
                log.exception("release guard failed for one request; nothing released")
                return None, grpc.StatusCode.INTERNAL, f"release guard failed, nothing released: {exc}"
            try:
                embedding = np.asarray(self.guard.noise(self.users.embeddings[row].copy()), dtype=np.float32)
            except Exception as exc:
                log.exception("embedding noise failed for one request; nothing released")
                return None, grpc.StatusCode.INTERNAL, f"embedding noise failed, nothing released: {exc}"
        if embedding.shape != self.users.embeddings[row].shape or not np.isfinite(embedding).all():
            return None, grpc.StatusCode.INTERNAL, "embedding noise returned a wrong shape or non-finite values"
        return embedding, grpc.StatusCode.OK, ""

    def GetEmbedding(self, request: pb2.EmbeddingRequest, context: grpc.ServicerContext) -> pb2.EmbeddingReply:
        user_id = request.user_id
        if not user_id.strip():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id is empty")
        row = self.users.row(user_id)
        if row < 0:
            context.abort(grpc.StatusCode.NOT_FOUND, f"the payment holder has no user {user_id!r}")
        embedding, status, reason = self._release(user_id, row)
        if embedding is None:
            context.abort(status, reason)
        signals = self.users.signals
        return pb2.EmbeddingReply(embedding=embedding.tolist(), spend_level=str(signals.spend_level[row]),
                                  stability=str(signals.stability[row]),
                                  recent_spend_anomaly=bool(signals.recent_spend_anomaly[row]),
                                  payment_part_sha256=self.payment_part_sha256)


def build_payment_server(service: PaymentScoringService, host: str = "127.0.0.1", port: int = 0,
                         max_workers: int = 8,
                         credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    """A started gRPC server for `service` and the port it is bound to (port 0 = any free port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="payment-grpc"))
    pb2_grpc.add_PaymentScoringServicer_to_server(service, server)
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise OSError(f"payment service: cannot listen on {address}: {exc}") from exc
    if not bound:
        raise OSError(f"payment service: cannot listen on {address}")
    server.start()
    return server, bound


def serve_payment(model_dir: Path, data_dir: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                  guard: ReleaseGuard | None = None, credentials: grpc.ServerCredentials | None = None,
                  threads: int = 1) -> grpc.Server:
    """Load everything, then start serving on host:port; returns the started server (call .stop(grace))."""
    service = PaymentScoringService.from_dirs(model_dir, data_dir, guard, threads)
    server, bound = build_payment_server(service, host, port, credentials=credentials)
    log.info("payment service listening on %s:%d", host, bound)
    return server


def run_payment_service(model_dir: Path, data_dir: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                        guard: ReleaseGuard | None = None, credentials: grpc.ServerCredentials | None = None,
                        on_ready: Callable[[str], None] | None = None) -> None:
    """serve_payment, then block until Ctrl-C or SIGTERM, which stop it with a one-second grace period."""
    server = serve_payment(model_dir, data_dir, host, port, guard, credentials)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: server.stop(grace=1.0))
    if on_ready is not None:
        on_ready(f"payment service ready on {host}:{port}")
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=1.0).wait()
