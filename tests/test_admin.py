"""The operator's dashboard over real HTTP: sign-in, CSRF, search, the CSV, the numbers.

Payments come two ways: real ones through the simulator (a receipt, a timeline), and
hand-made records written straight into the server's store, timed relative to now, so that
the overview's numbers can be counted by hand.
"""

from __future__ import annotations

import csv
import io
import re
import time
from datetime import datetime, timedelta
from html import unescape
from html.parser import HTMLParser

import pytest
import requests
from flask import request

import mpesa
from store import Transaction
from tests.helpers import CANCELLED, PAID, WAITING, payment, poll, start_live_server, started, wait_until

TOKEN = "admin-secret-0123456789"
NOW = time.time()


class Text(HTMLParser):
    """The text of each element with an id, and the data-id of each table row."""

    VOID = {"input", "br", "img", "meta", "link", "hr", "circle", "rect", "line", "polyline"}

    def __init__(self, html: str):
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.row_ids: list[str] = []
        self._open: list[tuple[str, str | None]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and attrs.get("data-id"):
            self.row_ids.append(attrs["data-id"])
        self.handle_data(" ")  # elements are words apart
        if tag in self.VOID:
            return
        self._open.append((tag, attrs.get("id")))
        if attrs.get("id"):
            self.by_id[attrs["id"]] = ""

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        self.handle_data(" ")
        if tag in self.VOID:
            return
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data):
        for _, element_id in self._open:
            if element_id:
                self.by_id[element_id] += data

    def __getitem__(self, element_id: str) -> str:
        return " ".join(self.by_id[element_id].split())


def csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


class Admin:
    """A signed-in operator: a requests.Session with the dashboard's cookie."""

    def __init__(self, live, token: str = TOKEN):
        self.live = live
        self.http = requests.Session()
        page = self.http.get(live.url + "/admin/login", timeout=10)
        answer = self.http.post(
            live.url + "/admin/login",
            allow_redirects=False,
            timeout=10,
            data={"csrf_token": csrf(page.text), "token": token},
        )
        assert answer.status_code == 303, answer.text
        self.cookie = answer.headers["Set-Cookie"]

    def get(self, path: str, **params) -> requests.Response:
        answer = self.http.get(self.live.url + path, params=params, timeout=10, allow_redirects=False)
        assert answer.status_code == 200, (path, answer.status_code)
        return answer

    def page(self, path: str, **params) -> Text:
        return Text(self.get(path, **params).text)

    def csrf(self) -> str:
        return csrf(self.get("/admin/").text)

    def post(self, path: str, data: dict, **kwargs) -> requests.Response:
        return self.http.post(self.live.url + path, data=data, timeout=30, allow_redirects=False, **kwargs)


@pytest.fixture
def live(live_server_factory):
    return live_server_factory(ADMIN_TOKEN=TOKEN)


def record(
    checkout_request_id: str,
    minutes_ago: float,
    *,
    status: str = "pending",
    phone: str = "254712345678",
    amount: int = 100,
    after: float | None = None,
    events: tuple = (),
    **fields,
) -> Transaction:
    at = NOW - minutes_ago * 60
    history = [
        {"at": at, "event": "initiated", "amount": amount},
        {"at": at, "event": "push_accepted", "merchantRequestId": f"m-{checkout_request_id}"},
    ]
    history += [{"at": at + 1, **event} for event in events]
    return Transaction(
        checkout_request_id,
        phone,
        amount,
        checkout_request_id=checkout_request_id,
        merchant_request_id=f"m-{checkout_request_id}",
        status=status,
        initiated_at=at,
        completed_at=None if after is None else at + after,
        history=history,
        **fields,
    )


