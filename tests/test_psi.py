"""PSI alignment: exact intersection, shared order, input checks, and no ID or plain hash of one in any payload.

The protocol-independent tests run for both implementations (alignment.psi = x25519 or openmined); those about
openmined-psi's data structures and threads name it. tests/test_psi_x25519.py has the X25519 protocol's own."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedscore.shared.alignment import ids as id_checks
from fedscore.shared.alignment import psi
from fedscore.shared.alignment import tokens as alignment_tokens
from fedscore.shared.data.tables import DataError
from fedscore.shared.protocol.splits import keyed_tokens

SECRET = bytes.fromhex("8f3a9c1d2e4b5f60718293a4b5c6d7e8")


def payment_ids() -> list[str]:
    return [f"payment-user-{i:05d}" for i in range(300)]


def lender_ids() -> list[str]:
    # 70 shared IDs (payment users 200..269), 130 the payment holder does not have, in a shuffled order
    ids = [f"payment-user-{i:05d}" for i in range(200, 270)] + [f"applicant-only-{i:05d}" for i in range(130)]
    order = np.random.default_rng(0).permutation(len(ids))
    return [ids[i] for i in order]


def run_alignment(payment: list, lender: list, protocol: psi.ProtocolName = psi.DEFAULT_PROTOCOL) -> dict:
    """The whole exchange as the two parties run it; returns every payload that crosses the coordinator."""
    request, state = psi.lender_request(lender, protocol=protocol)
    response = psi.payment_respond(request, payment, protocol=protocol)
    rows = psi.lender_intersection(state, lender, response)
    out = {"request": request, "response": response, "state": state, "lender_rows": rows, "protocol": protocol}
    if len(rows):
        tokens, lender_order = alignment_tokens.lender_alignment(lender, rows, SECRET)
        out["tokens"] = alignment_tokens.tokens_payload(tokens)
        out["lender_order"] = lender_order
        received = alignment_tokens.tokens_from_payload(out["tokens"])
        out["payment_order"] = alignment_tokens.rows_for_tokens(payment, received, SECRET)
    return out


@pytest.fixture(scope="module", params=psi.PROTOCOLS)
def exchange(request: pytest.FixtureRequest) -> dict:
    return run_alignment(payment_ids(), lender_ids(), request.param)


@pytest.fixture(scope="module")
def openmined() -> dict:
    return run_alignment(payment_ids(), lender_ids(), "openmined")


def test_known_overlap_is_found_exactly(exchange: dict) -> None:
    lender = lender_ids()
    expected = sorted(i for i, v in enumerate(lender) if v in set(payment_ids()))
    assert len(expected) == 70
    assert exchange["lender_rows"].tolist() == expected
    assert exchange["lender_rows"].dtype == np.int64


def test_both_parties_end_with_the_same_order(exchange: dict) -> None:
    payment, lender = payment_ids(), lender_ids()
    aligned_payment = [payment[i] for i in exchange["payment_order"]]
    aligned_lender = [lender[i] for i in exchange["lender_order"]]
    assert aligned_payment == aligned_lender
    assert len(aligned_payment) == 70
    tokens = alignment_tokens.tokens_from_payload(exchange["tokens"])
    assert (tokens[1:] > tokens[:-1]).all()
    # the tokens are fedscore.shared.protocol.splits.keyed_tokens of the aligned IDs, sorted, whoever computes them
    assert (np.sort(keyed_tokens(aligned_lender, SECRET)) == tokens).all()
    assert (np.sort(keyed_tokens(sorted(aligned_lender, reverse=True), SECRET)) == tokens).all()


@pytest.mark.parametrize("structure", ["gcs", "raw"])
def test_threaded_chunks_give_the_same_result(structure: str, monkeypatch: pytest.MonkeyPatch,
                                              openmined: dict) -> None:
    monkeypatch.setattr(psi, "_MIN_CHUNK", 16)  # force several chunks on a thread pool (RAW: the setup too)
    lender = lender_ids()
    request, state = psi.lender_request(lender, protocol="openmined", workers=3)
    response = psi.payment_respond(request, payment_ids(), data_structure=structure, workers=3)
    rows = psi.lender_intersection(state, lender, response, workers=3)
    assert rows.tolist() == openmined["lender_rows"].tolist()


@pytest.mark.parametrize("structure", ["bloom", "raw"])
def test_other_data_structures(structure: str, openmined: dict) -> None:
    lender = lender_ids()
    request, state = psi.lender_request(lender, protocol="openmined")
    response = psi.payment_respond(request, payment_ids(), data_structure=structure)
    assert psi.lender_intersection(state, lender, response).tolist() == openmined["lender_rows"].tolist()


@pytest.mark.parametrize("protocol", psi.PROTOCOLS)
def test_integer_ids_match(protocol: psi.ProtocolName) -> None:
    out = run_alignment(list(range(1000, 1100)), list(range(1050, 1200)), protocol)
    assert out["lender_rows"].tolist() == list(range(50))


@pytest.mark.parametrize("protocol", psi.PROTOCOLS)
def test_empty_intersection_is_reported(protocol: psi.ProtocolName) -> None:
    out = run_alignment([f"p-{i}" for i in range(50)], [f"l-{i}" for i in range(40)], protocol)
    assert out["lender_rows"].size == 0
    with pytest.raises(psi.EmptyIntersection, match="no user in common"):
        psi.require_intersection(out["lender_rows"])
    with pytest.raises(psi.EmptyIntersection):
        alignment_tokens.rows_for_tokens(["p-1"], np.array([], dtype="S16"), SECRET)
    assert issubclass(psi.EmptyIntersection, DataError)


@pytest.mark.parametrize(("ids", "pattern"), [
    ([], "empty"),
    (["a1", "b2", "a1", "c3", "b2", "a1"], r"2 duplicate ID\(s\).*rows 0, 2, 5.* appears 3 times"),
    (["a1", 17, "c3"], r"mixed ID types: 2 str and 1 int"),
    ([1, 2, "3"], r"mixed ID types: 1 str and 2 int"),
    (["a1", None, "c3"], r"missing ID.*row 1"),
    ([1.0, float("nan")], r"missing ID.*row 1"),
    (["a1", "", "c3"], r"empty or blank ID.*row 1"),
    (["a1", "   "], r"empty or blank ID.*row 1"),
    ([1.5, 2.5], r"unsupported type.*float"),
    ([True, False], r"unsupported type.*bool"),
])
def test_bad_ids_are_refused(ids: list, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        id_checks.check_ids(ids, "lender IDs")
    for protocol in psi.PROTOCOLS:
        with pytest.raises(DataError, match="lender IDs"):
            psi.lender_request(ids, protocol=protocol)


def test_id_errors_name_rows_not_values() -> None:
    with pytest.raises(DataError) as caught:
        id_checks.check_ids(["secret-id-1", "secret-id-1"], "payment IDs")
    assert "secret-id-1" not in str(caught.value)  # the reason is forwarded to the coordinator
    with pytest.raises(DataError, match="secret-id-1"):
        id_checks.check_ids(["secret-id-1", "secret-id-1"], "payment IDs", show_values=True)


def test_check_ids_returns_psi_strings() -> None:
    assert id_checks.check_ids([3, np.int64(4)], "x") == ["3", "4"]
    assert id_checks.check_ids(["b", np.str_("a")], "x") == ["b", "a"]


def test_payloads_are_checked(exchange: dict) -> None:
    lender, payment = lender_ids(), payment_ids()
    with pytest.raises(psi.PayloadError, match="PSI request"):
        psi.payment_respond(exchange["response"], payment)
    with pytest.raises(psi.PayloadError, match="PSI response"):
        psi.lender_intersection(exchange["state"], lender, exchange["request"])
    with pytest.raises(psi.PayloadError, match="differ"):
        psi.lender_intersection(exchange["state"], lender[::-1], exchange["response"])
    with pytest.raises(psi.PayloadError, match="more than the 10 agreed"):
        psi.payment_respond(exchange["request"], payment, max_request=10)
    with pytest.raises(psi.PayloadError, match="state"):
        psi.lender_intersection(b"{}", lender, exchange["response"])
    with pytest.raises(psi.PayloadError):
        psi.lender_intersection(exchange["state"], lender, exchange["response"][:-40])
    with pytest.raises(psi.PayloadError):
        alignment_tokens.tokens_from_payload(exchange["tokens"][:-3])


def test_a_foreign_token_is_refused(exchange: dict) -> None:
    tokens = alignment_tokens.tokens_from_payload(exchange["tokens"])
    with pytest.raises(DataError, match="1 of 70 alignment token"):
        alignment_tokens.rows_for_tokens(payment_ids()[:269], tokens, SECRET)  # payment user 269 is gone
    with pytest.raises(DataError, match="70 of 70"):
        alignment_tokens.rows_for_tokens(payment_ids(), tokens, b"another secret!!")
    with pytest.raises(psi.PayloadError, match="sorted"):
        alignment_tokens.rows_for_tokens(payment_ids(), tokens[::-1], SECRET)


@pytest.mark.parametrize("protocol", psi.PROTOCOLS)
def test_blacklist_reveals_hits_to_the_lender_only(protocol: psi.ProtocolName) -> None:
    fraud = [f"fraudster-{i}" for i in range(40)]
    applicants = ["applicant-a", "fraudster-7", "applicant-b", "fraudster-31"]
    request, state = psi.lender_request(applicants, protocol=protocol)
    answer = psi.payment_respond(request, fraud)  # a blacklist session has no config: the request's tag decides
    assert psi.lender_intersection(state, applicants, answer).tolist() == [1, 3]
    clean = ["applicant-a", "applicant-b"]
    request, state = psi.lender_request(clean, protocol=protocol)
    assert psi.lender_intersection(state, clean, psi.payment_respond(request, fraud)).size == 0


# -- leakage ----------------------------------------------------------------------------------------------------------
def leak_patterns(ids: list[str]) -> dict[bytes, str]:
    """Byte strings whose presence in a payload would hand the coordinator an ID or a plain hash of one."""
    patterns: dict[bytes, str] = {}
    for value in ids:
        raw = value.encode()
        patterns[raw] = f"raw ID {value!r}"
        for name in ("sha256", "md5", "sha1"):
            digest = hashlib.new(name, raw).digest()
            patterns[digest] = f"{name} digest of {value!r}"
            patterns[digest[:16]] = f"{name} digest (first 16 bytes) of {value!r}"
            patterns[digest.hex().encode()] = f"{name} hex of {value!r}"
            patterns[digest.hex().upper().encode()] = f"{name} HEX of {value!r}"
    return patterns


def leaks(payload: bytes, patterns: dict[bytes, str]) -> list[str]:
    return [what for pattern, what in patterns.items() if pattern in payload]


def test_the_leak_scanner_finds_planted_leaks() -> None:
    patterns = leak_patterns(["payment-user-00042"])
    assert leaks(b"xx" + hashlib.sha256(b"payment-user-00042").digest()[:16] + b"yy", patterns)
    assert leaks(b"payment-user-00042", patterns)
    assert leaks(hashlib.md5(b"payment-user-00042").hexdigest().encode(), patterns)
    assert not leaks(b"payment-user-00043", patterns)


def test_no_id_or_plain_hash_crosses_the_coordinator(exchange: dict) -> None:
    patterns = leak_patterns(sorted(set(payment_ids()) | set(lender_ids())))
    crossing = {name: exchange[name] for name in ("request", "response", "tokens")}
    assert all(len(p) > 1000 for p in crossing.values())
    for name, payload in crossing.items():
        assert leaks(payload, patterns) == [], name
    # the blacklist exchange too
    request, _state = psi.lender_request(lender_ids(), protocol=exchange["protocol"])
    assert leaks(request, patterns) == []
    assert leaks(psi.payment_respond(request, payment_ids()), patterns) == []


def test_payload_sizes_reveal_only_set_sizes(exchange: dict) -> None:
    # what the coordinator can read off the payload lengths (documented in shared/alignment/psi.py and x25519.py)
    if exchange["protocol"] == "openmined":
        assert len(exchange["request"]) == 4 + 2 + 200 * 35  # tag, flag, then a 33-byte point + 2 bytes per ID
    else:  # tag, count, a 32-byte point per lender ID; tag, head, 12 bytes per lender ID + 32 per payment ID
        assert len(exchange["request"]) == 4 + 8 + 200 * 32
        assert len(exchange["response"]) == 4 + 20 + 200 * 12 + 300 * 32
    assert len(exchange["tokens"]) == 4 + 70 * 16
