"""The simulator's phone network, threaded part: REST endpoints, webhook delivery, locks.

:class:`PhoneNetwork` owns every :class:`~.phone.PhoneCall` of a
:class:`~rtqueue.sim.Simulator` and two kinds of threads, all named and all
ended by :meth:`PhoneNetwork.close`:

- ``rtqueue-sim-http`` serves ``POST /v1/realtime/calls/{call_id}/accept|reject|refer|hangup``
  on 127.0.0.1 (stdlib :class:`http.server.ThreadingHTTPServer`; one
  short-lived ``rtqueue-sim-http-req`` thread per request, joined on close).
  The websockets server cannot read request bodies, hence a port of its own.
- ``rtqueue-sim-webhooks`` delivers each call's signed ``realtime.call.incoming``
  to the app's loopback URL, retrying a non-2xx answer like the real service
  (same ``webhook-id``, a fresh timestamp and signature per attempt).

Each call has its own lock; nothing blocks under it (no I/O, no waiting).
Lock order: a server connection's lock, then a call's lock, then the
registry lock ``_lock`` (a leaf). The simulator's loop drives the calls
(:meth:`drive`) and their attached sockets (:class:`CallView`).
"""

from __future__ import annotations

import heapq
import http.server
import ipaddress
import itertools
import json
import logging
import math
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs

from ..errors import InvalidArgument
from ..httpreply import ReplyHandler
from .core import SimSession
from .phone import CallerScript, CallRecord, CallTap, PhoneCall, api_error, default_sip_headers, sign_webhook

__all__ = ["CallView", "PhoneNetwork"]

log = logging.getLogger("rtqueue.sim.phone")

#: Delays (real seconds) before the 2nd, 3rd... webhook attempt; then the call goes unanswered.
WEBHOOK_RETRY_DELAYS = (0.1, 0.3, 1.0)
_WEBHOOK_TIMEOUT = 5.0  # seconds the app may take to answer one delivery
_MAX_BODY = 1 << 20
_ACTIONS = frozenset({"accept", "reject", "refer", "hangup"})
_MAX_ENDED = 10_000  # ended calls remembered (oldest forgotten first)


@attrs.define(eq=False)
class _Slot:
    call: PhoneCall
    lock: threading.Lock = attrs.Factory(threading.Lock)


@attrs.define(eq=False)
class CallView:
    """A ``?call_id=`` connection's session: the server's connection talks to it like a ``SimSession``.

    Client events go into the call's core; the call's events come out of
    :meth:`advance`. The call, not the connection, owns the core: the
    network's :meth:`PhoneNetwork.drive` advances it and wakes the
    connection. Counters are the call's (see :meth:`PhoneNetwork.core_stats`),
    so :meth:`stats` reports none, and no call is counted twice.
    """

    _slot: _Slot
    _tap: CallTap
    _wake: Callable[[], None]

    @property
    def call_id(self) -> str:
        """The call this connection is attached to."""
        return self._slot.call.call_id

    @property
    def close_request(self) -> tuple[int, str] | None:
        """``(code, reason)`` once the call has ended."""
        with self._slot.lock:
            return self._tap.close_request

    def receive(self, event: Any, now: float) -> None:
        """A client event: into the call's session (its answer comes with the next drive)."""
        with self._slot.lock:
            self._slot.call.client_event(event, now)
        self._wake()

    def receive_raw(self, frame: str | bytes, now: float) -> None:
        """A frame that was not a JSON object: the call's session answers it with an error."""
        with self._slot.lock:
            self._slot.call.client_event(None, now, raw=frame)
        self._wake()

    def advance(self, now: float) -> list[dict[str, Any]]:
        """The call's events queued for this connection, in order (the call advances in :meth:`drive`)."""
        with self._slot.lock:
            out, self._tap.queue = self._tap.queue, []
        return out

    def next_due(self) -> float | None:
        """Always ``None``: the call's driver wakes the connection when it queued something."""
        return None

    def detach(self) -> None:
        """The connection is gone."""
        with self._slot.lock:
            self._slot.call.detach(self._tap)

    def stats(self) -> dict[str, Any]:
        """No counters of its own (the call's session reports them once, whoever is attached)."""
        return {"errors": {}, "client_events": {}}

    def new_event_id(self) -> str:
        """A server event id from the call's session."""
        with self._slot.lock:
            core = self._slot.call.core
            return core.new_event_id() if core is not None else "event_" + format(random.getrandbits(80), "x")

    def make_error(self, code: str, message: str, *, type: str = "server_error",
                   param: str | None = None) -> dict[str, Any]:
        """An ``error`` event counted by the call's session (fault injection)."""
        with self._slot.lock:
            core = self._slot.call.core
            if core is not None:
                return core.make_error(code, message, type=type, param=param)
        return {"type": "error", "event_id": self.new_event_id(),
                "error": {"type": type, "code": code, "message": message, "param": param, "event_id": None}}

    def withhold_done(self, nth: int) -> None:
        """Fault injection on the call's session."""
        with self._slot.lock:
            if self._slot.call.core is not None:
                self._slot.call.core.withhold_done(nth)

    def expire_at(self, when: float) -> None:
        """Fault injection on the call's session."""
        with self._slot.lock:
            if self._slot.call.core is not None:
                self._slot.call.core.expire_at(when)


