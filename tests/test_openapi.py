"""The API's OpenAPI description, and a fuzzer that holds every answer to it.

Part 1: `/openapi.json` is served, is valid OpenAPI 3.0 (openapi-spec-validator), and
names exactly the API routes the Flask app has (the pages and static files aside).

Part 2: hypothesis throws generated requests at a live server (real HTTP, the real
simulator behind it) and checks every answer against API.md and the spec:
- no 5xx, except the documented 502/503/504 of POST /stkpush and 503 of deep /health;
- always JSON, and strict JSON (no NaN or Infinity, which browsers cannot parse);
- every error has `success: false` and a string `message`, and the 400s of /stkpush,
  /stkpush/status and /transactions name the `field` at fault;
- the body validates against the schema the spec declares for that path, method and
  status (an undeclared status is a failure);
- where the input is known good or known bad, the verdict matches (a valid payment is
  never a 400; an invalid field is always a 400 naming it; a replayed Idempotency-Key
  gets the first answer; a callback's result is applied once, first one wins).

Most generated bodies are invalid; valid ones push to the simulator with varied phone
numbers, so the simulator's "Unable to lock subscriber" appears only as a documented
502. FUZZ_SCALE=10 in the environment runs ten times as many examples.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import string
import time
from urllib.parse import quote, unquote

import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from tests.helpers import CALLBACK_TOKEN, ROOT

SPEC_FILE = ROOT / "static" / "openapi.json"
SPEC = json.loads(SPEC_FILE.read_text(encoding="utf-8"))

ADMIN_TOKEN = "fuzz-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MAX_AMOUNT = 150_000
CHECKOUT_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
DOCUMENTED_5XX = {("/stkpush", "post"): {502, 503, 504}, ("/health", "get"): {503}}
FIELD_REQUIRED = {"/stkpush", "/stkpush/status", "/stkpush/status/{}", "/transactions"}
REASONS = {1032: "cancelled", 1037: "timeout", 1019: "timeout", 1: "insufficient_funds", 2001: "wrong_pin"}

FUZZ_SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
# The shop the fuzz servers sell from: "tee" sells out after five.
CATALOG = {
    "items": [
        {"id": "tee", "name": "Tee", "price": 100, "capacity": 5},
        {"id": "pass", "name": "Day pass", "price": 250, "kind": "ticket", "capacity": 1000},
        {"id": "song", "name": "Song", "price": 1},
    ]
}
PRICES = {item["id"]: item["price"] for item in CATALOG["items"]}
CHECKOUT_SECRET = "fuzz-checkout-secret-0123456789"


def fuzz_settings(examples: int):
    return settings(
        max_examples=max(1, int(examples * FUZZ_SCALE)),
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# The spec.


def template(rule: str) -> str:
    """'/stkpush/status/<checkout_id>' and '/stkpush/status/{checkoutRequestId}' -> '/stkpush/status/{}'."""
    return re.sub(r"<[^>]*>|\{[^}]*\}", "{}", rule)


SPEC_PATHS = {template(path): path for path in SPEC["paths"]}


def deref(node: dict) -> dict:
    """Follow local $refs ("#/components/...") to the object they name."""
    while "$ref" in node:
        assert node["$ref"].startswith("#/"), node["$ref"]
        target = SPEC
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = target
    return node


def declared_content(path_template: str, method: str, status: int) -> dict | None:
    """{media type: schema} the spec gives this answer, or None when the status is not declared."""
    operation = SPEC["paths"][SPEC_PATHS[path_template]][method]
    response = operation["responses"].get(str(status))
    if response is None:
        return None
    return {media: content["schema"] for media, content in deref(response)["content"].items()}


_validators: dict = {}


def schema_errors(instance, schema: dict) -> list[str]:
    key = json.dumps(schema, sort_keys=True)
    if key not in _validators:
        _validators[key] = OAS30Validator(
            {"allOf": [schema], "components": SPEC["components"]}, format_checker=OAS30Validator.FORMAT_CHECKER
        )
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in _validators[key].iter_errors(instance)
    ]


def test_openapi_json_is_served_and_is_valid_openapi_3(live_server):
    response = live_server.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    served = response.json()
    assert served == SPEC
    assert served["openapi"].startswith("3.0")
    validate_spec(served)


# Blueprints that serve HTML pages (pages.py, and admin.py's dashboard), not the JSON API.
PAGE_BLUEPRINTS = ("pages", "admin")


def is_page(endpoint: str) -> bool:
    return endpoint == "static" or ("." in endpoint and endpoint.split(".")[0] in PAGE_BLUEPRINTS)


def api_rules(app) -> set[tuple[str, str]]:
    """(path template, method) of every route but the static files and the page blueprints'."""
    found = set()
    for rule in app.url_map.iter_rules():
        if is_page(rule.endpoint):
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            found.add((template(rule.rule), method.lower()))
    return found


def spec_operations() -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    return {(template(path), method) for path, item in SPEC["paths"].items() for method in item if method in methods}


def test_spec_lists_every_route_of_the_app(live_server):
    routes = api_rules(live_server.app)
    assert routes, "no API routes found"
    assert routes - spec_operations() == set(), "routes missing from static/openapi.json"
    assert spec_operations() - routes == set(), "operations in static/openapi.json that the app lacks"


def test_every_documented_answer_is_json_and_errors_have_the_error_shape():
    allowed = {"200", "400", "401", "403", "404", "409", "411", "413", "429", "502", "503", "504"}
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            assert set(operation["responses"]) <= allowed, (path, method)
            for status, response in operation["responses"].items():
                content = deref(response)["content"]
                if int(status) >= 300:
                    assert list(content) == ["application/json"], (path, method, status)
                if "application/json" not in content:
                    continue
                schema = content["application/json"]["schema"]
                if int(status) < 400 or path == "/health" or (path.startswith("/hooks/") and status == "400"):
                    continue
                # Every error body must accept the bare error shape's required part and
                # refuse a body without success: false and a message.
                assert schema_errors({"success": True, "message": "x"}, schema), (path, method, status)
                assert schema_errors({"success": False}, schema), (path, method, status)


def test_spec_declares_the_idempotency_key_and_the_admin_scheme():
    stkpush = SPEC["paths"]["/stkpush"]["post"]
    params = [deref(p) for p in stkpush["parameters"]]
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in params)
    schemes = SPEC["components"]["securitySchemes"]
    assert any(s["type"] == "http" and s["scheme"] == "bearer" for s in schemes.values())
    for path in ("/transactions", "/transactions/{id}"):
        assert SPEC["paths"][path]["get"]["security"]


# The checker.


