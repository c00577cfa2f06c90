"""A local Daraja: OAuth, M-Pesa Express (STK Push), STK Query and result callbacks.

The simulator is a small Flask app that answers on Daraja's own paths in Daraja's wire
format (see the Daraja reference), so a client pointed at its URL cannot tell it from the
sandbox, except that it always answers and that its "handset" is an HTTP API. The demo
mode of the payment server runs against it, and the tests use it instead of patching
`requests`.

Credentials: consumer key/secret SIM_CONSUMER_KEY / SIM_CONSUMER_SECRET, the sandbox
shortcode 174379 with the public sandbox passkey, handset PIN SIM_PIN.

How a prompt ends (the first that applies):

1. a scenario rule added through the control API (match on phone and/or amount);
2. the built-in test numbers: 25470000XXXX answers after auto_delay with ResultCode
   int(XXXX) (254700000000 pays, 254700001032 is cancelled, ...), and Safaricom's
   sandbox test number 254708374149 pays after auto_delay;
3. any other number waits for a person on the simulated handset (PIN, cancel, timeout);
   with no answer within prompt_timeout it ends with 1037.

Once the outcome is known the Daraja callback is POSTed to the push's CallBackURL.

The control API under /simulator/ is unauthenticated: this is a local test double and
must never be reachable from outside the machine or the test network.

Threads: werkzeug serves each request on its own thread and one lock guards all the
simulator's state. Timed events (automatic answers, prompt expiry, delayed callbacks)
run on one scheduler thread and callbacks are POSTed by a small worker pool, so no
request handler ever sleeps, except under the "slow" fault, whose point is to.

The rooms, each importing only those above it (and mpesa's rules, never the server):

    wire.py       Daraja's wire format: the error envelope, result descriptions, body checks
    controls.py   what the control API sets: SimulatorConfig, scenario rules, faults
    prompt.py     one prompt on the handset and its callback document
    scheduler.py  the timer thread
    engine.py     Simulator: tokens, pushes, queries, the prompt life cycle, callbacks
    app.py        the Flask app: Daraja's endpoints, the control API, fault injection
    running.py    start() on a thread, start_process() in a child process, main()
    __main__.py   python -m simulator
"""

from simulator.app import create_app, get_simulator
from simulator.controls import (
    AWAIT,
    CALLBACK_MODES,
    FAULT_ENDPOINTS,
    FAULT_MODES,
    SIM_CONSUMER_KEY,
    SIM_CONSUMER_SECRET,
    SIM_PIN,
    TUNABLE,
    Fault,
    Rule,
    SimulatorConfig,
    parse_result_code,
)
from simulator.engine import (
    MAX_CALLBACK_LOG,
    MAX_PROMPTS,
    SANDBOX_TEST_PHONE,
    STAT_NAMES,
    STATUSES,
    Simulator,
)
from simulator.prompt import Prompt
from simulator.running import RunningSimulator, SimulatorProcess, main, start, start_process
from simulator.scheduler import Scheduler
from simulator.wire import RESULT_DESCS, DarajaRefusal, result_desc

__all__ = [
    "AWAIT",
    "CALLBACK_MODES",
    "FAULT_ENDPOINTS",
    "FAULT_MODES",
    "MAX_CALLBACK_LOG",
    "MAX_PROMPTS",
    "RESULT_DESCS",
    "SANDBOX_TEST_PHONE",
    "SIM_CONSUMER_KEY",
    "SIM_CONSUMER_SECRET",
    "SIM_PIN",
    "STATUSES",
    "STAT_NAMES",
    "TUNABLE",
    "DarajaRefusal",
    "Fault",
    "Prompt",
    "Rule",
    "RunningSimulator",
    "Scheduler",
    "Simulator",
    "SimulatorConfig",
    "SimulatorProcess",
    "create_app",
    "get_simulator",
    "main",
    "parse_result_code",
    "result_desc",
    "start",
    "start_process",
]