CALLBACK = {"event": "callback_received", "resultCode": 0}
# Counted by hand. Within the last hour: H1-H6; two days ago: D1; the day before: Y1.
HOUR_SET = [
    record(
        "H1",
        5,
        status="completed",
        amount=100,
        after=4,
        settled_by="callback",
        mpesa_receipt_number="QAB1C2D3E4",
        account_reference="CART-1",
        transaction_date="2024-03-15T14:31:05+03:00",
        events=(CALLBACK, {"event": "completed"}),
    ),
    record(
        "H2",
        10,
        status="completed",
        amount=250,
        phone="254798765432",
        after=25,
        settled_by="query",
        mpesa_receipt_number="QXY9Z8W7V6",
        account_reference="=SUM(A1)",
        description="+254 call me",
        events=({"event": "queried", "result": "error"}, {"event": "query_received"}, {"event": "completed"}),
    ),
    record(
        "H3",
        15,
        status="failed",
        reason="cancelled",
        phone="254700001032",
        after=8,
        settled_by="callback",
        account_reference="@cmd",
        events=(CALLBACK, {"event": "failed"}),
    ),
    record(
        "H4",
        20,
        status="failed",
        reason="cancelled",
        after=12,
        settled_by="callback",
        account_reference="-1",
        events=(CALLBACK, {"event": "failed"}, CALLBACK, {"event": "duplicate_ignored"}),
    ),
    record(
        "H5",
        25,
        status="failed",
        reason="timeout",
        after=120,
        settled_by="timeout",
        events=({"event": "queried", "result": "pending"}, {"event": "timed_out"}),
    ),
    record("H6", 30, amount=75, phone="254733333333"),
]
OLDER_SET = [
    record(
        "D1",
        2 * 24 * 60,
        status="completed",
        amount=1000,
        after=30,
        settled_by="callback",
        mpesa_receipt_number="QRS1T2U3V4",
        events=(CALLBACK, {"event": "completed"}),
    ),
    record(
        "Y1",
        3 * 24 * 60,
        status="failed",
        reason="wrong_pin",
        after=9,
        settled_by="callback",
        events=(CALLBACK, {"event": "failed"}),
    ),
]


@pytest.fixture(scope="module")
def stocked(simulator_session):
    """One server for the tests that only read: the hand-counted records in its store."""
    live = start_live_server(simulator_session.url, ADMIN_TOKEN=TOKEN)
    for tx in HOUR_SET + OLDER_SET:
        live.app.extensions["store"].create(tx)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def operator(stocked):
    return Admin(stocked)


def nairobi_date(minutes_ago: float) -> str:
    return datetime.fromtimestamp(NOW - minutes_ago * 60, mpesa.NAIROBI).date().isoformat()


# Signing in.


def test_dashboard_is_off_without_an_admin_token_and_says_how_to_turn_it_on(live_server_factory):
    live = live_server_factory()
    for path in ("/admin/", "/admin/login", "/admin/transactions", "/admin/transactions.csv"):
        answer = live.get(path)
        assert answer.status_code == 404 and answer.headers["Content-Type"].startswith("text/html")
        assert "The dashboard is off" in answer.text and "ADMIN_TOKEN" in answer.text
    assert live.post("/admin/login", data={"token": "x"}).status_code == 404


@pytest.mark.parametrize(
    "path", ["/admin/", "/admin/transactions?status=failed", "/admin/transactions.csv", "/admin/transactions/H1"]
)
def test_every_page_sends_a_stranger_to_sign_in(live, path):
    answer = live.get(path, allow_redirects=False)
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith("/admin/login?next=/admin/")
    assert live.get("/admin/", allow_redirects=True).url.endswith("/admin/login?next=/admin/")


def test_a_stranger_cannot_post_either(live):
    answer = live.post("/admin/reconcile", data={"csrf_token": "x"}, allow_redirects=False)
    assert answer.status_code == 303 and answer.headers["Location"] == "/admin/login"


def test_sign_in_sets_a_strict_http_only_cookie_for_admin_only(live):
    admin = Admin(live)
    cookie = admin.cookie.lower()
    assert cookie.startswith("mpesa_admin=")
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/admin" in cookie
    assert "secure" not in cookie.replace("samesite", "")  # plain HTTP here
    overview = admin.get("/admin/")
    assert overview.headers["Cache-Control"] == "no-store"
    assert "default-src 'self'" in overview.headers["Content-Security-Policy"]
    assert "Sign out" in overview.text


