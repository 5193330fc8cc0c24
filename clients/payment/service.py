"""The payment holder's online scoring service: gRPC `GetEmbedding(user_id)` answered from memory.

At startup it loads the bundle (hash-checked), featurises its whole data folder once, runs the payment part on
every user and keeps the embeddings and coarse signals in memory (`fedscore.clients.payment.scoring`, the same code
batch scoring uses), so latency does not depend on the size of the transaction table.

Whom it answers: only the IDs of the intersection recorded for this model version (`fedscore.clients.payment.served`).
Every other ID, customer or not, gets one fixed answer, NOT_FOUND "not served", byte for byte: the decision is one
lookup in a dict built at startup from the served IDs alone, and the customer tables are never consulted for it, so
neither the answer nor its timing says whether an ID outside the intersection is a customer. (The lender already knows
the intersection from alignment.)

Every answer is a release of information about one user, so each one passes a mandatory `ReleaseGuard` first:

* `before_release(user_id)` is called before the embedding leaves. Raise `ReleaseRefused(reason)` to refuse (the
  caller gets RESOURCE_EXHAUSTED with the reason); this is where the party's ledger charges the release,
  write-ahead. Any other exception also refuses (INTERNAL): fail closed.
* `noise(embedding) -> embedding` is applied to what is sent: where the embedding noise goes.

Guard calls are serialised by a lock, so a guard backed by files needs no locking of its own, unless the guard says
it is `thread_safe` (then concurrent requests reach it together: the production guard,
`fedscore.clients.payment.release_guard.LedgerGuard`, shares one ledger commit among them). There is no guard-less
service.

Coarse signals (spend_level, stability, recent_spend_anomaly) are withheld by default (empty strings and False: the
lender scores with neutral ones); `disclose_signals=True` sends them exactly, which the CLI records as unprotected.

Transport: `build_payment_server` takes server credentials (mutual TLS, `fedscore.shared.tls`); without them it binds
only to a loopback address.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Protocol, runtime_checkable

import grpc
import numpy as np

from fedscore.clients.payment.scoring import PaymentUsers, load_payment_users
from fedscore.clients.payment.served import ServedVersion
from fedscore.proto import fedscore_scoring_pb2 as pb2
from fedscore.proto import fedscore_scoring_pb2_grpc as pb2_grpc
from fedscore.shared.scoring.bundle import ScoringBundle

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


NOT_SERVED = (grpc.StatusCode.NOT_FOUND, "not served")  # the one answer for every ID outside the intersection
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class PaymentScoringService(pb2_grpc.PaymentScoringServicer):
    """Answers GetEmbedding for the served intersection only, from the precomputed embeddings, through the guard."""

    def __init__(self, users: PaymentUsers, served: ServedVersion, guard: ReleaseGuard,
                 disclose_signals: bool = False) -> None:
        if not isinstance(guard, ReleaseGuard):
            raise TypeError("PaymentScoringService needs a release guard (before_release and noise)")
        self.users = users
        self.payment_part_sha256 = served.sha256
        self.guard = guard
        self.disclose_signals = disclose_signals
        rows = users.rows_for(sorted(served.ids))
        # built from the served IDs alone: a request's fate is decided here, never in the customer tables
        self._served: dict[str, int] = {uid: int(r) for uid, r in zip(sorted(served.ids), rows, strict=True) if r >= 0}
        self.unavailable = len(served.ids) - len(self._served)
        self._lock = threading.Lock()
        self._serialise = not getattr(guard, "thread_safe", False)

    @property
    def served_count(self) -> int:
        """How many IDs this service answers (the recorded intersection still present in the data)."""
        return len(self._served)

    @classmethod
    def from_bundle(cls, bundle: ScoringBundle, data_dir: Path, served: ServedVersion, guard: ReleaseGuard,
                    disclose_signals: bool = False, threads: int = 1) -> PaymentScoringService:
        """Featurise and embed every user of DIR/payment once; answer the served ones."""
        if served.sha256 != bundle.part_sha256("payment"):
            raise ValueError(f"{served.ids_file}: recorded for another payment part than {bundle.directory}")
        users = load_payment_users(bundle, data_dir, threads)
        service = cls(users, served, guard, disclose_signals)
        log.info("payment service: %d users from %s, %d served (%d of the recorded intersection no longer in the "
                 "data)", len(users.ids), users.source, service.served_count, service.unavailable)
        return service

    def _release(self, user_id: str, row: int) -> tuple[np.ndarray | None, grpc.StatusCode, str]:
        """(embedding, OK, "") or (None, status, reason); never raises, so the caller can abort cleanly."""
        with self._lock if self._serialise else contextlib.nullcontext():
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
        if not user_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id is empty")
        row = self._served.get(user_id)
        if row is None:
            context.abort(*NOT_SERVED)
        embedding, status, reason = self._release(user_id, row)
        if embedding is None:
            context.abort(status, reason)
        reply = pb2.EmbeddingReply(embedding=embedding.tolist(), payment_part_sha256=self.payment_part_sha256)
        if self.disclose_signals:
            signals = self.users.signals
            reply.spend_level = str(signals.spend_level[row])
            reply.stability = str(signals.stability[row])
            reply.recent_spend_anomaly = bool(signals.recent_spend_anomaly[row])
        return reply


def build_payment_server(service: PaymentScoringService, host: str = "127.0.0.1", port: int = 0,
                         max_workers: int = 8,
                         credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    """A started gRPC server for `service` and the port it is bound to (port 0 = any free port).

    Without credentials only a loopback host is accepted: plaintext never leaves the machine."""
    if credentials is None and host not in LOOPBACK_HOSTS:
        raise ValueError(f"payment service: refusing plaintext gRPC on {host}; without TLS only loopback "
                         f"({', '.join(LOOPBACK_HOSTS)}) is allowed")
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


def run_payment_service(service: PaymentScoringService, host: str, port: int,
                        credentials: grpc.ServerCredentials | None,
                        on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM, which stop it with a one-second grace period."""
    gc.freeze()  # the users loaded at startup are never garbage: keep them out of every later collection
    server, bound = build_payment_server(service, host, port, credentials=credentials)
    log.info("payment service listening on %s:%d", host, bound)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: server.stop(grace=1.0))
    if on_ready is not None:
        on_ready(f"payment service ready on {host}:{bound} ({'mutual TLS' if credentials else 'plaintext, loopback'}"
                 f"; {service.served_count} served IDs)")
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=1.0).wait()