def strict_json(text: str):
    """json.loads without Python's NaN/Infinity extension, as a browser parses."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def route_of(app, method: str, path: str) -> str | None:
    """The spec path template the server routes this request to; None for 404/405."""
    adapter = app.url_map.bind("127.0.0.1")
    try:
        rule, _ = adapter.match(unquote(path), method=method.upper(), return_rule=True)
    except RequestRedirect:
        return "redirect"  # "a//b" -> "a/b": Werkzeug merges slashes with a 308
    except (NotFound, MethodNotAllowed):
        return None
    if is_page(rule.endpoint):
        return "page"
    return template(rule.rule)


def check(live, method: str, path: str, response: requests.Response):
    """What holds for every answer; returns the parsed JSON body (None for SVG or metrics)."""
    method = method.lower()
    where = f"{method.upper()} {path} -> {response.status_code}: {response.text[:300]!r}"
    route = route_of(live.app, method, path.split("?")[0])
    assert route != "page", f"the fuzzer hit a page route: {where}"
    status = response.status_code
    if route == "redirect":
        assert status == 308 and response.headers.get("Location"), where
        return None
    if status >= 500:
        assert status in DOCUMENTED_5XX.get((route, method), set()), f"undocumented 5xx: {where}"
    if route is None:
        assert status in (404, 405), where
        content = {"application/json": SPEC["components"]["schemas"]["Error"]}
    else:
        content = declared_content(route, method, status)
        assert content is not None, f"status not declared in the spec: {where}"
    media = response.headers.get("Content-Type", "").split(";")[0].strip()
    assert media in content, f"{media or 'no content type'} where the spec says {sorted(content)}: {where}"
    if media != "application/json":
        return None
    try:
        body = strict_json(response.text)
    except ValueError as error:
        raise AssertionError(f"invalid JSON ({error}): {where}") from None
    callback_refusal = route in ("/hooks/stk/{}", "/hooks/stk/{}/{}") and status == 400
    if status >= 400 and not callback_refusal:
        assert isinstance(body, dict) and body.get("success") is False, f"error without success false: {where}"
        assert isinstance(body.get("message"), str) and body["message"], f"error without a message: {where}"
    if status == 400 and route in FIELD_REQUIRED:
        assert isinstance(body.get("field"), str), f"400 without a field: {where}"
    errors = schema_errors(body, content[media])
    assert not errors, f"answer does not match the spec ({'; '.join(errors[:5])}): {where}"
    return body


def send(live, method: str, path: str, **kwargs) -> tuple[requests.Response, dict | None]:
    response = requests.request(method, live.url + path, timeout=30, allow_redirects=False, **kwargs)
    return response, check(live, method, path, response)


# Strategies.

ASCII_DIGITS = string.digits
UNICODE_DIGITS = [
    "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669",  # Arabic-Indic
    "\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19",  # fullwidth
    "\u0966\u0967\u0968\u0969\u096a\u096b\u096c\u096d\u096e\u096f",
]  # Devanagari
TRICKY_TEXT = [
    "",
    " ",
    "\u00b2",
    "\u00b9\u00b2",
    "\u0661\u0662",
    "\uff11",
    "1e3",
    "0x10",
    "-1",
    "+5",
    "1.0",
    " 7 ",
    "NaN",
    "Infinity",
    "null",
    "true",
    "[]",
    "{}",
    "\u0000",
    "\ufeff1",
    "\U0001f4b8",
    "DROP TABLE",
    "../..",
    "%00",
    "a" * 300,
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from([2**63, -(2**63) - 1, 10**30, -(10**40), 10**300, 1e308, 5e-324, -0.0])
    | st.sampled_from(TRICKY_TEXT)
)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=10,
)
# Python's json reads NaN and Infinity and huge exponents; send some to see what comes back.
loose_scalars = scalars | st.sampled_from([float("nan"), float("inf"), float("-inf")])
loose_json_values = st.recursive(
    loose_scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=8,
)


@st.composite
def valid_phones(draw) -> str:
    """A Safaricom number in one of API.md's forms, ASCII digits, maybe with separators."""
    if draw(st.integers(0, 3)) == 0:
        national = "70000" + draw(st.sampled_from(["0000", "1032", "0001", "2001", "1037", "0017"]))  # test numbers
    elif draw(st.booleans()):
        national = "7" + "".join(draw(st.lists(st.sampled_from(ASCII_DIGITS), min_size=8, max_size=8)))
    else:
        national = (
            "1"
            + draw(st.sampled_from("01"))
            + "".join(draw(st.lists(st.sampled_from(ASCII_DIGITS), min_size=7, max_size=7)))
        )
    prefix = draw(st.sampled_from(["0", "", "254", "+254"]))
    text = prefix + national
    if draw(st.integers(0, 3)) == 0:
        sep = draw(st.sampled_from([" ", "-", "(", ")"]))
        cut = draw(st.integers(1, len(text) - 1))
        text = text[:cut] + sep + text[cut:]
    return text


@st.composite
def invalid_phones(draw):
    kind = draw(st.integers(0, 6))

    def digits(n):
        return "".join(draw(st.lists(st.sampled_from(ASCII_DIGITS), min_size=n, max_size=n)))

    if kind == 0:
        return "07" + digits(draw(st.sampled_from([6, 7, 9, 10])))  # wrong length
    if kind == 1:
        return draw(st.sampled_from(["08", "06", "2548", "2549", "+2550", "00"])) + digits(8)  # not Safaricom
    if kind == 2:  # the right shape with non-ASCII digits: not a phone number Daraja takes
        table = draw(st.sampled_from(UNICODE_DIGITS))
        prefix = draw(st.sampled_from(["07", "2547", "+2547", "7", "011"]))
        rest = digits(7 if prefix == "011" else 8)
        return prefix + "".join(table[int(c)] for c in rest)
    if kind == 3:
        return draw(st.sampled_from([True, False, [], ["0712345678"], {"n": "0712345678"}, 7.12345678e8, 712345678.0]))
    if kind == 4:
        return "07" + digits(4) + draw(st.text(alphabet="abcxyz!#*_", min_size=1, max_size=4))
    if kind == 5:
        return draw(st.sampled_from(["", None]))  # "Phone number is required"
    return draw(st.text(alphabet=string.ascii_letters, min_size=1, max_size=12))


@st.composite
def valid_amounts(draw):
    amount = draw(st.integers(1, MAX_AMOUNT))
    return draw(st.sampled_from([amount, amount, str(amount), f" {amount} "]))


invalid_amounts = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=MAX_AMOUNT + 1),
    st.floats(allow_nan=False, allow_infinity=False),  # even 10.0: API.md wants a JSON integer
    st.sampled_from(
        [
            10.0,
            1.0,
            True,
            False,
            None,
            "",
            "10.5",
            "1e3",
            "-5",
            "abc",
            "0",
            [],
            [100],
            {"v": 1},
            "9" * 13,
            str(MAX_AMOUNT + 1),
        ]
    ),
)