def test_only_the_dashboard_opens_the_session(live):
    admin = Admin(live)
    cookie = admin.cookie.split(";", 1)[0]
    app = live.app
    for path in ("/stkpush/status", "/health", "/pay.html", "/administrator"):
        with app.test_request_context(path, headers={"Cookie": cookie}):
            assert app.session_interface.is_null_session(app.session_interface.open_session(app, request))
    with app.test_request_context("/admin/", headers={"Cookie": cookie}):
        opened = app.session_interface.open_session(app, request)
        assert not app.session_interface.is_null_session(opened) and opened.get("sid")
    # The cookie sent where it does not belong (a client ignoring its path) changes nothing.
    poll = live.post("/stkpush/status", json={"checkoutRequestId": "x"}, headers={"Cookie": cookie})
    assert poll.status_code == 404 and "Set-Cookie" not in poll.headers
    assert "Cookie" not in poll.headers.get("Vary", "")
    assert admin.get("/admin/").status_code == 200  # still signed in


def test_the_cookie_is_secure_behind_https(live_server_factory):
    live = live_server_factory(ADMIN_TOKEN=TOKEN, TRUSTED_PROXIES="1")
    answer = live.get("/admin/login", headers={"X-Forwarded-Proto": "https"})
    assert "; Secure" in answer.headers["Set-Cookie"]


@pytest.mark.parametrize(
    "target, landing",
    [
        ("/admin/transactions?status=failed", "/admin/transactions?status=failed"),
        ("https://evil.example/admin", "/admin/"),
        ("//evil.example/admin", "/admin/"),
    ],
)
def test_sign_in_goes_back_to_the_page_asked_for_but_never_elsewhere(live, target, landing):
    http = requests.Session()
    page = http.get(live.url + "/admin/login", params={"next": target}, timeout=10)
    assert f'name="next" value="{landing}"' in page.text
    answer = http.post(
        live.url + "/admin/login",
        allow_redirects=False,
        timeout=10,
        data={"csrf_token": csrf(page.text), "token": TOKEN, "next": target},
    )
    assert answer.headers["Location"] == landing


def test_sign_out_ends_the_session_even_for_a_copy_of_the_cookie(live):
    admin = Admin(live)
    stolen = dict(admin.http.cookies)
    answer = admin.post("/admin/logout", {"csrf_token": admin.csrf()})
    assert answer.status_code == 303 and answer.headers["Location"] == "/admin/login"
    assert live.get("/admin/", cookies=stolen, allow_redirects=False).status_code == 302
    assert admin.http.get(live.url + "/admin/", allow_redirects=False).status_code == 302


def test_a_wrong_token_is_refused(live):
    http = requests.Session()
    page = http.get(live.url + "/admin/login", timeout=10)
    answer = http.post(
        live.url + "/admin/login", timeout=10, data={"csrf_token": csrf(page.text), "token": TOKEN + "x"}
    )
    assert answer.status_code == 401
    assert "That token is not right" in Text(answer.text)["login-error"]
    assert http.get(live.url + "/admin/", allow_redirects=False).status_code == 302


def test_repeated_wrong_tokens_slow_the_next_try_on_every_worker(live_server_factory, tmp_path):
    # Two servers on one SQLite store stand for two workers.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = live_server_factory(ADMIN_TOKEN=TOKEN, STORE_URL=url, ADMIN_LOGIN_DELAY="0.4")
    second = live_server_factory(ADMIN_TOKEN=TOKEN, STORE_URL=url, ADMIN_LOGIN_DELAY="0.4")
    http = requests.Session()

    def try_token(live, token):
        page = http.get(live.url + "/admin/login", timeout=10)
        return http.post(
            live.url + "/admin/login",
            allow_redirects=False,
            timeout=10,
            data={"csrf_token": csrf(page.text), "token": token},
        )

    assert [try_token(first, "wrong").status_code for _ in range(2)] == [401, 401]
    third = try_token(second, "wrong")  # the third failure, counted on the other worker
    assert third.status_code == 401 and "Wait 1 seconds" in third.text
    refused = try_token(first, TOKEN)  # even the right token must wait now
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "Too many wrong tokens" in refused.text
    time.sleep(0.45)
    assert try_token(second, "wrong").status_code == 401  # the fourth: now 0.8 s to wait
    assert try_token(second, TOKEN).status_code == 429
    time.sleep(0.85)
    assert try_token(first, TOKEN).status_code == 303
    assert try_token(first, "wrong").status_code == 401  # success started the count again
    assert try_token(first, TOKEN).status_code == 303


