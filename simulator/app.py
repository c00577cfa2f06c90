"""The simulator's HTTP face: Daraja's endpoints, the control API under /simulator/, and fault
injection, on one small Flask app.

The views are thin: each hands its JSON to the Simulator in app.extensions["simulator"] and
returns its answer. Errors keep each side's shape: a DarajaRefusal is Daraja's error envelope,
and an HTTP error is {"error": ...} under /simulator/ but Daraja's own 404 or 405 elsewhere.
An armed fault answers before the view runs, except "slow": the request is handled at once and
its answer held back (a slow push's prompt reaches the phone while its caller still waits, as
when Daraja's answer is lost on the way), listed meanwhile by GET /simulator/held.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flask import Blueprint, Flask, current_app, g, jsonify, request
from werkzeug.exceptions import BadRequest, HTTPException

from mpesa import mask_phones
from simulator.controls import SimulatorConfig, parse_result_code
from simulator.engine import Simulator
from simulator.wire import DarajaRefusal, invalid

log = logging.getLogger(__name__)

daraja = Blueprint("daraja", __name__)
control = Blueprint("control", __name__, url_prefix="/simulator")
_FAULTABLE = {"daraja.oauth": "oauth", "daraja.stkpush": "stkpush", "daraja.query": "query"}
_APIGEE_SPIKE_ARREST = {
    "fault": {
        "faultstring": "Spike arrest violation. Allowed rate : MessageRate{messagesPerPeriod=5, "
        "periodInMicroseconds=1000000, maxBurstMessageCount=1.0}",
        "detail": {"errorcode": "policies.ratelimit.SpikeArrestViolation"},
    }
}
_HTML_503 = (
    "<html><head><title>503 Service Unavailable</title></head><body>"
    "<h1>Service Unavailable</h1><p>The server is temporarily unable to service your request."
    "</p></body></html>"
)


def get_simulator() -> Simulator:
    """The Simulator behind the current app."""
    return current_app.extensions["simulator"]


def _json_body() -> dict:
    """The JSON object a Daraja call carries; Daraja reads anything else as a bad request."""
    if request.mimetype != "application/json":
        # A form-encoded body reads as one without fields, and the first one checked is missing.
        raise invalid("BusinessShortCode")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise DarajaRefusal("400.002.05", "Invalid Request Payload")
    return body


def _control_body() -> dict:
    body = request.get_json(silent=True)
    if body is None and not request.get_data():
        return {}
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object")
    return body


def _fault_response(mode: str):
    if mode == "http500":
        return DarajaRefusal("500.003.1001", "Internal Server Error").response()
    if mode == "http503_html":
        return _HTML_503, 503, {"Content-Type": "text/html; charset=utf-8"}
    if mode == "garbage":
        return '{"ResponseCode": "0", "Respon', 200, {"Content-Type": "application/json"}
    if mode == "rate_limit":
        return DarajaRefusal("500.003.02", "Error Occurred: Spike Arrest Violation").response()
    if mode == "quota":
        return DarajaRefusal("500.003.03", "Quota Violation").response()
    if mode == "http429":
        return jsonify(_APIGEE_SPIKE_ARREST), 429, {"Retry-After": "1"}
    return DarajaRefusal("404.001.03", "Invalid Access Token").response()


@daraja.before_request
def inject_fault():
    endpoint = _FAULTABLE.get(request.endpoint)
    fault = get_simulator().take_fault(endpoint) if endpoint else None
    if fault is None:
        return None
    log.info("simulator: injecting fault %s on %s", fault.mode, endpoint)
    if fault.mode == "slow":
        g.hold = fault.delay  # hold_answer holds the answer once it is made
        return None
    return _fault_response(fault.mode)


@daraja.after_request
def hold_answer(response):
    """The slow fault: the answer, already made, reaches its caller `delay` seconds late."""
    delay = g.get("hold")
    if delay is None:
        return response
    caller = {"address": request.remote_addr, "port": request.environ.get("REMOTE_PORT")}
    with get_simulator().holding(_FAULTABLE[request.endpoint], caller, g.get("checkout_id"), delay):
        time.sleep(delay)  # the point of this fault: the answer comes late
    return response


@daraja.after_request
def count_calls(response):
    if request.endpoint == "daraja.stkpush" and not g.get("push_accepted"):
        get_simulator().count("pushes_rejected")
    elif request.endpoint == "daraja.query":
        get_simulator().count("queries")
    return response


@daraja.get("/oauth/v1/generate")
def oauth():
    if request.args.get("grant_type") != "client_credentials":
        raise DarajaRefusal("400.008.02", "Invalid grant type passed")
    token, ttl = get_simulator().issue_token(request.authorization)
    return jsonify(access_token=token, expires_in=str(ttl))


@daraja.post("/mpesa/stkpush/v1/processrequest")
def stkpush():
    simulator = get_simulator()
    simulator.check_token(request.headers.get("Authorization"))
    ack = simulator.push(_json_body())
    g.push_accepted = True
    g.checkout_id = ack["CheckoutRequestID"]
    return jsonify(ack)


@daraja.post("/mpesa/stkpushquery/v1/query")
def query():
    simulator = get_simulator()
    simulator.check_token(request.headers.get("Authorization"))
    return jsonify(simulator.query(_json_body()))


@control.get("/health")
def health():
    return {"status": "ok"}


@control.get("/prompts")
def list_prompts():
    prompts = get_simulator().list_prompts(request.args.get("phone"), request.args.get("status"))
    return {"prompts": prompts}


@control.get("/prompts/<checkout_id>")
def get_prompt(checkout_id):
    return get_simulator().get_prompt(checkout_id)


@control.post("/prompts/<checkout_id>/pin")
def enter_pin(checkout_id):
    pin = _control_body().get("pin")
    if pin is None:
        raise BadRequest("pin is required")
    return get_simulator().enter_pin(checkout_id, pin)


@control.post("/prompts/<checkout_id>/cancel")
def cancel_prompt(checkout_id):
    return get_simulator().finish(checkout_id, 1032)


@control.post("/prompts/<checkout_id>/timeout")
def time_out_prompt(checkout_id):
    return get_simulator().finish(checkout_id, 1037)


@control.post("/prompts/<checkout_id>/resolve")
def resolve_prompt(checkout_id):
    body = _control_body()
    if "resultCode" not in body:
        raise BadRequest("resultCode is required")
    return get_simulator().finish(checkout_id, parse_result_code(body["resultCode"]))


@control.post("/scenarios")
def add_scenario():
    return get_simulator().add_rule(_control_body()), 201


@control.get("/scenarios")
def list_scenarios():
    return {"scenarios": get_simulator().list_rules()}


@control.delete("/scenarios")
def clear_scenarios():
    return {"cleared": get_simulator().clear_rules()}


@control.post("/faults")
def add_fault():
    return get_simulator().add_fault(_control_body()), 201


@control.get("/faults")
def list_faults():
    return {"faults": get_simulator().list_faults()}


@control.delete("/faults")
def clear_faults():
    return {"cleared": get_simulator().clear_faults()}


@control.post("/tokens/revoke")
def revoke_tokens():
    return {"revoked": get_simulator().revoke_tokens()}


@control.get("/config")
def show_config():
    return get_simulator().public_config()


@control.patch("/config")
def change_config():
    return get_simulator().update_config(_control_body())


@control.get("/held")
def held_answers():
    return {"held": get_simulator().list_held()}


@control.get("/stats")
def stats():
    return get_simulator().get_stats()


@control.get("/callbacks")
def callbacks():
    return {"callbacks": get_simulator().list_callbacks()}


@control.post("/reset")
def reset():
    get_simulator().reset()
    return {"status": "reset"}


def _daraja_refusal(error: DarajaRefusal):
    log.info("simulator: %s %s refused: %s %s", request.method, mask_phones(request.path), error.code, error.message)
    return error.response()


def _http_error(error: HTTPException):
    """Control API errors as {"error": ...}; unknown Daraja paths and methods as Daraja answers them."""
    if request.path.startswith("/simulator/"):
        return jsonify(error=error.description), error.code
    if error.code == 404:
        return DarajaRefusal("404.001.01", "Resource not found").response()
    if error.code == 405:
        return DarajaRefusal("405.001", "Method Not Allowed").response()
    return error


def create_app(config: SimulatorConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> Flask:
    """The simulator's WSGI app; its state is app.extensions["simulator"]."""
    app = Flask(__name__)
    app.json.sort_keys = False  # keep Daraja's field order
    app.extensions["simulator"] = Simulator(config, clock)
    app.register_blueprint(daraja)
    app.register_blueprint(control)
    app.register_error_handler(DarajaRefusal, _daraja_refusal)
    app.register_error_handler(HTTPException, _http_error)
    return app
