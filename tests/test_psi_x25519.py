"""ECDH-PSI over X25519 (shared/alignment/x25519.py): the exact intersection on random sets in both party orders,
over worker processes too; nothing the payment holder sends is an unmasked hash of its IDs; malformed messages are
refused by name; keys come from the OS, not from any seed; the run config selects the protocol."""

from __future__ import annotations

import hashlib
import random
import struct

import numpy as np
import pytest

from fedscore.shared.alignment import psi, x25519, x25519_ops
from fedscore.shared.config import ConfigError, load_config


def random_sets(rng: np.random.Generator, n_a: int, n_b: int, common: int) -> tuple[list[str], list[str], set[str]]:
    """Two ID sets of sizes n_a and n_b sharing `common` IDs, each in a random order."""
    pool = [f"id-{x}" for x in rng.choice(10**9, size=n_a + n_b - common, replace=False).tolist()]
    a, b = pool[:n_a], pool[n_a - common:]
    rng.shuffle(a)
    rng.shuffle(b)
    return a, b, set(a) & set(b)


def align(payment: list[str], lender: list[str], workers: int = 1, prepare: bool = False) -> dict:
    request, state = x25519.lender_request(lender, workers=workers)
    prepared = x25519.payment_prepare(payment, workers=workers) if prepare else None
    response = x25519.payment_respond(request, payment, prepared=prepared, workers=workers)
    rows = x25519.lender_intersection(state, lender, response, max_response=len(payment), workers=workers)
    return {"request": request, "state": state, "response": response, "rows": rows}


@pytest.mark.parametrize(("n_a", "n_b", "common", "seed"), [(300, 120, 70, 1), (64, 64, 64, 2), (50, 400, 1, 3),
                                                            (200, 90, 0, 4)])
def test_the_intersection_is_exact_in_both_party_orders(n_a: int, n_b: int, common: int, seed: int) -> None:
    a, b, truth = random_sets(np.random.default_rng(seed), n_a, n_b, common)
    for payment, lender in ((a, b), (b, a)):  # each set once as the payment holder's, once as the lender's
        found = align(payment, lender)["rows"]
        assert found.dtype == np.int64
        assert (np.diff(found) > 0).all()
        assert sorted(lender[i] for i in found.tolist()) == sorted(truth)
        assert len(found) == len(truth)


def test_worker_processes_and_a_prepared_response_give_the_same_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(x25519, "_MIN_CHUNK", 25)  # several chunks, so the work goes to worker processes
    payment, lender, truth = random_sets(np.random.default_rng(5), 240, 160, 90)
    expected = sorted(i for i, v in enumerate(lender) if v in truth)
    assert align(payment, lender, workers=2)["rows"].tolist() == expected
    assert align(payment, lender, workers=2, prepare=True)["rows"].tolist() == expected
    assert align(payment, lender, workers=1, prepare=True)["rows"].tolist() == expected


def hashes(ids: list[str]) -> set[bytes]:
    """Every unmasked hash of an ID a careless implementation could send: ours (the curve input) and plain SHA-256."""
    return set(x25519_ops.hash_to_curve(ids)) | {hashlib.sha256(i.encode()).digest() for i in ids}


def test_the_payment_holder_sends_no_unmasked_hash_of_its_ids() -> None:
    payment, lender, _truth = random_sets(np.random.default_rng(6), 150, 100, 40)
    out = align(payment, lender)
    head = 4 + struct.calcsize(">IQQ")
    cut, n_b, n_c = struct.unpack_from(">IQQ", out["response"], 4)
    c_points = out["response"][head + n_b * cut:]
    assert n_c == len(payment) and len(c_points) == 32 * n_c
    sent = {c_points[i:i + 32] for i in range(0, len(c_points), 32)}
    assert not sent & hashes(payment)  # C holds H(y)^b, never H(y)
    for value in hashes(payment) | hashes(lender) | {i.encode() for i in payment + lender}:
        assert value not in out["response"]
        assert value not in out["request"]
    # C is sorted, so its order says nothing about the payment holder's row order
    assert sorted(sent) == [c_points[i:i + 32] for i in range(0, len(c_points), 32)]