# One lockout for the dashboard's sign-in and the bearer API.

ADMIN_ROUTES = [
    ("GET", "/transactions"),
    ("GET", "/transactions/ws_CO_nope"),
    ("GET", "/metrics"),
    ("POST", "/tickets/TKT-NOPE000000/check-in"),
]


def bearer(live, token: str, method: str = "GET", path: str = "/transactions") -> requests.Response:
    return requests.request(method, live.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def sign_in(live, token: str) -> requests.Response:
    http = requests.Session()
    page = http.get(live.url + "/admin/login", timeout=10)
    return http.post(
        live.url + "/admin/login",
        allow_redirects=False,
        timeout=10,
        data={"csrf_token": csrf(page.text), "token": token},
    )


def test_wrong_bearer_tokens_lock_out_the_api_and_the_sign_in_on_every_worker(live_server_factory, tmp_path):
    # Two servers on one SQLite store stand for two workers.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = live_server_factory(ADMIN_TOKEN=TOKEN, STORE_URL=url, ADMIN_LOGIN_DELAY="0.5")
    second = live_server_factory(ADMIN_TOKEN=TOKEN, STORE_URL=url, ADMIN_LOGIN_DELAY="0.5")
    assert [bearer(first, "guess-number-1").status_code, bearer(second, "guess-number-2").status_code] == [401, 401]
    third = bearer(first, "guess-number-3", "GET", "/metrics")
    assert third.status_code == 401 and third.headers["WWW-Authenticate"] == "Bearer"
    assert third.json() == {"success": False, "message": "Wrong admin token. Wait 1 seconds before trying again."}

    for method, path in ADMIN_ROUTES:  # the right token too, on every admin route of either worker
        refused = bearer(second, TOKEN, method, path)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1", (path, refused.text)
        assert refused.json() == {
            "success": False,
            "message": "Too many wrong tokens. Wait 1 seconds before trying again.",
        }
    signing_in = sign_in(first, TOKEN)  # and the dashboard's sign-in
    assert signing_in.status_code == 429 and "Too many wrong tokens" in signing_in.text

    wait_until(lambda: bearer(second, TOKEN).status_code == 200, timeout=5)
    assert bearer(first, "guess-number-4").json()["message"] == "Wrong admin token."  # the right token started afresh


def test_wrong_sign_ins_lock_out_the_api(live_server_factory):
    live = live_server_factory(ADMIN_TOKEN=TOKEN, ADMIN_LOGIN_FREE_TRIES="1")
    assert sign_in(live, "not-the-token-at-all").status_code == 401
    refused = bearer(live, TOKEN)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["success"] is False and "Wait 1 seconds" in refused.json()["message"]


@pytest.mark.parametrize(
    "authorization",
    [f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x", "Bearer ", f"Token {TOKEN}"],
    ids=["basic", "no-scheme", "longer", "empty", "other-scheme"],
)
def test_any_wrong_credential_counts_and_none_at_all_does_not(live_server_factory, authorization):
    live = live_server_factory(ADMIN_TOKEN=TOKEN, ADMIN_LOGIN_FREE_TRIES="1", ADMIN_LOGIN_DELAY="60")
    for _ in range(5):  # a scraper without the token set guesses nothing
        assert requests.get(live.url + "/metrics", timeout=10).status_code == 401
    assert bearer(live, TOKEN).status_code == 200
    answer = requests.get(live.url + "/transactions", headers={"Authorization": authorization}, timeout=10)
    assert answer.status_code == 401 and answer.json()["message"].startswith("Wrong admin token. Wait 60 seconds")
    assert bearer(live, TOKEN).status_code == 429


def test_a_new_admin_token_signs_everyone_out(live_server_factory, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    before = live_server_factory(ADMIN_TOKEN=TOKEN, STORE_URL=url)
    after = live_server_factory(ADMIN_TOKEN="a-brand-new-token", STORE_URL=url)
    admin = Admin(before)
    assert after.get("/admin/", cookies=dict(admin.http.cookies), allow_redirects=False).status_code == 302
    Admin(after, "a-brand-new-token")


# CSRF.


def test_state_changing_posts_need_the_csrf_token(live):
    admin = Admin(live)
    token = admin.csrf()
    for data, headers in (
        ({}, {}),
        ({"csrf_token": "forged"}, {}),
        ({"csrf_token": token}, {"Origin": "https://evil.example"}),
    ):
        answer = admin.post("/admin/reconcile", data, headers=headers)
        assert answer.status_code == 403 and "This form has expired" in answer.text
        assert admin.post("/admin/logout", data, headers=headers).status_code == 403
    assert admin.get("/admin/")  # still signed in
    assert admin.post("/admin/reconcile", {"csrf_token": token}, headers={"Origin": live.url}).status_code == 200


def test_the_sign_in_form_needs_its_csrf_token_too(live):
    answer = requests.post(live.url + "/admin/login", data={"token": TOKEN}, timeout=10, allow_redirects=False)
    assert answer.status_code == 400 and "expired" in answer.text


# The numbers.


def test_overview_of_the_last_hour_matches_the_hand_count(operator):
    page = operator.page("/admin/", window="hour")
    numbers = {
        name: page[f"kpi-{name}"]
        for name in ("started", "completed", "failed", "pending", "received", "conversion", "median", "p95")
    }
    # H1-H6: 2 completed (100 + 250), 3 failed, 1 pending; final after 4, 25, 8, 12, 120 s
    assert numbers == {
        "started": "6",
        "completed": "2",
        "failed": "3",
        "pending": "1",
        "received": "KES 350",
        "conversion": "33.3%",
        "median": "≤ 15 s",
        "p95": "≤ 2 min",
    }
    assert page["settled-callback"] == "Callback from Daraja 3 60.0%"
    assert page["settled-query"] == "Status query 1 20.0%"
    assert page["settled-timeout"] == "Timed out (our verdict) 1 20.0%"
    assert page["reason-cancelled"] == "Cancelled by the customer 2 66.7%"
    assert page["reason-timeout"] == "Timed out 1 33.3%"
    # 6 pushes accepted + 3 status queries (one failed)
    assert (page["daraja-calls"], page["query-errors"], page["daraja-error-rate"]) == ("9", "1 of 3", "11.1%")
    assert page["ignored-callbacks"] == "1" and page["callbacks"] == "4"
    assert "Last hour" in page["window-range"]


def test_overview_windows_reach_further_back(operator):
    assert operator.page("/admin/", window="day")["kpi-started"] == "6"
    week = operator.page("/admin/", window="week")
    assert (week["kpi-started"], week["kpi-completed"], week["kpi-received"]) == ("8", "3", "KES 1,350")
    assert week["reason-wrong_pin"].startswith("Wrong PIN 1")
    assert operator.page("/admin/", window="nonsense")["kpi-started"] == "6"  # the default: a day


def test_overview_charts_are_svg_with_text_equivalents(operator):
    html = operator.get("/admin/", window="hour").text
    assert html.count('<svg class="chart') == 3
    assert html.count('role="img"') == 3
    assert "6 payments started and 2 completed, per 5 minutes." in html
    assert "Failed payments by reason: cancelled by the customer 2, timed out 1." in html
    rows = Text(html).by_id["buckets-table"]
    assert "Started" in rows and "Success rate" in rows
    assert "style=" not in html and "<style" not in html  # the CSP forbids inline style


def test_reconcile_settles_stale_payments_and_shows_them(live_server_factory):
    live = live_server_factory(ADMIN_TOKEN=TOKEN, TRANSACTION_TTL="1")
    payment_id = payment(live, WAITING)["paymentId"]
    admin = Admin(live)
    nothing = admin.post("/admin/reconcile", {"csrf_token": admin.csrf()})
    assert "Nothing to settle" in Text(nothing.text)["reconcile-summary"]
    time.sleep(1.1)
    answer = admin.post("/admin/reconcile", {"csrf_token": admin.csrf()})
    page = Text(answer.text)
    assert answer.status_code == 200 and page.row_ids == [payment_id]
    assert "1 payment pending for more than 1 seconds was settled" in page["reconcile-summary"]
    assert "Timed out" in page["reconcile-table"]
    assert live.app.extensions["store"].get(payment_id).settled_by == "timeout"


def test_reconcile_queues_the_webhook_events_due_and_says_how_many(live_server_factory, callback_receiver):
    live = live_server_factory(
        ADMIN_TOKEN=TOKEN, MERCHANT_WEBHOOK_URL=callback_receiver.url, WEBHOOK_SECRET="shop-secret-0123456789"
    )
    live.app.extensions["payments"].on_final = None  # as if the process died before queueing the event
    checkout_id = started(live, PAID)
    assert poll(live, checkout_id)["status"] == "completed"
    admin = Admin(live)
    answer = admin.post("/admin/reconcile", {"csrf_token": admin.csrf()})
    assert "1 webhook event due for another attempt was queued again." in Text(answer.text)["reconcile-webhooks"]
    assert callback_receiver.wait(1)[0]["data"]["checkoutRequestId"] == checkout_id
    store = live.app.extensions["store"]
    paid = store.find(checkout_id)
    wait_until(lambda: store.get(paid.payment_id).extra["webhooks"][f"evt_{paid.payment_id}_completed"]["delivered"])
    again = admin.post("/admin/reconcile", {"csrf_token": admin.csrf()})
    assert "No webhook event was due for another attempt." in Text(again.text)["reconcile-webhooks"]


# Finding payments.


@pytest.mark.parametrize(
    "params, expected",
    [
        ({}, ["H1", "H2", "H3", "H4", "H5", "H6", "D1", "Y1"]),
        ({"q": "QAB1C2D3E4"}, ["H1"]),  # receipt
        ({"q": "qxy9z8w7v6"}, ["H2"]),  # receipt, any case
        ({"q": "cart-1"}, ["H1"]),  # account reference
        ({"q": "H5"}, ["H5"]),  # checkout request id
        ({"q": "1032"}, ["H3"]),  # a phone's last digits
        ({"q": "0798 765 432"}, ["H2"]),  # a whole phone, as people write it
        ({"q": "5678"}, ["H1", "H4", "H5", "D1", "Y1"]),
        ({"status": "failed"}, ["H3", "H4", "H5", "Y1"]),
        ({"status": "pending"}, ["H6"]),
        ({"reason": "cancelled"}, ["H3", "H4"]),
        ({"status": "completed", "q": "5678"}, ["H1", "D1"]),
        ({"from": nairobi_date(2 * 24 * 60), "to": nairobi_date(2 * 24 * 60)}, ["D1"]),
        ({"to": nairobi_date(2 * 24 * 60)}, ["D1", "Y1"]),
        ({"from": nairobi_date(2 * 24 * 60), "status": "failed"}, ["H3", "H4", "H5"]),
    ],
)
def test_every_search_field_and_filter(operator, params, expected):
    page = operator.page("/admin/transactions", **params)
    assert page.row_ids == expected
    assert page["result-count"] == str(len(expected))


def test_bad_filters_are_named_and_ignored(operator):
    html = unescape(operator.get("/admin/transactions", status="paid", reason="bored", **{"from": "yesterday"}).text)
    assert "Unknown status 'paid'" in html and "Unknown reason 'bored'" in html
    assert "'yesterday' is not a date" in html
    assert Text(html)["result-count"] == "8"


def test_the_list_pages_newest_first(live):
    store = live.app.extensions["store"]
    for n in range(30):
        store.create(record(f"P{n:02d}", n))
    admin = Admin(live)
    first = admin.page("/admin/transactions")
    assert first.row_ids == [f"P{n:02d}" for n in range(25)]
    assert first["page-of"] == "Page 1 of 2" and "older-page" in first.by_id
    second = admin.page("/admin/transactions", page="2")
    assert second.row_ids == [f"P{n:02d}" for n in range(25, 30)]
    assert "newer-page" in second.by_id and "older-page" not in second.by_id
    for odd in ("0", "²", "-1", "x"):  # nonsense shows the first page, too far the last
        assert admin.page("/admin/transactions", page=odd).row_ids[:1] == ["P00"]
    assert admin.page("/admin/transactions", page="99")["page-of"] == "Page 2 of 2"


def test_a_real_payment_is_found_by_its_receipt_and_shows_its_whole_story(live):
    started_answer = payment(live, PAID, 150, accountReference="SHOP-77")
    payment_id, checkout_id = started_answer["paymentId"], started_answer["checkoutRequestId"]
    receipt = poll(live, checkout_id)["MpesaReceiptNumber"]
    store = live.app.extensions["store"]
    body = store.get(payment_id).callback
    assert (
        live.post(f"/hooks/stk/{live.app.extensions['settings'].callback_token}", json=body).status_code == 200
    )  # Daraja repeats itself
    store.update(
        payment_id,
        lambda tx: tx.history.extend(
            [
                {"at": time.time(), "event": "webhook_attempt", "status": 500, "attempt": 1},
                {"at": time.time(), "event": "webhook_delivered", "attempt": 2},
                {"at": time.time(), "event": "ticket_checked_in", "ticket": "TKT-9", "gate": "North"},
            ]
        ),
    )
    admin = Admin(live)
    found = admin.page("/admin/transactions", q=receipt)
    assert found.row_ids == [payment_id]
    html = admin.get(f"/admin/transactions/{payment_id}").text
    page = Text(html)
    assert page["detail-receipt"] == receipt and page["detail-phone"] == PAID
    assert (page["detail-payment-id"], page["detail-checkout-id"]) == (payment_id, checkout_id)
    assert Text(admin.get(f"/admin/transactions/{checkout_id}").text)["detail-payment-id"] == payment_id
    timeline = page["timeline"]
    for words in (
        "Payment started",
        "STK push accepted by Daraja",
        "Callback received from Daraja",
        "Payment completed",
        "Repeated result ignored",
        "Webhook sent to the shop",
        "Webhook delivered",
        "Ticket checked in",
        "Ticket TKT-9",
        "Gate North",
        "Customer message",
    ):
        assert words in timeline, words
    assert html.count("<summary>Raw callback</summary>") == 2  # the ignored repeat too
    assert "MpesaReceiptNumber" in page["settling-callback"]


def test_money_from_a_callback_that_matched_no_payment_is_shown_as_paid_not_matched(live):
    callbacks_before = unmatched_callbacks(live)
    body = {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": "29115-1",
                "CheckoutRequestID": "ws_CO_foreign",
                "ResultCode": 0,
                "ResultDesc": "The service request is processed successfully.",
                "CallbackMetadata": {
                    "Item": [
                        {"Name": "Amount", "Value": 750.0},
                        {"Name": "MpesaReceiptNumber", "Value": "QNM4X7Y8Z9"},
                        {"Name": "TransactionDate", "Value": 20261123103000},
                        {"Name": "PhoneNumber", "Value": "2547*****678"},
                    ]
                },
            }
        }
    }
    token = live.app.extensions["settings"].callback_token
    assert live.post(f"/hooks/stk/{token}", json=body).json() == {"ResultCode": 0, "ResultDesc": "Accepted"}

    answer = live.get("/stkpush/status/ws_CO_foreign").json()
    assert (answer["status"], answer["amount"], answer["MpesaReceiptNumber"]) == ("completed", 750, "QNM4X7Y8Z9")
    assert answer["unmatched"] is True and "not matched" in answer["message"]
    admin = Admin(live)
    listed = admin.page("/admin/transactions", q="QNM4X7Y8Z9")
    assert listed.row_ids == [answer["paymentId"]]
    assert "paid, not matched" in listed["transactions-table"]
    page = Text(admin.get(f"/admin/transactions/{answer['paymentId']}").text)
    assert page["detail-unmatched"] == "paid, not matched" and page["detail-phone"] == "2547*****678"
    (row,) = export(admin, q="ws_CO_foreign")
    assert (row["Status"], row["Note"], row["Amount (KES)"]) == ("completed", "paid, not matched", "750")
    assert row["Payment ID"] == answer["paymentId"] and row["Checkout request ID"] == "ws_CO_foreign"
    assert unmatched_callbacks(live) == callbacks_before + 1


def unmatched_callbacks(live) -> float:
    text = live.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    found = re.search(r'^mpesa_callbacks_total\{outcome="unmatched"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_unknown_payment_page_is_a_404(live):
    admin = Admin(live)
    answer = admin.http.get(live.url + "/admin/transactions/ws_CO_nope", timeout=10)
    assert answer.status_code == 404 and "No such payment" in answer.text


# The CSV.


def export(admin: Admin, **params) -> list[dict]:
    answer = admin.get("/admin/transactions.csv", **params)
    assert answer.headers["Content-Type"].startswith("text/csv")
    assert answer.headers["Content-Disposition"].startswith('attachment; filename="mpesa-payments-')
    text = answer.content.decode("utf-8-sig")
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_holds_what_a_reconciliation_needs_with_phones_masked(operator):
    rows = export(operator, status="completed")
    assert list(rows[0]) == [
        "Receipt",
        "Completed (EAT)",
        "Phone",
        "Amount (KES)",
        "Reference",
        "Status",
        "Reason",
        "Note",
        "Payment ID",
        "Order ID",
        "Checkout request ID",
        "Started (EAT)",
        "Description",
    ]
    assert [row["Checkout request ID"] for row in rows] == ["H1", "H2", "D1"]
    h1, h2, d1 = rows
    assert (h1["Receipt"], h1["Amount (KES)"], h1["Status"], h1["Reference"]) == (
        "QAB1C2D3E4",
        "100",
        "completed",
        "CART-1",
    )
    assert h1["Completed (EAT)"] == "2024-03-15 14:31:05"  # M-Pesa's own time when known
    finished = datetime.fromtimestamp(HOUR_SET[1].completed_at, mpesa.NAIROBI)
    assert h2["Completed (EAT)"] == finished.strftime("%Y-%m-%d %H:%M:%S")
    assert [row["Phone"] for row in rows] == ["2547******78", "2547******32", "2547******78"]


def test_csv_shows_full_phones_only_when_asked(operator):
    rows = export(operator, status="completed", full_phones="1")
    assert [row["Phone"] for row in rows] == ["254712345678", "254798765432", "254712345678"]


def test_csv_cells_cannot_become_spreadsheet_formulas(operator):
    rows = {row["Checkout request ID"]: row for row in export(operator)}
    assert rows["H2"]["Reference"] == "'=SUM(A1)"
    assert rows["H2"]["Description"] == "'+254 call me"
    assert rows["H3"]["Reference"] == "'@cmd"
    assert rows["H4"]["Reference"] == "'-1"
    assert rows["H1"]["Reference"] == "CART-1"


def test_csv_follows_the_filters(operator):
    assert [row["Checkout request ID"] for row in export(operator, reason="cancelled")] == ["H3", "H4"]
    assert [row["Checkout request ID"] for row in export(operator, q="QRS1T2U3V4")] == ["D1"]
    day = nairobi_date(3 * 24 * 60)
    rows = export(operator, **{"from": day, "to": day})
    assert [(row["Checkout request ID"], row["Reason"]) for row in rows] == [("Y1", "wrong_pin")]
    assert rows[0]["Receipt"] == "" and rows[0]["Completed (EAT)"]


def test_csv_of_a_real_cancelled_payment(live):
    checkout_id = started(live, CANCELLED, 20, accountReference="REF-1")
    assert poll(live, checkout_id)["status"] == "failed"
    rows = export(Admin(live), q=checkout_id)
    assert [(row["Status"], row["Reason"], row["Reference"]) for row in rows] == [("failed", "cancelled", "REF-1")]
    started_at = datetime.strptime(rows[0]["Started (EAT)"], "%Y-%m-%d %H:%M:%S")
    now = datetime.now(mpesa.NAIROBI).replace(tzinfo=None)
    assert abs(now - started_at) < timedelta(minutes=1)  # Nairobi time, not the server's zone