def text_field(limit: int):
    return st.one_of(st.none(), st.text(max_size=limit), st.text(max_size=40))


def bad_text_field(limit: int):
    return st.one_of(
        st.integers(),
        st.booleans(),
        st.lists(st.text(max_size=3), max_size=2),
        st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
        st.text(min_size=limit + 1, max_size=limit + 40),
    )


good_items = st.lists(
    st.fixed_dictionaries({"id": st.sampled_from(sorted(PRICES))}, optional={"quantity": st.integers(1, 3)}),
    min_size=1,
    max_size=3,
)
bad_items = st.one_of(
    st.sampled_from(
        [
            [],
            "tee",
            5,
            True,
            {"id": "tee"},
            [1],
            [None],
            [{"id": "nope"}],
            [{"id": 5}],
            [{"quantity": 1}],
            [{"id": "tee", "quantity": 0}],
            [{"id": "tee", "quantity": 101}],
            [{"id": "tee", "quantity": True}],
            [{"id": "tee", "quantity": 1.5}],
            [{"id": "tee", "quantity": "2"}],
            [{"id": "song", "quantity": 60}] * 2,
            [{"id": "song"}] * 21,
        ]
    ),
    st.lists(json_values, min_size=1, max_size=3).filter(
        lambda lines: not all(isinstance(x, dict) and x.get("id") in PRICES for x in lines)
    ),
)


def order_total(items: list) -> int:
    return sum(PRICES[line["id"]] * line.get("quantity", 1) for line in items)


FIELDS = ("phone", "amount", "description", "accountReference")
NOT_EXTRA = FIELDS + ("items", "signature", "expires")
GOOD = {
    "phone": valid_phones(),
    "amount": valid_amounts(),
    "description": text_field(200),
    "accountReference": text_field(100),
}
BAD = {
    "phone": invalid_phones(),
    "amount": invalid_amounts,
    "description": bad_text_field(200),
    "accountReference": bad_text_field(100),
}


@st.composite
def payment_bodies(draw) -> tuple[object, set | None]:
    """(body, verdict): verdict is set() for a valid payment, the bad fields, or None (unsure)."""
    body, bad, unsure = {}, set(), set()
    by_items = draw(st.integers(0, 3)) == 0
    for name in FIELDS:
        choice = draw(st.sampled_from(["good"] * 5 + ["bad", "bad", "absent", "any"]))
        if name == "amount" and by_items:
            choice = draw(st.sampled_from(["absent"] * 4 + ["null", "bad-with-items"]))
            if choice == "null":
                body["amount"] = draw(st.sampled_from([None, ""]))
            elif choice == "bad-with-items":  # "send either items or an amount"
                body["amount"] = draw(GOOD["amount"])
                bad.add("amount")
            continue
        if name in ("phone", "amount") and choice == "absent":
            bad.add(name)  # required
            continue
        if choice == "absent":
            continue
        if choice == "any":
            unsure.add(name)
            body[name] = draw(json_values)
        else:
            body[name] = draw((GOOD if choice == "good" else BAD)[name])
            if choice == "bad":
                bad.add(name)
    if by_items:
        if draw(st.integers(0, 3)) == 0:
            body["items"] = draw(bad_items)
            bad.add("items")
        else:
            body["items"] = draw(good_items)
    elif draw(st.integers(0, 9)) == 0:
        body["items"] = None  # the same as no items
    if draw(st.integers(0, 4)) == 0:
        for key, value in draw(st.dictionaries(st.text(max_size=10), json_values, max_size=3)).items():
            if key not in NOT_EXTRA:
                body[key] = value
    if bad:  # refused, naming one of the bad fields (or a doubtful one checked before them)
        return body, bad | unsure
    return body, None if unsure else set()


JSON_TYPES = ["application/json", "application/json; charset=utf-8", "application/vnd.shop+json"]
OTHER_TYPES = [
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/xml",
    "",
    "application/jsonp",
]


NOT_JSON = object()  # the server cannot read the body as JSON


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


MALFORMED = st.one_of(
    st.sampled_from(
        [
            '{"phone": "0712345678", "amount": 1',
            "{'phone': '0712345678'}",
            "{,}",
            "nul",
            '{"phone": "0712345678", "amount": 1}}',
            "\x00",
            "NaN",
            "-Infinity",
            "1e999",
            "1" * 5000,
            '{"amount": ' + "9" * 5000 + "}",
            '"just a string"',
            "[]",
            "42",
            "null",
            '{"a": ' * 40 + "1" + "}" * 40,
        ]
    ),
    # Python's parser gives up at the recursion limit: 1,000 in production, but pytest and
    # hypothesis raise it (for the whole process, so for the server threads too) to a few
    # thousand. 500 parses everywhere, 10,000 nowhere.
    st.sampled_from([50, 500, 10_000, 20_000]).map(nested),
    st.sampled_from([50, 300, 10_000]).map(lambda n: '{"phone": ' + nested(n) + ', "amount": 1}'),
    st.binary(max_size=64),
    st.text(max_size=64),
)


@st.composite
def raw_bodies(draw) -> tuple[bytes | None, str | None, object, set | None, bool]:
    """(data, content type, parsed JSON or a marker, verdict, oversized)."""
    kind = draw(
        st.sampled_from(["payment"] * 7 + ["json", "json", "malformed", "malformed", "wrongtype", "oversized", "empty"])
    )
    content_type = draw(st.sampled_from(JSON_TYPES))
    if kind == "payment":
        body, verdict = draw(payment_bodies())
        return json.dumps(body).encode(), content_type, body, verdict, False
    if kind == "json":
        body = draw(loose_json_values)
        verdict = {"body"} if not isinstance(body, dict) else None
        return json.dumps(body, allow_nan=True).encode(), content_type, body, verdict, False
    if kind == "malformed":
        text = draw(MALFORMED)
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):
            return data, content_type, NOT_JSON, {"body"}, False
        return data, content_type, parsed, ({"body"} if not isinstance(parsed, dict) else None), False
    if kind == "wrongtype":
        body, _ = draw(payment_bodies())
        return json.dumps(body).encode(), draw(st.sampled_from(OTHER_TYPES)), NOT_JSON, {"body"}, False
    if kind == "oversized":
        body = {"phone": "0712345678", "amount": 1, "description": "x" * draw(st.integers(66_000, 90_000))}
        return json.dumps(body).encode(), content_type, body, None, True
    return b"", draw(st.sampled_from(JSON_TYPES + [None])), NOT_JSON, {"body"}, False


# Latin-1 without controls or leading blanks: what an HTTP client can put in a header.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xFF, blacklist_categories=("Cc", "Zs")), max_size=40
)