def _check_loopback_url(url: object) -> str:
    if not isinstance(url, str):
        raise InvalidArgument(f"webhook_url must be a str, not {type(url).__name__}")
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback:
        raise InvalidArgument(f"webhook_url must be an http:// URL on loopback (127.0.0.1), got {url!r}")
    return url


@attrs.define(eq=False, order=False)
class _Delivery:
    call_id: str
    url: str
    secret: str = attrs.field(repr=False)  # signs the webhook: never in a repr or log
    webhook_id: str
    body: str
    skew_s: float
    attempt: int = 0


class PhoneNetwork:
    """Calls, their REST endpoints and webhook deliveries for one simulator (see the module doc).

    ``core_factory(model, now)`` makes a call's session on accept.
    ``wake(call_id)`` asks the simulator's loop to :meth:`drive` a call soon
    (any thread); ``notify()`` tells ``Simulator.wait_until`` that something
    changed. ``api_key``, when set, is required as ``Authorization: Bearer``
    on the REST endpoints (401 otherwise).
    """

    def __init__(
        self,
        *,
        host: str,
        speed: float | None,
        seed: int,
        api_key: str | None,
        core_factory: Callable[[str, float], SimSession],
        wake: Callable[[str], None],
        notify: Callable[[], None],
    ) -> None:
        self._host = host
        self._speed = speed
        self._seed = seed
        self._api_key = api_key
        self._core_factory = core_factory
        self._wake = wake
        self._notify = notify
        self._lock = threading.Lock()  # guards the registry (a leaf lock)
        self._calls: dict[str, _Slot] = {}
        self._ended: list[str] = []
        self._numbers = itertools.count(1)
        self._ids = random.Random(f"calls|{seed}")
        # Webhook deliveries: a heap by due time, served by one thread.
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, _Delivery]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._http: _HttpServer | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the REST port on the simulator's host and start both threads."""
        self._http = _HttpServer((self._host, 0), _Handler, self)
        http_thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="rtqueue-sim-http", daemon=True)
        hooks = threading.Thread(target=self._deliver_loop, name="rtqueue-sim-webhooks", daemon=True)
        self._threads = [http_thread, hooks]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        """Stop both threads (a delivery under way ends within its timeout); end every call. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()  # joins the request threads
        for t in self._threads:
            t.join(_WEBHOOK_TIMEOUT + 1.0)
        now = time.monotonic()
        for slot in self._slots():
            with slot.lock:
                slot.call.shutdown(now)

    @property
    def http_base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        assert self._http is not None
        return f"http://{self._host}:{self._http.server_address[1]}/v1"

    def threads(self) -> list[threading.Thread]:
        """The network's own threads that are alive."""
        return [t for t in self._threads if t.is_alive()]

    # -- calls ------------------------------------------------------------------------------------------

    def place_call(
        self,
        webhook_url: str,
        *,
        secret: str,
        caller: CallerScript,
        sip_headers: Sequence[tuple[str, str]] | Mapping[str, str] | None,
        clock_skew_s: float,
    ) -> str:
        """Ring a new call and queue its webhook; returns the ``call_id``."""
        url = _check_loopback_url(webhook_url)
        if not isinstance(secret, str) or not secret:
            raise InvalidArgument("secret must be the webhook signing secret (a non-empty str, 'whsec_...')")
        if not isinstance(caller, CallerScript):
            raise InvalidArgument(f"caller must be a CallerScript, not {type(caller).__name__}")
        if isinstance(clock_skew_s, bool) or not isinstance(clock_skew_s, (int, float)) or math.isnan(clock_skew_s):
            raise InvalidArgument(f"clock_skew_s must be a number of seconds, not {clock_skew_s!r}")
        number = next(self._numbers)
        headers = _headers(sip_headers) if sip_headers is not None else default_sip_headers(number)
        with self._lock:
            call_id = "rtc_" + format(self._ids.getrandbits(128), "032x")
            webhook_id = "wh_" + format(self._ids.getrandbits(128), "032x")
            event_id = "evt_" + format(self._ids.getrandbits(96), "024x")
        now, epoch = time.monotonic(), time.time()
        call = PhoneCall(call_id=call_id, script=caller, sip_headers=headers, placed_at=now, epoch=epoch,
                         speed=self._speed, core_factory=self._core_factory, seed=self._seed + number)
        body = json.dumps({
            "object": "event",
            "id": event_id,
            "type": "realtime.call.incoming",
            "created_at": int(epoch + clock_skew_s),
            "data": {"call_id": call_id, "sip_headers": [{"name": n, "value": v} for n, v in headers]},
        })
        with self._lock:
            self._calls[call_id] = _Slot(call)
        self._queue_delivery(_Delivery(call_id, url, secret, webhook_id, body, float(clock_skew_s)), now)
        self._notify()
        return call_id

    def attach(self, call_id: str, now: float, wake: Callable[[], None]) -> CallView | None:
        """A ``?call_id=`` socket: its :class:`CallView`, or ``None`` for an unknown or ended call."""
        slot = self._slot(call_id)
        if slot is None:
            return None
        with slot.lock:
            tap = slot.call.attach(now)
        if tap is None:
            return None
        self._notify()
        return CallView(slot, tap, wake)

    def drive(self, call_id: str, now: float) -> float | None:
        """Advance a call to ``now`` (the simulator's loop); returns when it is next due."""
        slot = self._slot(call_id)
        if slot is None:
            return None
        with slot.lock:
            was = slot.call.status
            slot.call.advance(now)
            due = slot.call.next_due()
            ended = slot.call.status == "ended" and was != "ended"
        if ended:
            self._note_ended(call_id)
        return due

    def request(self, call_id: str, action: str, body: Any) -> tuple[int, dict[str, Any] | None]:
        """A REST request for a call (the HTTP thread): ``(status, json body)``."""
        slot = self._slot(call_id)
        if slot is None:
            return 404, api_error("No session found for the provided call_id", code="call_id_not_found")
        with slot.lock:
            was = slot.call.status
            status, reply = slot.call.request(action, body, time.monotonic())
            ended = slot.call.status == "ended" and was != "ended"
        if ended:
            self._note_ended(call_id)
        self._wake(call_id)
        self._notify()
        return status, reply

    def record(self, call_id: str) -> CallRecord | None:
        """A snapshot of one call, or ``None``."""
        slot = self._slot(call_id)
        if slot is None:
            return None
        with slot.lock:
            return slot.call.record()

    def records(self) -> list[CallRecord]:
        """Snapshots of every call, in the order they were placed."""
        out = []
        for slot in self._slots():
            with slot.lock:
                out.append(slot.call.record())
        return out

    def core_stats(self) -> list[dict[str, Any]]:
        """The counters of every call's session (live or ended), each counted once."""
        out = []
        for slot in self._slots():
            with slot.lock:
                stats = slot.call.stats()
            if stats is not None:
                out.append(stats)
        return out

    def _slot(self, call_id: str) -> _Slot | None:
        with self._lock:
            return self._calls.get(call_id)

    def _slots(self) -> list[_Slot]:
        with self._lock:
            return list(self._calls.values())

    def _note_ended(self, call_id: str) -> None:
        with self._lock:
            self._ended.append(call_id)
            while len(self._ended) > _MAX_ENDED:
                self._calls.pop(self._ended.pop(0), None)
        self._notify()

    # -- webhook delivery (the rtqueue-sim-webhooks thread) --------------------------------------

    def _queue_delivery(self, delivery: _Delivery, due: float) -> None:
        with self._cond:
            heapq.heappush(self._queue, (due, next(self._seq), delivery))
            self._cond.notify_all()

    def _deliver_loop(self) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only: never a proxy
        while True:
            with self._cond:
                while not self._stopping:
                    now = time.monotonic()
                    if self._queue and self._queue[0][0] <= now:
                        break
                    self._cond.wait(None if not self._queue else self._queue[0][0] - now)
                if self._stopping:
                    return
                _, _, delivery = heapq.heappop(self._queue)
            self._deliver(opener, delivery)

    def _deliver(self, opener: urllib.request.OpenerDirector, delivery: _Delivery) -> None:
        slot = self._slot(delivery.call_id)
        if slot is None:
            return
        with slot.lock:
            if slot.call.status != "ringing":
                return  # answered (or rejected) meanwhile: no more attempts
        timestamp = int(time.time() + delivery.skew_s)
        headers = sign_webhook(delivery.secret, delivery.webhook_id, timestamp, delivery.body)
        headers.update({"content-type": "application/json", "user-agent": "OpenAI/1.0 (rtqueue simulator)"})
        request = urllib.request.Request(delivery.url, data=delivery.body.encode(), headers=headers, method="POST")
        status: int | None
        try:
            with opener.open(request, timeout=_WEBHOOK_TIMEOUT) as reply:
                reply.read()
                status = reply.status
        except urllib.error.HTTPError as exc:
            status = exc.code
            exc.close()
        except (OSError, ValueError) as exc:
            log.debug("webhook %s: no answer: %s", delivery.webhook_id, exc)
            status = None
        with slot.lock:
            slot.call.webhook_attempts.append(status)
            ok = status is not None and 200 <= status < 300
            give_up = not ok and delivery.attempt >= len(WEBHOOK_RETRY_DELAYS)
            if give_up:
                slot.call.webhook_failed(time.monotonic())
        if give_up:
            self._note_ended(delivery.call_id)
        elif not ok:
            delay = WEBHOOK_RETRY_DELAYS[delivery.attempt]
            delivery.attempt += 1
            self._queue_delivery(delivery, time.monotonic() + delay)
        self._notify()

    # -- HTTP (the rtqueue-sim-http thread and its request threads) -----------------------------

    def authorized(self, header: str | None) -> tuple[int, dict[str, Any]] | None:
        """``None`` if the request may go on, else the 401 to answer."""
        if self._api_key is None:
            return None
        if not header or not header.startswith("Bearer "):
            return 401, api_error("You didn't provide an API key. Provide it in an Authorization header "
                                  "(Authorization: Bearer YOUR_KEY).", code=None)
        if header[len("Bearer "):].strip() != self._api_key:
            return 401, api_error("Incorrect API key provided.", code="invalid_api_key")
        return None


