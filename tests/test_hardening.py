"""Abuse limits, proxies, CORS, callback source addresses and Daraja faults, end to end."""

from __future__ import annotations

import logging

import pytest
import requests

from tests.helpers import callback_body, hook, poll, started

LIMITS = {"RATELIMIT_ENABLED": "true"}


def push(live, phone, headers=None, amount=100):
    return live.post("/stkpush", json={"phone": phone, "amount": amount}, headers=headers or {})


def test_one_phone_cannot_be_flooded_with_prompts(live_server_factory):
    live = live_server_factory(**LIMITS, RATE_LIMIT_PUSH_PER_PHONE="2/minute")
    for left, amount in ((1, 10), (0, 11)):
        response = push(live, "254700000000", amount=amount)
        assert response.status_code == 200
        assert (response.headers["X-RateLimit-Limit"], response.headers["X-RateLimit-Remaining"]) == ("2", str(left))
        poll(live, response.json()["checkoutRequestId"])  # let the prompt close
    third = push(live, "0700 000 000", amount=12)
    assert third.status_code == 429
    assert third.json()["success"] is False and "Too many requests" in third.json()["message"]
    assert int(third.headers["Retry-After"]) > 0
    assert push(live, "254700001032").status_code == 200  # another phone is still served


def test_workers_sharing_a_redis_store_count_one_phone_together(live_server_factory, clean_redis_url):
    # The limit's key is a keyed hash of the phone, the key kept in the store: every worker agrees on it.
    first, second = (
        live_server_factory(**LIMITS, STORE_URL=clean_redis_url, RATE_LIMIT_PUSH_PER_PHONE="1/minute") for _ in range(2)
    )
    assert push(first, "0712345678").status_code == 200
    assert push(second, "+254 712 345 678").status_code == 429
    assert push(second, "0712345679").status_code == 200


def test_refused_pushes_and_replays_do_not_count(live_server_factory):
    live = live_server_factory(**LIMITS, RATE_LIMIT_PUSH_PER_PHONE="1/minute")
    key = {"Idempotency-Key": "k-1"}
    assert push(live, "0712345678", headers=key).status_code == 200
    assert push(live, "0712345678", headers=key).status_code == 200  # replay
    assert live.post("/stkpush", json={"phone": "0712345679", "amount": 0}).status_code == 400
    assert push(live, "0712345678").status_code == 429


def test_one_address_cannot_start_too_many_pushes(live_server_factory):
    live = live_server_factory(**LIMITS, RATE_LIMIT_PUSH_PER_IP="3/minute")
    codes = [push(live, f"07110000{n:02d}").status_code for n in range(4)]
    assert codes == [200, 200, 200, 429]


def test_status_polling_has_its_own_looser_limit(live_server_factory):
    live = live_server_factory(**LIMITS, RATE_LIMIT_STATUS_PER_IP="5/minute")
    checkout_id = started(live)
    codes = [live.post("/stkpush/status", json={"checkoutRequestId": checkout_id}).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]