idempotency_keys = st.one_of(
    st.none(),
    st.none(),
    st.none(),
    st.sampled_from(["order-1", "order-2", "k"]),
    header_text.filter(lambda s: s.strip() == s),
    st.sampled_from(["", "x" * 255, "y" * 256, "z" * 1000, "a\tb", "\u00e9t\u00e9"]),
)


# Fixtures.


def settled(live, checkout_id: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        answer = live.post("/stkpush/status", json={"checkoutRequestId": checkout_id}).json()
        if answer["status"] != "pending" or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


def seed(live, phones) -> dict[str, int]:
    """Start one payment per phone; return {checkoutRequestId: amount}."""
    known = {}
    for index, phone in enumerate(phones):
        amount = 10 + index
        response = live.post("/stkpush", json={"phone": phone, "amount": amount, "accountReference": f"SEED{index}"})
        assert response.status_code == 200, response.text
        known[response.json()["checkoutRequestId"]] = amount
    return known


@pytest.fixture
def fuzz_server(live_server_factory, simulator, tmp_path):
    # Prompts on non-test numbers wait a minute, so no simulator callback races the fuzzer.
    requests.patch(simulator.url + "/simulator/config", json={"prompt_timeout": 60}, timeout=5)
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps(CATALOG), encoding="utf-8")

    def start(**env):
        return live_server_factory(
            **{
                "ADMIN_TOKEN": ADMIN_TOKEN,
                # The fuzzer sends wrong tokens by the hundred; the lockout they would start has tests of its own.
                "ADMIN_LOGIN_FREE_TRIES": "1000000",
                "STATUS_FIRST_QUERY_AFTER": "0",
                "STATUS_QUERY_INTERVAL": "0.5",
                "CATALOG_FILE": str(catalog),
                **env,
            }
        )

    return start


# Fuzz: /stkpush.


def once(fuzz_server, make) -> dict:
    """State built on a test's first example and kept for the others (one server per test)."""
    if not hasattr(fuzz_server, "state"):
        fuzz_server.state = make()
    return fuzz_server.state


def not_strict_json(data: bytes) -> bool:
    """True for a body only Python's lenient parser reads (NaN, Infinity), or with a number too
    large for a float (1e999), which the server refuses rather than read as infinity."""

    def finite(text: str) -> float:
        if math.isinf(float(text)):
            raise ValueError(f"{text} is out of range")
        return float(text)

    try:
        strict_json(data.decode("utf-8"))
        json.loads(data.decode("utf-8"), parse_float=finite)
    except (ValueError, RecursionError):
        return True
    return False


def fingerprint(body) -> str:
    return json.dumps(body, sort_keys=True, allow_nan=True)


@fuzz_settings(400)
@given(raw=raw_bodies(), key=idempotency_keys)
def test_fuzz_stkpush(fuzz_server, raw, key):
    # The limits run (the phone's key reads every body) but never bite: answers stay repeatable.
    state = once(
        fuzz_server,
        lambda: {
            "live": fuzz_server(
                RATELIMIT_ENABLED="true",
                RATE_LIMIT_PUSH_PER_PHONE="10000/minute",
                RATE_LIMIT_PUSH_PER_IP="10000/minute",
                RATE_LIMIT_STATUS_PER_IP="10000/minute",
            ),
            "keys": {},
        },
    )  # Idempotency-Key -> (fingerprint, status, answer) of its first request
    data, content_type, parsed, verdict, oversized = raw
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if key is not None:
        headers["Idempotency-Key"] = key
    response, body = send(state["live"], "POST", "/stkpush", data=data, headers=headers)
    status = response.status_code
    where = f"body={data[:300]!r} type={content_type!r} key={key!r} -> {status} {body}"
    event(f"verdict {'unsure' if verdict is None else sorted(verdict) or 'valid'} -> {status}")

    if oversized:
        assert status == 413, where
        return
    if parsed is NOT_JSON or parsed is None:  # JSON null reads as "no JSON" in Flask
        assert status == 400 and body["field"] == "body", where
        return
    if not_strict_json(data) and status == 400 and body["field"] == "body":
        return  # NaN or Infinity: refusing it as "not JSON" is as good as reading it
    slot = key.strip() if key is not None else None
    if slot is not None and not 1 <= len(slot) <= 255:
        assert status == 400 and body["field"] in (verdict or set()) | {"Idempotency-Key"}, where
        return
    first = state["keys"].get(slot) if slot else None
    if first is not None:
        if first[0] == fingerprint(parsed):
            assert (status, body) == first[1:], f"replay differs from the first answer: {where}"
            assert response.headers.get("Idempotent-Replayed") == "true", where
        else:
            assert status == 409 and body["field"] == "Idempotency-Key", where
        return
    if verdict:  # known bad
        assert status == 400, f"invalid payment not refused: {where}"
        assert body["field"] in verdict, f"400 names the wrong field: {where}"
    elif verdict == set():  # known good
        sold_out = status == 409 and body.get("field") == "items"
        assert status in (200, 502, 503, 504) or sold_out, f"valid payment refused: {where}"
    if status == 200:
        assert body["checkoutRequestId"].startswith("ws_CO_"), where
        if verdict == set():
            asked = order_total(parsed["items"]) if parsed.get("items") else int(parsed["amount"])
            assert body["amount"] == asked, f"prompted for another amount: {where}"
    if slot and status in (200, 504):
        state["keys"][slot] = (fingerprint(parsed), status, body)


# Fuzz: /stkpush/status.


@st.composite
def status_requests(draw, known: list[str]):
    """(method, path, kwargs, expectation): expectation is an id's fate or None."""
    pick = draw(st.sampled_from(["known"] * 3 + ["wellformed", "bad", "any", "alias"]))
    if pick == "known":
        value, fate = draw(st.sampled_from(known)), "known"
    elif pick == "wellformed":
        value, fate = draw(st.from_regex(r"\A(ws_CO_)?[A-Za-z0-9_\-]{1,40}\Z")), "unknown"
        fate = "known" if value in known else fate
    elif pick == "bad":
        value = draw(
            st.one_of(
                st.text(min_size=1, max_size=80).filter(lambda s: not CHECKOUT_ID.fullmatch(s.strip())),
                st.sampled_from(["", "x" * 65, "ws CO", "ws_CO_\u0661", "a/b", "..", "."]),
            )
        )
        fate = "bad"
    elif pick == "alias":
        value, fate = draw(st.sampled_from(known)), None
    else:
        value, fate = draw(json_values), None
    if draw(st.booleans()) and isinstance(value, str) and value not in ("", ".", ".."):
        return "GET", "/stkpush/status/" + quote(value, safe=""), {}, value, fate
    if pick == "alias":
        name = draw(st.sampled_from(["checkoutRequestID", "CheckoutRequestID"]))
        return "POST", "/stkpush/status", {"json": {name: value}}, value, "known"
    if pick == "any" and draw(st.booleans()):
        return (
            "POST",
            "/stkpush/status",
            {"data": json.dumps(value, allow_nan=True), "headers": {"Content-Type": "application/json"}},
            value,
            None,
        )
    name = "paymentId" if isinstance(value, str) and value.startswith("pay_") and draw(st.booleans()) else None
    if name is not None:
        return "POST", "/stkpush/status", {"json": {name: value}}, value, fate
    return "POST", "/stkpush/status", {"json": {"checkoutRequestId": value}}, value, fate


