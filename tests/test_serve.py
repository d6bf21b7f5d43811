"""The call worker (rtqueue.serve) on the simulator's phone network: calls, capacity, drain, health, resume."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import rtqueue
from rtqueue import callstate, serve, sip
from rtqueue.sim.phone import CallerScript, hangup, pause, say, wait_for_agent
from tests.utils import UNIT

SECRET = "whsec_" + base64.b64encode(b"rtqueue-serve-webhook-secret-32b").decode()
API_KEY = "sk-test-serve-0123456789"

pytestmark = pytest.mark.timeout(120)


@rtqueue.tool
def lookup_order(order_id: str) -> dict[str, str]:
    """Look up an order by its number.

    Args:
        order_id: The order number.
    """
    return {"order": order_id, "status": "shipped"}


def make_agents(call: serve.CallInfo) -> rtqueue.Agent:
    """The desk of tests/test_sip.py: a greeter with a tool and a billing agent."""
    billing = rtqueue.Agent("billing", instructions="You are the billing agent.", description="Invoices.")
    return rtqueue.Agent("desk", instructions="You are the support desk.", tools=[lookup_order],
                         handoffs=[billing], description="Front desk.")


SCRIPT = CallerScript([wait_for_agent(), say("Please check my order 42"), wait_for_agent(),
                       say("Now billing please"), wait_for_agent(), hangup()])


@pytest.fixture
def phone() -> Iterator[rtqueue.Simulator]:
    """A simulator 10x faster than real time."""
    with rtqueue.Simulator(speed=10.0, seed=5) as sim:
        yield sim


def new_worker(phone: rtqueue.Simulator, **kwargs: Any) -> serve.CallWorker:
    """A worker on the simulator with its loopback HTTP endpoint."""
    worker = serve.CallWorker(make_agents, realtime_url=phone.url, control_base_url=phone.http_base_url,
                              api_key=API_KEY, webhook_secret=SECRET, **kwargs)
    worker.serve_http()
    return worker


def get_json(url: str) -> tuple[int, Any]:
    """GET a loopback URL (no proxy): status and JSON body."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=UNIT) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def ended(phone: rtqueue.Simulator, ids: list[str]) -> bool:
    """Whether every call in ``ids`` has ended."""
    return phone.wait_until(lambda s: all(s.call(c).status == "ended" for c in ids), timeout=3 * UNIT)


def test_worker_hosts_calls_to_the_end(phone: rtqueue.Simulator):
    """Three calls through the webhook: accepted, tool and handoff, hung up by the caller; figures add up."""
    worker = new_worker(phone, capacity=4, name="w1")
    try:
        ids = [phone.place_call(worker.serve_http().webhook_url, secret=SECRET, caller=SCRIPT) for _ in range(3)]
        assert ended(phone, ids)
        assert worker.drain(UNIT)
        for record in (phone.call(c) for c in ids):
            assert record.ended_by == "caller" and record.script_done, record
            agent_lines = record.said("agent")
            assert any("shipped" in line for line in agent_lines), agent_lines
            assert any(line.startswith("This is the billing agent") for line in agent_lines), agent_lines
        load = worker.load()
        assert (load.done, load.failed, load.active, load.rejected) == (3, 0, 0, 0)
        stats = worker.stats()
        assert stats["intents"]["lost"] == 0 and stats["intents"]["fulfilled"] >= 3 * 3
        assert len(stats["attach_ms"]) == 3
        assert phone.stats()["conflicts"] == 0
    finally:
        worker.close()
    assert worker.threads() == []


def test_over_capacity_is_rejected_busy(phone: rtqueue.Simulator):
    """With capacity 1, a second call while the first is up is rejected 486 Busy Here."""
    worker = new_worker(phone, capacity=1, name="small")
    try:
        url = worker.serve_http().webhook_url
        first = phone.place_call(url, secret=SECRET, caller=CallerScript([wait_for_agent(), pause(3), hangup()]))
        assert phone.wait_until(lambda s: s.call(first).status == "active", timeout=UNIT)
        second = phone.place_call(url, secret=SECRET, caller=SCRIPT)
        assert phone.wait_until(lambda s: s.call(second).status == "ended", timeout=UNIT)
        record = phone.call(second)
        assert record.ended_by == "reject" and record.reject_status == callstate.BUSY
        assert ended(phone, [first]) and phone.call(first).ended_by == "caller"
        assert worker.load().rejected == 1
    finally:
        worker.close()


def test_drain_refuses_new_calls_and_finishes_old_ones(phone: rtqueue.Simulator):
    """drain(): /healthz turns 503, a new call is rejected 503, the call under way runs to its hang-up."""
    worker = new_worker(phone, capacity=4, name="draining")
    http = worker.serve_http()
    try:
        status, body = get_json(http.url + "/healthz")
        assert status == 200 and body["ok"]
        first = phone.place_call(http.webhook_url, secret=SECRET, caller=SCRIPT)
        assert phone.wait_until(lambda s: s.call(first).status == "active", timeout=UNIT)
        drained = threading.Event()
        drainer = threading.Thread(target=lambda: drained.set() if worker.drain(3 * UNIT) else None,
                                   name="rtqueue-test-drain")
        drainer.start()
        status, body = get_json(http.url + "/healthz")
        assert status == 503 and body["draining"]
        late = phone.place_call(http.webhook_url, secret=SECRET, caller=SCRIPT)
        assert phone.wait_until(lambda s: s.call(late).status == "ended", timeout=UNIT)
        assert phone.call(late).reject_status == callstate.UNAVAILABLE
        drainer.join(3 * UNIT)
        assert drained.is_set()
        assert phone.call(first).ended_by == "caller" and phone.call(first).script_done
        status, load = get_json(http.url + "/load")
        assert status == 200 and load["done"] == 1 and load["active"] == 0 and load["capacity"] == 4
        assert load["cpu_s"] > 0 and load["rss_mb"] > 0
    finally:
        worker.close()
    assert worker.threads() == []