def test_only_a_refusal_tells_the_client_to_wait(live_server_factory):
    # Retry-After on a 200 would tell a shop's HTTP client to hold off before its next poll.
    live = live_server_factory(**LIMITS, RATE_LIMIT_STATUS_PER_IP="2/minute")
    checkout_id = started(live)
    answers = [live.post("/stkpush/status", json={"checkoutRequestId": checkout_id}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    for served in answers[:2]:
        assert "Retry-After" not in served.headers
        assert "X-RateLimit-Remaining" not in served.headers  # a worker's estimate on a poll: not sent
    assert 0 < int(answers[2].headers["Retry-After"]) <= 60
    assert (answers[2].headers["X-RateLimit-Limit"], answers[2].headers["X-RateLimit-Remaining"]) == ("2", "0")


def test_forwarded_for_is_trusted_from_exactly_one_proxy(live_server_factory):
    behind_router = live_server_factory(**LIMITS, RATE_LIMIT_PUSH_PER_IP="1/minute", TRUSTED_PROXIES="1")
    for n, client in enumerate(("10.0.0.1", "10.0.0.2")):
        response = push(behind_router, f"07110001{n:02d}", headers={"X-Forwarded-For": client})
        assert response.status_code == 200  # two shoppers, two addresses
    direct = live_server_factory(**LIMITS, RATE_LIMIT_PUSH_PER_IP="1/minute", TRUSTED_PROXIES="0")
    assert push(direct, "0711000200", headers={"X-Forwarded-For": "10.0.0.1"}).status_code == 200
    spoofed = push(direct, "0711000201", headers={"X-Forwarded-For": "10.0.0.2"})
    assert spoofed.status_code == 429  # a client cannot pick its own address


def test_https_through_the_proxy_gets_hsts_and_the_log_names_the_client(live_server_factory, caplog):
    caplog.set_level(logging.INFO)
    live = live_server_factory(TRUSTED_PROXIES="1")
    assert "Strict-Transport-Security" not in live.get("/health").headers  # plain HTTP
    secure = live.get("/health", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.0.0.7"})
    assert secure.headers["Strict-Transport-Security"] == "max-age=31536000"
    for name in ("Content-Security-Policy", "X-Content-Type-Options", "Cache-Control", "X-Request-ID"):
        assert len(secure.raw.headers.getlist(name)) == 1, name
    page = live.get("/pay.html", headers={"X-Forwarded-Proto": "https"})
    assert page.headers["Strict-Transport-Security"] == "max-age=31536000"
    for name in (
        "Content-Security-Policy",
        "X-Content-Type-Options",
        "X-Frame-Options",
        "Referrer-Policy",
        "X-Request-ID",
    ):
        assert len(page.raw.headers.getlist(name)) == 1, name
    line = next(
        record
        for record in reversed(caplog.records)
        if record.name == "server" and getattr(record, "request_id", None) == secure.headers["X-Request-ID"]
    )
    assert line.remote_addr == "10.0.0.7" and line.path == "/health" and line.status == 200


def test_cors_only_for_the_configured_front_end(live_server_factory):
    live = live_server_factory(FRONTEND_URL="https://shop.example.com")
    allowed = live.get("/health", headers={"Origin": "https://shop.example.com"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://shop.example.com"
    evil = live.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in evil.headers
    preflight = requests.options(
        live.url + "/stkpush",
        timeout=5,
        headers={
            "Origin": "https://shop.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Content-Type, Idempotency-Key",
        },
    )
    assert "idempotency-key" in preflight.headers["Access-Control-Allow-Headers"].lower()


def test_without_a_front_end_no_other_origin_is_allowed(live_server_factory):
    live = live_server_factory()
    for method, path in (("GET", "/health"), ("POST", "/stkpush/status"), ("OPTIONS", "/stkpush")):
        response = requests.request(
            method,
            live.url + path,
            timeout=5,
            json={},
            headers={"Origin": "https://shop.example.com", "Access-Control-Request-Method": "POST"},
        )
        assert not [name for name in response.headers if name.lower().startswith("access-control-")]


def test_callbacks_from_outside_the_allow_list_are_refused(live_server_factory):
    closed = live_server_factory(CALLBACK_ALLOWED_IPS="safaricom")
    checkout_id = started(closed)
    refused = closed.post(hook(closed), json=callback_body(checkout_id, code=1032))
    assert refused.status_code == 403
    assert poll(closed, checkout_id, timeout=0)["status"] == "pending"

    proxied = live_server_factory(CALLBACK_ALLOWED_IPS="safaricom", TRUSTED_PROXIES="1")
    checkout_id = started(proxied, "0711000300")
    accepted = proxied.post(
        hook(proxied), json=callback_body(checkout_id, code=1032), headers={"X-Forwarded-For": "196.201.214.200"}
    )
    assert accepted.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    assert poll(proxied, checkout_id, timeout=0)["reason"] == "cancelled"


def test_loopback_allow_list_lets_the_simulator_in(live_server_factory):
    live = live_server_factory(CALLBACK_ALLOWED_IPS="127.0.0.0/8")
    requests.patch(live.simulator_url + "/simulator/config", json={"auto_delay": 0.1}, timeout=5)
    response = push(live, "254700000000")
    assert poll(live, response.json()["checkoutRequestId"])["status"] == "completed"


def test_token_revoked_mid_flight_is_refreshed(live_server_factory):
    live = live_server_factory()
    assert push(live, "0711000400").status_code == 200
    live.sim("POST", "/simulator/tokens/revoke")
    assert push(live, "0711000401").status_code == 200
    assert live.sim("GET", "/simulator/stats").json()["tokens_issued"] == 2


@pytest.mark.parametrize("mode", ["http500", "http503_html", "garbage"])
def test_status_survives_a_broken_daraja_query(live_server_factory, mode):
    live = live_server_factory(STATUS_FIRST_QUERY_AFTER="0", STATUS_QUERY_INTERVAL="0.1")
    checkout_id = started(live)
    live.sim("POST", "/simulator/faults", json={"endpoint": "query", "mode": mode, "count": 3})
    answer = live.post("/stkpush/status", json={"checkoutRequestId": checkout_id})
    assert answer.status_code == 200 and answer.json()["status"] == "pending"