@fuzz_settings(200)
@given(data=st.data())
def test_fuzz_status(fuzz_server, data):
    def make():
        live = fuzz_server(TRANSACTION_TTL="2")
        known = seed(
            live, ["254700000000", "254700001032", "254700000001", "254700002001", "254711000001", "254711000002"]
        )
        payment_ids = [settled(live, checkout_id)["paymentId"] for checkout_id in list(known)]
        return {"live": live, "known": list(known) + payment_ids[::2]}

    state = once(fuzz_server, make)
    live, known = state["live"], state["known"]
    method, path, kwargs, value, fate = data.draw(status_requests(known))
    response, body = send(live, method, path, **kwargs)
    if response.status_code == 308:  # a path with '//' in it: checked in check()
        return
    status, where = response.status_code, f"{method} {path} {kwargs} -> {response.status_code} {body}"
    if fate == "known":
        assert status == 200 and value in (body["checkoutRequestId"], body["paymentId"]), where
    elif fate == "unknown":
        assert status == 404 and body == {
            "success": False,
            "status": "not_found",
            "message": "Transaction not found",
        }, where
    elif fate == "bad":
        assert status in (400, 404), where
        if status == 400:
            assert body["field"] in ("checkoutRequestId", "paymentId"), where


# Fuzz: the callback.


def normal_code(code):
    if isinstance(code, str) and re.fullmatch(r"-?[0-9]+", code.strip()):
        return int(code)
    return code


@st.composite
def callbacks(draw, known: dict[str, int]):
    """(token, data, content type, plan): plan says what a well-formed callback should do, or None."""
    token = draw(
        st.sampled_from(["right"] * 8 + ["near", "random"]).flatmap(
            lambda kind: {
                "right": st.just(CALLBACK_TOKEN),
                "near": st.sampled_from(["wrong", CALLBACK_TOKEN + "x", CALLBACK_TOKEN[:-1], CALLBACK_TOKEN.upper()]),
                "random": st.text(
                    alphabet=string.ascii_letters + string.digits + "-_.~", min_size=1, max_size=40
                ).filter(lambda token: token not in (".", "..")),
            }[kind]
        )
    )
    kind = draw(st.sampled_from(["daraja"] * 6 + ["any", "malformed", "broken"]))
    if kind == "any":
        value = draw(loose_json_values)
        return token, json.dumps(value, allow_nan=True), "application/json", None
    if kind == "malformed":
        text = draw(MALFORMED)
        return token, text, draw(st.sampled_from(JSON_TYPES + OTHER_TYPES)), "malformed"
    checkout_id = draw(st.sampled_from(list(known)) | st.from_regex(r"\Aws_CO_[0-9]{1,20}\Z"))
    code = draw(
        st.sampled_from([0, 0, 0, 1032, 1037, 1019, 1, 2001, 17, 1001, "SFC_IC0003", "0", "1032"])
        | st.integers(-5, 99_999)
    )
    callback = {
        "MerchantRequestID": draw(st.text(max_size=20)),
        "CheckoutRequestID": checkout_id,
        "ResultCode": code,
        "ResultDesc": draw(st.text(max_size=40)),
    }
    asked = known.get(checkout_id, 100)
    amount_kind = draw(st.sampled_from(["exact", "exact", "float", "text", "other", "absent", "nometa"]))
    paid = {"exact": asked, "float": float(asked), "text": str(asked), "other": asked + draw(st.integers(1, 9))}
    if amount_kind != "nometa":
        items = [
            {"Name": "MpesaReceiptNumber", "Value": draw(st.from_regex(r"\A[A-Z0-9]{10}\Z"))},
            {
                "Name": "TransactionDate",
                "Value": draw(st.sampled_from([20261123103000, "20261123103000", "garbage", None, 1])),
            },
            {"Name": "PhoneNumber", "Value": 254712345678},
            {"Name": "Balance"},
        ]
        if amount_kind in paid:
            items.insert(0, {"Name": "Amount", "Value": paid[amount_kind]})
        callback["CallbackMetadata"] = {"Item": items}
    extra = draw(st.dictionaries(st.sampled_from(["Extra", "Note", "Meta"]), loose_json_values, max_size=2))
    callback.update(extra)
    document = {"Body": {"stkCallback": callback}}
    try:
        json.dumps(document, allow_nan=False)
        loose = False
    except ValueError:
        loose = True  # NaN or Infinity inside: refusing it or taking it are both fine
    plan = {
        "id": checkout_id,
        "code": normal_code(code),
        "loose": loose,
        "amount_matches": amount_kind not in ("other",),
        "amount_known": amount_kind not in ("absent", "nometa"),
    }
    if kind == "broken":  # one required part missing or of the wrong type
        breakage = draw(st.sampled_from(["no-id", "id-type", "no-code", "code-list", "items", "amount"]))
        if breakage == "no-id":
            del callback["CheckoutRequestID"]
        elif breakage == "id-type":
            callback["CheckoutRequestID"] = draw(st.sampled_from([5, None, [], "", "  "]))
        elif breakage == "no-code":
            del callback["ResultCode"]
        elif breakage == "code-list":
            callback["ResultCode"] = draw(st.sampled_from([[], {}, True, ""]))
        elif breakage == "items":
            callback["CallbackMetadata"] = draw(st.sampled_from([{"Item": {}}, {"Item": "x"}, [], "meta"]))
        else:
            callback["CallbackMetadata"] = {
                "Item": [
                    {
                        "Name": "Amount",
                        "Value": draw(st.sampled_from(["abc", "", float("nan"), float("inf"), {"v": 1}])),
                    }
                ]
            }
        plan = "malformed"
    return token, json.dumps(document, allow_nan=True), "application/json", plan


def admin_record(live, checkout_id: str) -> dict:
    response, body = send(live, "GET", "/transactions/" + quote(checkout_id, safe=""), headers=AUTH)
    assert response.status_code == 200, body
    return body["transaction"]


