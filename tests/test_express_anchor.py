"""The polling benchmark's Express anchor (bench/express/server.js, one Node process) answers a
status poll with the JSON text the payment server gives for the same payment, completed or pending
(byte for byte; Flask ends its body with a newline, Express does not).

Runs where `node` is installed; `npm ci` installs bench/express/'s pinned packages when they are
missing (as `make bench` does), and the test is skipped, saying why, when that fails.
"""

from __future__ import annotations

import shutil

import pytest
import requests

from bench.harness import Context, express_ready, start_express
from tests.helpers import PAID, WAITING, poll, started

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: no Express anchor to run")


def test_the_express_anchor_answers_a_poll_as_the_server_does(live_server):
    polls = {
        "completed": {"checkoutRequestId": started(live_server, PAID)},
        "pending": {"checkoutRequestId": started(live_server, WAITING)},
    }
    poll(live_server, polls["completed"]["checkoutRequestId"])
    ours = {kind: live_server.post("/stkpush/status", json=body) for kind, body in polls.items()}
    assert {kind: answer.json()["status"] for kind, answer in ours.items()} == {
        "completed": "completed",
        "pending": "pending",
    }

    with Context() as ctx:
        problem = express_ready(ctx)
        if problem:
            pytest.skip(f"the Express anchor's packages could not be installed: {problem}")
        express = start_express(ctx, {body["checkoutRequestId"]: ours[kind].json() for kind, body in polls.items()})
        for kind, body in polls.items():
            answer = requests.post(express.url + "/stkpush/status", json=body, timeout=10)
            assert answer.status_code == 200, kind
            assert answer.headers["Content-Type"].startswith("application/json"), kind
            assert answer.text.strip() == ours[kind].text.strip(), kind  # the same JSON text, byte for byte
        unknown = requests.post(express.url + "/stkpush/status", json={"checkoutRequestId": "ws_CO_0"}, timeout=10)
        assert unknown.status_code == 404