def test_malformed_messages_are_refused_by_name() -> None:
    payment, lender, _truth = random_sets(np.random.default_rng(7), 60, 40, 10)
    out = align(payment, lender)
    request, response, state = out["request"], out["response"], out["state"]
    with pytest.raises(psi.PayloadError, match="declares 40 points of 32 bytes but carries 1248 bytes"):
        x25519.payment_respond(request[:-32], payment)
    with pytest.raises(psi.PayloadError, match="value 0 is a point of small order"):
        x25519.payment_respond(request[:12] + bytes(32) + request[44:], payment)  # u = 0 stays first in order
    with pytest.raises(psi.PayloadError, match="not sorted ascending"):
        x25519.payment_respond(request[:12] + request[44:76] + request[12:44] + request[76:], payment)
    with pytest.raises(psi.PayloadError, match="more than the 39 agreed"):
        x25519.payment_respond(request, payment, max_request=39)
    with pytest.raises(psi.PayloadError, match="not an X25519 PSI request"):
        x25519.payment_respond(response, payment)
    c_start = 4 + 20 + 40 * 12
    with pytest.raises(psi.PayloadError, match="PSI response: value 0 is a point of small order"):
        x25519.lender_intersection(state, lender, response[:c_start] + bytes(32) + response[c_start + 32:])
    with pytest.raises(psi.PayloadError, match="carries"):
        x25519.lender_intersection(state, lender, response[:-1])
    with pytest.raises(psi.PayloadError, match="60 payment points, more than the 59 announced"):
        x25519.lender_intersection(state, lender, response, max_response=59)
    with pytest.raises(psi.PayloadError, match="39 masked request values for 40 requested IDs"):
        x25519.lender_intersection(state, lender, response[:8] + struct.pack(">Q", 39) + response[16:])
    with pytest.raises(psi.PayloadError, match="comparison length 4 bytes"):
        x25519.lender_intersection(state, lender, response[:4] + struct.pack(">I", 4) + response[8:])
    with pytest.raises(psi.PayloadError, match="differ"):
        x25519.lender_intersection(state, lender[::-1], response)
    with pytest.raises(psi.PayloadError, match="X25519 lender PSI state"):
        x25519.lender_intersection(state[:20], lender, response)
    prepared = x25519.payment_prepare(payment)
    with pytest.raises(psi.PayloadError, match="other IDs"):
        x25519.payment_respond(request, payment[1:], prepared=prepared)


def test_a_small_order_point_is_refused_from_a_worker_process_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(x25519, "_MIN_CHUNK", 10)
    payment, lender, _truth = random_sets(np.random.default_rng(8), 40, 40, 10)
    request, _state = x25519.lender_request(lender, workers=2)
    with pytest.raises(psi.PayloadError, match="value 0 is a point of small order"):
        x25519.payment_respond(request[:12] + bytes(32) + request[44:], payment, workers=2)


def test_keys_come_from_the_os_not_from_a_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    lender = [f"id-{i}" for i in range(20)]
    requests, keys = [], []
    for _ in range(2):  # every seed a run could set, set alike before each request
        random.seed(0)
        np.random.seed(0)
        request, state = x25519.lender_request(lender)
        requests.append(request)
        keys.append(x25519._load_state(state)[0]["key"])
    assert requests[0] != requests[1] and keys[0] != keys[1]
    assert x25519.payment_prepare(lender) != x25519.payment_prepare(lender)

    real = x25519.X25519PrivateKey

    class FixedKey:  # the key is X25519PrivateKey.generate()'s: fixing that (and only that) fixes the request
        @staticmethod
        def generate() -> object:
            return real.from_private_bytes(bytes(range(32)))

    monkeypatch.setattr(x25519, "X25519PrivateKey", FixedKey)
    assert x25519.lender_request(lender)[0] == x25519.lender_request(lender)[0]


def test_the_run_config_selects_the_protocol_and_the_payment_holder_holds_the_lender_to_it() -> None:
    assert load_config().alignment.psi == "x25519"
    assert load_config(None, ["alignment.psi=openmined"]).alignment.psi == "openmined"
    with pytest.raises(ConfigError, match=r"alignment\.psi"):
        load_config(None, ["alignment.psi=rsa"])
    ids = ["a", "b", "c"]
    x_request, _ = psi.lender_request(ids, protocol="x25519")
    o_request, _ = psi.lender_request(ids, protocol="openmined")
    with pytest.raises(psi.PayloadError, match="not an openmined request"):
        psi.payment_respond(x_request, ids, protocol="openmined")
    with pytest.raises(psi.PayloadError, match="not an x25519 request"):
        psi.payment_respond(o_request, ids, protocol="x25519")
    assert psi.payment_prepare(ids, protocol="openmined") is None