@fuzz_settings(250)
@given(data=st.data())
def test_fuzz_callback(fuzz_server, data):
    def make():
        live = fuzz_server()
        return {"live": live, "known": seed(live, [f"25471100{n:04d}" for n in range(1, 9)])}

    state = once(fuzz_server, make)
    live, known = state["live"], state["known"]
    token, text, content_type, plan = data.draw(callbacks(known))
    target = plan["id"] if isinstance(plan, dict) and plan["id"] in known else None
    before = admin_record(live, target) if target else None

    response, body = send(
        live,
        "POST",
        "/hooks/stk/" + quote(token, safe=""),
        data=text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"),
        headers={"Content-Type": content_type},
    )
    status, where = response.status_code, f"token={token!r} body={text[:300]!r} -> {response.status_code} {body}"
    planned = plan if isinstance(plan, str) else "daraja" if plan else "any"
    event(f"{'known id' if target else 'other'} {planned} -> {status}")
    if token != CALLBACK_TOKEN:
        assert status == 403, where
        return
    if status == 413:
        return
    if plan == "malformed":
        assert status == 400 and body["ResultCode"] != 0, f"malformed callback accepted: {where}"
    elif isinstance(plan, dict) and not (plan["loose"] and status == 400):
        assert status == 200 and body == {"ResultCode": 0, "ResultDesc": "Accepted"}, where
    else:
        assert status in (200, 400), where
    if target is None:
        return

    after = admin_record(live, target)
    answer = send(live, "POST", "/stkpush/status", json={"checkoutRequestId": target})[1]
    if status == 400 or (before["status"] != "pending" and before["settled_by"] != "timeout"):
        # A refused callback changes nothing; of the others, the first final result wins.
        for name in ("status", "reason", "result_code", "flags"):
            assert after[name] == before[name], f"{name} changed by a refused or late callback: {where}"
        assert answer["status"] == before["status"], where
        return
    code = plan["code"]
    if code == 0 and not plan["amount_known"]:
        # Completes nothing by itself: the STK Query asked at once says the prompt still waits.
        assert after["status"] == "pending" and answer["status"] == "pending", where
        assert "amount_unconfirmed" not in after["flags"], where
    elif code == 0 and plan["amount_matches"]:
        assert after["status"] == "completed" and answer["status"] == "completed", where
        assert answer["success"] is True and answer["amount"] == known[target], where
    elif code == 0:
        assert after["status"] == "failed" and "amount_mismatch" in after["flags"], where
        assert answer["success"] is False, where
    else:
        assert after["status"] == "failed" and answer["status"] == "failed", where
        assert answer["success"] is False and answer["resultCode"] == code, where
        expected = REASONS.get(code)
        assert answer["reason"] == expected if expected else answer["reason"] in ("rejected", "error"), where


# Fuzz: admin API.

WRONG_AUTH = [
    f"Bearer {ADMIN_TOKEN}x",
    f"Bearer {ADMIN_TOKEN[:-1]}",
    ADMIN_TOKEN,
    "Bearer",
    "Bearer ",
    f"Basic {ADMIN_TOKEN}",
    f"Bearer {ADMIN_TOKEN}\u00e9",
    f"Bearer {ADMIN_TOKEN.upper()}",
]
# RFC 7235 makes the scheme case-insensitive and allows more than one space: either answer is taken.
UNSURE_AUTH = [f"bearer {ADMIN_TOKEN}", f"BEARER {ADMIN_TOKEN}", f"Bearer  {ADMIN_TOKEN}"]
auth_headers = st.one_of(
    st.just(AUTH),
    st.just(AUTH),
    st.just({}),
    st.sampled_from([{"Authorization": value} for value in WRONG_AUTH + UNSURE_AUTH]),
    header_text.map(lambda text: {"Authorization": text} if text else {}),
)
query_values = st.one_of(
    st.text(max_size=12),
    st.sampled_from(TRICKY_TEXT),
    st.integers().map(str),
    st.sampled_from(
        [
            "1",
            "20",
            "100",
            "101",
            "0",
            "100000",
            "100001",
            "pending",
            "completed",
            "failed",
            "0712345678",
            "254711000001",
        ]
    ),
)


@st.composite
def admin_requests(draw, known: list[str]):
    if draw(st.integers(0, 3)) == 0:
        segment = draw(st.sampled_from(known) | st.text(min_size=1, max_size=30).filter(lambda s: s not in (".", "..")))
        return "/transactions/" + quote(segment, safe=""), None
    params = draw(
        st.dictionaries(st.sampled_from(["status", "phone", "limit", "page", "deep", "x"]), query_values, max_size=4)
    )
    return "/transactions", params


def expected_admin_400(params: dict) -> tuple[set, bool]:
    """(the query parameters API.md makes invalid, whether some other one is doubtful)."""
    bad, unsure = set(), False
    if params.get("status") not in (None, "", "pending", "completed", "failed"):
        bad.add("status")
    for name, top in (("limit", 100), ("page", 100_000)):
        raw = params.get(name)
        if raw in (None, ""):
            continue
        if raw.isdecimal() and not raw.isascii():
            unsure = True  # "١٢" is twelve to Python: leniency, not a fault
        elif not (re.fullmatch(r"[0-9]+", raw) and 1 <= int(raw) <= top):
            bad.add(name)
    return bad, unsure


@fuzz_settings(250)
@given(data=st.data())
def test_fuzz_admin_api(fuzz_server, data):
    def make():
        live = fuzz_server()
        return {"live": live, "known": list(seed(live, ["254700000000", "254700001032", "254711000003"]))}

    state = once(fuzz_server, make)
    live, known = state["live"], state["known"]
    path, params = data.draw(admin_requests(known))
    headers = data.draw(auth_headers)
    response, body = send(live, "GET", path, params=params, headers=headers)
    if route_of(live.app, "GET", path) in ("redirect", None):  # "%2F" in the id: checked in check()
        return
    status, where = response.status_code, f"GET {path} {params} {headers} -> {response.status_code} {body}"
    if headers.get("Authorization") in UNSURE_AUTH:
        assert status in (200, 400, 401, 404), where
        return
    if headers != AUTH:
        assert status == 401 and response.headers.get("WWW-Authenticate") == "Bearer", where
        return
    if params is None:
        segment = unquote(path.rsplit("/", 1)[1])
        assert status == (200 if segment in known else 404), where
        return
    bad, unsure = expected_admin_400(params)
    if bad:
        assert status == 400 and body["field"] in bad | {"phone", "limit", "page"}, where
    else:
        assert status in (200, 400), where
        if status == 400:
            assert body["field"] == "phone" or unsure, where
    if status == 200:
        assert body["total"] >= len(body["transactions"]), where


# Fuzz: health, unknown paths, methods.