def _headers(value: Sequence[tuple[str, str]] | Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    pairs = list(value.items()) if isinstance(value, Mapping) else list(value)
    for pair in pairs:
        if (not isinstance(pair, tuple) or len(pair) != 2 or not isinstance(pair[0], str)
                or not isinstance(pair[1], str)):
            raise InvalidArgument(f"sip_headers must be (name, value) str pairs or a dict, got {pair!r}")
    return tuple(pairs)


class _HttpServer(http.server.ThreadingHTTPServer):
    """The REST port: request threads named ``rtqueue-sim-http-req`` and joined on close."""

    daemon_threads = True
    block_on_close = True

    def __init__(self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler],
                 network: PhoneNetwork) -> None:
        self.network = network
        self._joined: _JoinList = _JoinList()
        self._joined_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # ThreadingMixIn's own version names its threads "Thread-N"; ours are named.
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name="rtqueue-sim-http-req", daemon=True)
        with self._joined_lock:
            self._joined.append(thread)
        thread.start()

    def server_close(self) -> None:
        super().server_close()
        with self._joined_lock:
            threads = list(self._joined)
        for thread in threads:
            thread.join()


class _JoinList(list[threading.Thread]):
    """Request threads to join on close (finished ones are dropped as new ones come)."""

    def append(self, thread: threading.Thread) -> None:
        self[:] = [t for t in self if t.is_alive()]
        super().append(thread)


class _Handler(ReplyHandler):
    """``POST /v1/realtime/calls/{call_id}/{action}``; anything else is an OpenAI-style 404."""

    server: _HttpServer
    server_version = "rtqueue-sim"
    log_name = log.name

    def do_POST(self) -> None:
        network = self.server.network
        parts = urlsplit(self.path).path.strip("/").split("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if 0 < length <= _MAX_BODY else b""
        if len(parts) != 5 or parts[:3] != ["v1", "realtime", "calls"] or parts[4] not in _ACTIONS:
            self.reply_json(404, api_error(f"Invalid URL (POST {self.path})", code=None))
            return
        refused = network.authorized(self.headers.get("Authorization"))
        if refused is not None:
            self.reply_json(*refused)
            return
        if length > _MAX_BODY:
            self.reply_json(413, api_error("Request body too large.", code=None))
            return
        body: Any = {}
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                why = "We could not parse the JSON body of your request: it is not valid JSON."
                self.reply_json(400, api_error(why, code=None))
                return
        self.reply_json(*network.request(parts[3], parts[4], body))

    def do_GET(self) -> None:
        self.reply_json(404, api_error(f"Invalid URL (GET {self.path})", code=None))