def test_bad_signature_is_400(phone: rtqueue.Simulator):
    """A delivery signed with another secret is answered 400 and takes no slot."""
    worker = new_worker(phone, name="strict")
    try:
        other = "whsec_" + base64.b64encode(b"some-other-secret-of-32-bytes!!!").decode()
        call_id = phone.place_call(worker.serve_http().webhook_url, secret=other)
        assert phone.wait_until(lambda s: s.call(call_id).status == "ended", timeout=UNIT)
        assert set(phone.call(call_id).webhook_attempts) == {400}
        assert worker.load().active == 0
    finally:
        worker.close()


def test_a_closed_worker_leaves_the_call_up_and_another_resumes_it(phone: rtqueue.Simulator):
    """Worker A detaches mid-call; worker B resumes from A's checkpoint as the agent that was speaking."""
    store = serve.MemoryCheckpointStore()
    a = new_worker(phone, name="a", store=store)
    b = new_worker(phone, name="b", store=store)
    try:
        script = CallerScript([wait_for_agent(), say("Now billing please"), wait_for_agent(), pause(2),
                               say("Please check my order 42"), wait_for_agent(), hangup()])
        call_id = phone.place_call(a.serve_http().webhook_url, secret=SECRET, caller=script)
        assert phone.wait_until(lambda s: any(line.startswith("This is the billing agent")
                                              for line in s.call(call_id).said("agent")), timeout=UNIT)
        cp = store.get(call_id)
        assert cp is not None and cp.agent == "billing" and cp.items
        a.close()  # like a dead worker: the socket goes, the call stays up
        assert phone.call(call_id).status == "active"
        ok, _status, _why = b.resume_call(call_id)
        assert ok
        assert ended(phone, [call_id])
        record = phone.call(call_id)
        assert record.ended_by == "caller" and record.script_done and record.attachments == 2
        assert b.drain(UNIT) and b.load().resumed == 1 and b.stats()["intents"]["lost"] == 0
        assert phone.stats()["conflicts"] == 0
        assert store.get(call_id) is None  # the call ended: its checkpoint is gone
    finally:
        a.close()
        b.close()


def test_checkpoint_values_and_placement():
    """Checkpoints round-trip as dicts, pending tools come from items; least-loaded placement; admission."""
    items = [{"id": "i1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
             {"id": "i2", "type": "function_call", "call_id": "c1", "name": "lookup_order", "arguments": "{}"},
             {"id": "i3", "type": "function_call", "call_id": "c2", "name": "transfer_to_billing", "arguments": ""},
             {"id": "i4", "type": "function_call_output", "call_id": "c1", "output": "ok"}]
    cp = callstate.make_checkpoint("rtc_1", agent="desk", carried=items[:2], items=items[1:], seq=3,
                                   responses_pending=("turn",), now=1.0, worker="w", attach_count=1, greeted=True)
    assert [i["id"] for i in cp.items] == ["i1", "i2", "i3", "i4"]
    assert cp.tools_pending == (callstate.PendingTool("c2", "transfer_to_billing", "", "i3"),)
    assert callstate.Checkpoint.from_dict(json.loads(json.dumps(cp.to_dict()))) == cp
    plan = callstate.resume_plan(cp, {"transfer_to_billing": "billing"})
    assert plan.agent == "billing" and plan.probe_item == "i4" and plan.respond and plan.reissued == 2
    loads = [callstate.WorkerLoad("a", 3, 4), callstate.WorkerLoad("b", 1, 4),
             callstate.WorkerLoad("c", 0, 4, draining=True), callstate.WorkerLoad("d", 0, 4, alive=False)]
    assert callstate.choose_worker(loads) == "b"
    assert callstate.choose_worker(loads, exclude=["b"]) == "a"
    assert callstate.choose_worker([callstate.WorkerLoad("a", 4, 4)]) is None
    assert callstate.admit(4, 4, draining=False).status == callstate.BUSY
    assert callstate.admit(0, 4, draining=True).status == callstate.UNAVAILABLE
    assert callstate.admit(3, 4, draining=False).ok
    store = serve.MemoryCheckpointStore()
    store.put(cp)
    store.put(attrs_evolve(cp, seq=2))
    assert store.get("rtc_1") == cp  # an older checkpoint never replaces a newer one


def attrs_evolve(cp: callstate.Checkpoint, **changes: Any) -> callstate.Checkpoint:
    """A copy of ``cp`` with ``changes``."""
    import attrs

    return attrs.evolve(cp, **changes)


def test_load_app_names_errors():
    """load_app imports module:function and refuses malformed or missing names clearly."""
    assert serve.load_app("tests.test_serve:make_agents").__qualname__ == "make_agents"
    for bad in ("nocolon", "tests.test_serve:nope", "no_such_module_xyz:f"):
        with pytest.raises(rtqueue.InvalidArgument):
            serve.load_app(bad)


def test_sip_control_is_shared_per_worker(phone: rtqueue.Simulator):
    """The worker's CallControl points at the simulator and is closed with the worker."""
    worker = new_worker(phone, name="ctl")
    assert isinstance(worker.control, sip.CallControl) and worker.control.base_url == phone.http_base_url
    worker.close()
    worker.close()  # idempotent