@st.composite
def misc_requests(draw):
    kind = draw(st.sampled_from(["health", "health", "method", "path", "openapi", "catalog", "stats", "metrics"]))
    if kind in ("catalog", "stats"):
        return "GET", "/" + kind, draw(st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
    if kind == "metrics":
        return "GET", "/metrics", None
    if kind == "health":
        deep = draw(st.none() | st.sampled_from(["", "0", "false", "1", "true", "yes", "False"]) | st.text(max_size=6))
        return "GET", "/health", ({"deep": deep} if deep is not None else None)
    if kind == "openapi":
        return "GET", "/openapi.json", draw(st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
    if kind == "method":
        path = draw(
            st.sampled_from(
                [
                    "/stkpush",
                    "/stkpush/status",
                    "/stkpush/status/ws_CO_1",
                    "/health",
                    "/transactions",
                    "/transactions/ws_CO_1",
                    "/openapi.json",
                    "/catalog",
                    "/stats",
                    "/metrics",
                    "/tickets/TKT-1/qr.svg",
                    "/tickets/TKT-1/check-in",
                    f"/hooks/stk/{CALLBACK_TOKEN}",
                ]
            )
        )
        return draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"])), path, None
    segments = draw(
        st.lists(st.text(min_size=1, max_size=10).filter(lambda s: s not in (".", "..")), min_size=1, max_size=3)
    )
    first = draw(st.sampled_from(["stkpush", "hooks", "transactions", "tickets", "api", "health", "nope"]))
    return draw(st.sampled_from(["GET", "POST"])), "/" + "/".join([first] + [quote(s, safe="") for s in segments]), None


@fuzz_settings(150)
@given(data=st.data())
def test_fuzz_health_methods_and_unknown_paths(fuzz_server, data):
    live = once(fuzz_server, lambda: {"live": fuzz_server()})["live"]
    method, path, params = data.draw(misc_requests())
    if route_of(live.app, method, path) == "page":
        return
    headers = {}
    if path == "/metrics":
        headers = data.draw(st.sampled_from([AUTH, {}, {**AUTH, "Accept": "application/openmetrics-text"}]))
    response, body = send(live, method, path, params=params, headers=headers, json={} if method != "GET" else None)
    if response.status_code == 308:
        return
    where = f"{method} {path} {params} -> {response.status_code} {body}"
    if path == "/metrics" and method == "GET":
        assert response.status_code == (200 if headers else 401), where
    if path == "/catalog" and method == "GET":
        assert response.status_code == 200, where
        for item in body["items"]:
            assert item["capacity"] is None or 0 <= item["available"] <= item["capacity"], where
    if path == "/health" and method == "GET":
        deep = (params or {}).get("deep")
        assert response.status_code == 200, where  # the simulator is up: deep checks pass too
        assert ("daraja" in body) == (deep not in (None, "", "0", "false")), where


# Fuzz: signed checkout links.


def sign(secret: str, amount, reference, description, expires) -> str:
    """The signature the spec describes: HMAC-SHA256 of amount=…&accountReference=…&description=…&expires=…."""
    fields = {"amount": amount, "accountReference": reference, "description": description, "expires": expires}
    message = "&".join(f"{k}={'' if v is None else v}" for k, v in fields.items())
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


@st.composite
def signed_bodies(draw):
    """(body, verdict) for a shop with CHECKOUT_SECRET: set() valid, else the fields at fault."""
    amount = draw(valid_amounts())
    reference = draw(st.sampled_from(["", "CART-1", "ORDER_9"]))
    description = draw(st.sampled_from(["", "Tee", "Caf\u00e9 order"]))
    expires = draw(st.sampled_from([int(time.time()) + 3600, str(int(time.time()) + 3600)]))
    body = {
        "phone": draw(valid_phones()),
        "amount": amount,
        "accountReference": reference,
        "description": description,
        "expires": expires,
        "signature": sign(CHECKOUT_SECRET, amount, reference, description, expires),
    }
    fault = draw(st.sampled_from([None, None, "signature", "signature", "tampered", "expired", "expires"]))
    if fault == "signature":
        body["signature"] = draw(
            st.one_of(
                st.sampled_from(["", "00", "\u00e9", "\u00e9" * 64, "ZZ" * 32, None, 5, [], {}]),
                st.text(max_size=70),
                st.from_regex(r"\A[0-9a-f]{64}\Z"),
            )
        )
        return body, {"signature"}
    if fault == "tampered":
        body["amount"] = (int(amount) % MAX_AMOUNT) + 1
        return body, {"signature"}
    if fault == "expired":
        body["expires"] = int(time.time()) - draw(st.integers(1, 10**6))
        body["signature"] = sign(CHECKOUT_SECRET, amount, reference, description, body["expires"])
        return body, {"expires"}
    if fault == "expires":
        body["expires"] = draw(st.sampled_from(["soon", "", None, 1.5, "1e12", [], "\u0661\u0662"]))
        body["signature"] = sign(CHECKOUT_SECRET, amount, reference, description, body["expires"])
        return body, {"expires"}
    if draw(st.booleans()):
        body["signature"] = body["signature"].upper()  # hex in either case
    return body, set()


@fuzz_settings(100)
@given(case=signed_bodies())
def test_fuzz_signed_checkout_links(fuzz_server, case):
    live = once(fuzz_server, lambda: {"live": fuzz_server(CHECKOUT_SECRET=CHECKOUT_SECRET)})["live"]
    body, verdict = case
    response, answer = send(live, "POST", "/stkpush", json=body)
    where = f"{body} -> {response.status_code} {answer}"
    if verdict:
        assert response.status_code == 400 and answer["field"] in verdict, where
    else:
        assert response.status_code in (200, 502, 503, 504), where


# Fuzz: tickets.


@fuzz_settings(100)
@given(data=st.data())
def test_fuzz_tickets(fuzz_server, data):
    def make():
        live = fuzz_server()
        response = live.post("/stkpush", json={"phone": "254700000000", "items": [{"id": "pass", "quantity": 2}]})
        assert response.status_code == 200, response.text
        answer = settled(live, response.json()["checkoutRequestId"])
        assert answer["status"] == "completed", answer
        return {"live": live, "tickets": [t["number"] for t in answer["tickets"]], "checked": set()}

    state = once(fuzz_server, make)
    live, tickets = state["live"], state["tickets"]
    number = data.draw(
        st.sampled_from(tickets)
        | st.from_regex(r"\ATKT-[2-9A-Z]{10}\Z")
        | st.text(min_size=1, max_size=20).filter(lambda t: t not in (".", ".."))
    )
    path = "/tickets/" + quote(number, safe="")
    if data.draw(st.booleans()):
        response, body = send(live, "GET", path + "/qr.svg")
        if route_of(live.app, "GET", path + "/qr.svg") in ("redirect", None):  # "%2F": checked in check()
            return
        if number in tickets:
            assert response.status_code == 200 and response.text.lstrip().startswith("<?xml"), response.text[:80]
        else:
            assert response.status_code in (404,), body
        return
    headers = data.draw(st.sampled_from([AUTH, AUTH, {}, {"Authorization": "Bearer nope"}]))
    response, body = send(live, "POST", path + "/check-in", headers=headers)
    if route_of(live.app, "POST", path + "/check-in") in ("redirect", None):  # "%2F": checked in check()
        return
    where = f"{number!r} {headers} -> {response.status_code} {body}"
    if headers != AUTH:
        assert response.status_code == 401, where
    elif number not in tickets:
        assert response.status_code == 404, where
    elif number in state["checked"]:
        assert response.status_code == 409 and body["ticket"]["number"] == number, where
    else:
        assert response.status_code == 200 and body["ticket"]["number"] == number, where
        state["checked"].add(number)


# Answers of every kind, and one request per fault the fuzzer found.


def test_status_answers_of_every_kind_match_the_spec(fuzz_server):
    live = fuzz_server(TRANSACTION_TTL="1")
    known = seed(live, ["254700000000", "254700001032", "254711000009"])
    ids = list(known)
    time.sleep(1.1)
    kinds = set()
    for checkout_id in ids:
        body = send(live, "POST", "/stkpush/status", json={"checkoutRequestId": checkout_id})[1]
        kinds.add((body["status"], body.get("reason")))
        send(live, "GET", "/stkpush/status/" + checkout_id)
    assert kinds == {("completed", None), ("failed", "cancelled"), ("failed", "timeout")}


def test_rate_limited_answer_matches_the_spec(fuzz_server):
    live = fuzz_server(RATELIMIT_ENABLED="true", RATE_LIMIT_STATUS_PER_IP="2/minute")
    answers = [send(live, "GET", "/stkpush/status/ws_CO_nope")[0] for _ in range(3)]
    assert [a.status_code for a in answers] == [404, 404, 429]
    assert answers[-1].headers.get("Retry-After")


def test_each_example_body_of_the_push_is_one_the_server_takes(live_server):
    # The example shop (catalog.example.json) sells the items the examples name.
    examples = SPEC["paths"]["/stkpush"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert {"amount", "items"} <= set(examples)
    for name, example in examples.items():
        body = example["value"]
        assert not {"amount", "items"} <= set(body), f"example {name} has both an amount and items"
        response, answer = send(live_server, "POST", "/stkpush", json=body)
        assert response.status_code == 200 and answer["success"] is True, (name, answer)
        live_server.sim("POST", f"/simulator/prompts/{answer['checkoutRequestId']}/cancel")  # frees the phone


def test_a_locked_out_admin_answer_matches_the_spec(live_server_factory):
    live = live_server_factory(ADMIN_TOKEN=ADMIN_TOKEN, ADMIN_LOGIN_FREE_TRIES="1", ADMIN_LOGIN_DELAY="60")
    assert send(live, "GET", "/transactions", headers={"Authorization": "Bearer wrong"})[0].status_code == 401
    for method, path in [("GET", "/transactions"), ("GET", "/metrics"), ("POST", "/tickets/TKT-NOPE000000/check-in")]:
        response, body = send(live, method, path, headers=AUTH)
        assert response.status_code == 429 and response.headers["Retry-After"] == "60", body


def test_replayed_key_and_conflict_match_the_spec(fuzz_server):
    live = fuzz_server()
    headers = {"Idempotency-Key": "spec-order-1"}
    first = send(live, "POST", "/stkpush", json={"phone": "0711000111", "amount": 5}, headers=headers)
    again = send(live, "POST", "/stkpush", json={"phone": "0711000111", "amount": 5}, headers=headers)
    other = send(live, "POST", "/stkpush", json={"phone": "0711000111", "amount": 6}, headers=headers)
    assert first[1] == again[1] and again[0].headers["Idempotent-Replayed"] == "true"
    assert other[0].status_code == 409


def test_locked_subscriber_is_a_documented_502(fuzz_server):
    live = fuzz_server()
    assert send(live, "POST", "/stkpush", json={"phone": "0711000222", "amount": 5})[0].status_code == 200
    response, body = send(live, "POST", "/stkpush", json={"phone": "0711000222", "amount": 5})
    assert response.status_code == 502 and body["errorCode"] == "500.001.1001"


@pytest.mark.parametrize("path", ["/stkpush", "/stkpush/status", f"/hooks/stk/{CALLBACK_TOKEN}"])
def test_deeply_nested_json_is_a_400_not_a_500(fuzz_server, path):
    live = fuzz_server()
    # 1,001 levels are enough in production (recursion limit 1,000); pytest raises the limit.
    response, body = send(live, "POST", path, data=nested(10_000), headers={"Content-Type": "application/json"})
    assert response.status_code == 400


@pytest.mark.parametrize("query", ["limit=%C2%B2", "page=%C2%B9"])  # superscript digits: isdigit() but not int()
def test_transactions_paging_with_odd_digits_is_a_400_not_a_500(fuzz_server, query):
    live = fuzz_server()
    response, body = send(live, "GET", "/transactions?" + query, headers=AUTH)
    assert response.status_code == 400 and body["field"] in ("limit", "page")


@pytest.mark.parametrize(
    "phone",
    [
        "07\u0661\u0661\u0660\u0660\u0660\u0663\u0663\u0663",  # Arabic-Indic
        "2547\uff11\uff11\uff10\uff10\uff10\uff14\uff14\uff14",
    ],
)  # fullwidth
def test_phone_in_non_ascii_digits_is_a_400_not_sent_to_daraja(fuzz_server, phone):
    live = fuzz_server()
    response, body = send(live, "POST", "/stkpush", json={"phone": phone, "amount": 5})
    assert response.status_code == 400 and body["field"] == "phone"


def test_admin_record_is_strict_json_after_a_callback_with_nan(fuzz_server):
    live = fuzz_server()
    (checkout_id,) = seed(live, ["254711000333"])
    text = (
        '{"Body": {"stkCallback": {"MerchantRequestID": "1", "CheckoutRequestID": "' + checkout_id + '", '
        '"ResultCode": 1032, "ResultDesc": "cancelled", "Note": NaN}}}'
    )
    requests.post(
        f"{live.url}/hooks/stk/{CALLBACK_TOKEN}", data=text, headers={"Content-Type": "application/json"}, timeout=10
    )
    send(live, "GET", "/transactions/" + checkout_id, headers=AUTH)


def test_signature_with_non_ascii_characters_is_a_400_not_a_500(fuzz_server):
    live = fuzz_server(CHECKOUT_SECRET=CHECKOUT_SECRET)
    body = {"phone": "0711000444", "amount": 5, "expires": int(time.time()) + 60, "signature": "\u00e9"}
    response, answer = send(live, "POST", "/stkpush", json=body)
    assert response.status_code == 400 and answer["field"] == "signature"
