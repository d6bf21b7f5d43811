"""SIP calls spread over a Ray cluster: a Serve ingress places each call on a call-worker actor.

``pip install 'rtqueue[ray]'``. The pieces::

    OpenAI --webhook--> Serve ingress (CallRouter, one replica, HTTP on the head node)
                          verify -> least-loaded worker with a free slot (rtqueue.callstate.choose_worker)
                          none free: CallControl.reject(call_id, 486)
        WorkerActor x N (several per node, threaded actors): each a rtqueue.serve.CallWorker
                          hosting many calls in threads, checkpointing every turn into
        CheckpointKeeper  (a detached, named actor)

- **Failover.** For every call it placed, the router holds the worker's
  ``wait_call`` reference; a worker that dies fails them with
  ``RayActorError`` at once. The router then places each of that worker's
  calls on another worker with :meth:`CallWorker.resume_call`: it re-attaches
  with ``?call_id=`` (the SIP call stays up on the service while no socket is
  attached), as the agent that was speaking, answers tool calls and handoffs
  the dead worker left open, and asks for one response. The time from the
  death being noticed to the new socket attached is kept per call
  (``CallRouter.stats()["reattach_ms"]``).
- **Why an actor for checkpoints, not the object store.** A checkpoint
  changes at every turn; object-store objects are immutable and, in Ray's
  ownership model, owned by the process that ``ray.put`` them: when a worker
  dies, the objects it owns are lost with it, exactly the ones needed. A
  detached actor (``lifetime="detached"``, zero CPUs, on the head node by
  default) outlives any worker; workers send it each checkpoint without
  waiting (``put.remote``; calls from one worker run in order), a resuming
  worker reads it with one ``get``. It keeps state in memory: losing the head
  node loses it (as it loses the GCS and the ingress); back it with Redis or
  a database behind the same :class:`~rtqueue.serve.CheckpointStore`
  interface if that matters.

Ray is imported lazily: importing this module without it works, using it
raises :class:`~rtqueue.errors.RtqueueError` saying what to install.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from .callstate import BUSY, Checkpoint, WorkerLoad, choose_worker
from .errors import InvalidArgument, RtqueueError, WebhookVerificationError
from .serve import CallWorker, load_app
from .sip import CallControl, IncomingCall, SipHeader, verify_webhook

__all__ = [
    "CallRouter",
    "CheckpointKeeper",
    "RayCheckpointStore",
    "WorkerActor",
    "deploy",
    "ray_module",
    "shutdown",
]

log = logging.getLogger("rtqueue.ray")

#: Name and namespace of the checkpoint actor and the worker actors.
NAMESPACE = "rtqueue"
KEEPER_NAME = "rtqueue-checkpoints"


def ray_module() -> Any:
    """The ``ray`` module, imported on first use (it is the ``ray`` extra)."""
    try:
        import ray
    except ImportError as exc:
        raise RtqueueError("rtqueue.ray_serve needs Ray: pip install 'rtqueue[ray]' (ray[serve]>=2.9)") from exc
    return ray


# -- checkpoints in Ray ---------------------------------------------------------------------------


class CheckpointKeeper:
    """The checkpoints of every call, by call id (made a Ray actor by :func:`deploy`; plain class here)."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Any]] = {}
        self.puts = 0

    def put(self, checkpoint: dict[str, Any]) -> None:
        """Keep ``checkpoint`` (a :meth:`Checkpoint.to_dict`) unless a newer one of its call is kept."""
        self.puts += 1
        old = self._data.get(checkpoint["call_id"])
        if old is None or checkpoint["seq"] >= old["seq"]:
            self._data[checkpoint["call_id"]] = checkpoint

    def get(self, call_id: str) -> dict[str, Any] | None:
        """The latest checkpoint of ``call_id``, or ``None``."""
        return self._data.get(call_id)

    def delete(self, call_id: str) -> None:
        """Forget ``call_id``."""
        self._data.pop(call_id, None)

    def stats(self) -> dict[str, int]:
        """Calls held and puts received."""
        return {"calls": len(self._data), "puts": self.puts}


class RayCheckpointStore:
    """A :class:`~rtqueue.serve.CheckpointStore` over a :class:`CheckpointKeeper` actor handle."""

    def __init__(self, keeper: Any, *, timeout: float = 10.0) -> None:
        self._keeper = keeper
        self._timeout = timeout

    def put(self, checkpoint: Checkpoint) -> None:
        """Send the checkpoint without waiting (one worker's puts arrive in order)."""
        self._keeper.put.remote(checkpoint.to_dict())

    def get(self, call_id: str) -> Checkpoint | None:
        """The latest checkpoint (one round trip to the keeper)."""
        data = ray_module().get(self._keeper.get.remote(call_id), timeout=self._timeout)
        return Checkpoint.from_dict(data) if data is not None else None

    def delete(self, call_id: str) -> None:
        """Forget the call (without waiting)."""
        self._keeper.delete.remote(call_id)


# -- the worker actor --------------------------------------------------------------------------------


def _incoming_to_dict(call: IncomingCall) -> dict[str, Any]:
    return {"call_id": call.call_id, "sip_headers": [[h.name, h.value] for h in call.sip_headers],
            "event_id": call.event_id, "webhook_id": call.webhook_id, "created_at": call.created_at,
            "data": json.loads(json.dumps(dict(call.data)))}


def _incoming_from_dict(d: Mapping[str, Any]) -> IncomingCall:
    import types

    return IncomingCall(call_id=d["call_id"], sip_headers=tuple(SipHeader(n, v) for n, v in d["sip_headers"]),
                        event_id=d["event_id"], webhook_id=d["webhook_id"], created_at=d["created_at"],
                        data=types.MappingProxyType(dict(d["data"])))


class WorkerActor:
    """A :class:`~rtqueue.serve.CallWorker` inside a Ray actor (made remote by :func:`deploy`).

    ``app`` is a ``"module:function"`` spec (imported in the actor's process).
    Must run as a threaded actor (``max_concurrency`` above twice the
    capacity): ``wait_call`` blocks for a call's whole life.
    """

    def __init__(self, app: str, *, name: str, capacity: int, realtime_url: str | None,
                 control_base_url: str | None, api_key: str | None, keeper: Any) -> None:
        self.worker = CallWorker(load_app(app), realtime_url=realtime_url, control_base_url=control_base_url,
                                 api_key=api_key, capacity=capacity, name=name, store=RayCheckpointStore(keeper))

    def take(self, incoming: dict[str, Any]) -> tuple[bool, int | None, str]:
        """Host a verified call (see :meth:`CallWorker.take_call`)."""
        return self.worker.take_call(_incoming_from_dict(incoming))

    def resume(self, call_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """Resume ``call_id`` from its checkpoint; waits until attached. ``{"ok", "status", "reason", ...}``."""
        ok, status, reason = self.worker.resume_call(call_id)
        out: dict[str, Any] = {"ok": ok, "status": status, "reason": reason}
        if ok:
            out.update(self.worker.wait_attached(call_id, timeout) or {})
        return out

    def wait_call(self, call_id: str) -> dict[str, Any] | None:
        """Block until the call ends here; its summary."""
        return self.worker.wait_call(call_id)

    def load(self) -> dict[str, Any]:
        """:meth:`CallWorker.load` as a dict."""
        return self.worker.load().to_dict()

    def stats(self) -> dict[str, Any]:
        """:meth:`CallWorker.stats`."""
        return self.worker.stats()

    def drain(self, timeout: float | None = None) -> bool:
        """:meth:`CallWorker.drain`."""
        return self.worker.drain(timeout)

    def close(self) -> None:
        """:meth:`CallWorker.close`."""
        self.worker.close()

    def pid(self) -> int:
        """The actor's process id."""
        import os

        return os.getpid()


# -- the router (Serve ingress) -------------------------------------------------------------------------


class CallRouter:
    """The Serve ingress: ``POST /sip`` (``realtime.call.incoming``), ``GET /stats``.

    Holds the placement state (one replica: the calls it placed and where).
    Its monitor thread ``rtqueue-ray-monitor`` notices ended calls and dead
    workers (see the module doc); :meth:`shutdown` ends it.
    """

    def __init__(self, workers: list[str], *, webhook_secret: str, control_base_url: str | None,
                 api_key: str | None, namespace: str = NAMESPACE) -> None:
        ray = ray_module()
        self._ray = ray
        self._secret = webhook_secret
        self._control = CallControl(api_key=api_key, base_url=control_base_url)
        self._handles = {n: ray.get_actor(n, namespace=namespace) for n in workers}
        loads = ray.get([h.load.remote() for h in self._handles.values()])
        self._capacity = {n: int(ld["capacity"]) for n, ld in zip(self._handles, loads, strict=True)}
        self._lock = threading.Lock()
        self._where: dict[str, str] = {}  # call id -> worker name
        self._refs: dict[Any, tuple[str, str]] = {}  # wait_call ref -> (call id, worker)
        self._dead: set[str] = set()
        self._placed = 0
        self._rejected = 0
        self._finished: list[dict[str, Any]] = []
        self._reattach: list[dict[str, Any]] = []
        self._webhook_ms: list[float] = []
        self._stop = threading.Event()
        self._wake = threading.Condition(self._lock)
        # Failovers run side by side: a dead worker's calls are resumed at once, not one after another.
        self._failovers = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="rtqueue-ray-failover")
        self._monitor = threading.Thread(target=self._watch, name="rtqueue-ray-monitor", daemon=True)
        self._monitor.start()

    def _loads(self) -> list[WorkerLoad]:
        active: dict[str, int] = {n: 0 for n in self._handles}
        for w in self._where.values():
            active[w] = active.get(w, 0) + 1
        return [WorkerLoad(n, active[n], self._capacity[n], alive=n not in self._dead) for n in self._handles]

    async def __call__(self, request: Any) -> Any:
        """Serve's HTTP entry point (a Starlette request)."""
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith("/stats"):
            return JSONResponse(self.stats())
        if request.method != "POST" or not path.endswith("/sip"):
            return JSONResponse({"error": "not found"}, status_code=404)
        t0 = time.monotonic()
        body = await request.body()
        try:
            incoming = verify_webhook(body, dict(request.headers), self._secret)
        except WebhookVerificationError as exc:
            return JSONResponse({"error": f"webhook rejected ({exc.reason})"}, status_code=400)
        result = await self.place(incoming)
        with self._lock:
            self._webhook_ms.append((time.monotonic() - t0) * 1000)
        return JSONResponse(result)

    async def place(self, incoming: IncomingCall) -> dict[str, Any]:
        """Put the call on the least-loaded worker that takes it; none: reject it 486."""
        tried: set[str] = set()
        payload = _incoming_to_dict(incoming)
        while True:
            with self._lock:
                if incoming.call_id in self._where:
                    return {"result": "already placed", "worker": self._where[incoming.call_id]}
                name = choose_worker(self._loads(), exclude=tried)
                if name is not None:
                    self._where[incoming.call_id] = name  # hold the slot while asking
            if name is None:
                break
            tried.add(name)
            try:
                ok, _status, _why = await self._handles[name].take.remote(payload)
            except self._ray.exceptions.RayActorError:
                ok = False
                with self._lock:
                    self._dead.add(name)
            with self._lock:
                if ok:
                    self._placed += 1
                    self._refs[self._handles[name].wait_call.remote(incoming.call_id)] = (incoming.call_id, name)
                    self._wake.notify_all()
                    return {"result": "placed", "worker": name}
                self._where.pop(incoming.call_id, None)
        with self._lock:
            self._rejected += 1
        await asyncio.get_running_loop().run_in_executor(None, self._reject, incoming.call_id)
        return {"result": "rejected", "status": BUSY}

    def _reject(self, call_id: str) -> None:
        try:
            self._control.reject(call_id, status_code=BUSY)
        except RtqueueError as exc:
            log.warning("reject %s failed: %s", call_id, exc)

    # -- the monitor thread ----------------------------------------------------------------------

    def _watch(self) -> None:
        ray = self._ray
        while not self._stop.is_set():
            with self._lock:
                while not self._refs and not self._stop.is_set():
                    self._wake.wait()
                refs = list(self._refs)
            if self._stop.is_set():
                return
            # A bounded wait: calls placed meanwhile join the next round.
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.2)
            for ref in ready:
                with self._lock:
                    call_id, worker = self._refs.pop(ref)
                try:
                    summary = ray.get(ref)
                except ray.exceptions.RayActorError:
                    with self._lock:
                        self._dead.add(worker)  # before any placement decision sees it alive
                    self._failovers.submit(self._failover, call_id, worker)
                    continue
                with self._lock:
                    if self._where.get(call_id) == worker:
                        del self._where[call_id]
                    self._finished.append({"call_id": call_id, "worker": worker, **(summary or {})})

    def _failover(self, call_id: str, dead: str) -> None:
        """``dead`` died hosting ``call_id``: resume it on another worker."""
        noticed, noticed_wall = time.monotonic(), time.time()
        with self._lock:
            self._dead.add(dead)
            self._where.pop(call_id, None)
        tried: set[str] = set()
        while True:
            with self._lock:
                name = choose_worker(self._loads(), exclude=tried)
                if name is not None:
                    self._where[call_id] = name
            if name is None:
                log.error("no worker can resume %s", call_id)
                with self._lock:
                    self._reattach.append({"call_id": call_id, "from": dead, "to": None, "ok": False})
                return
            tried.add(name)
            try:
                out = self._ray.get(self._handles[name].resume.remote(call_id))
            except self._ray.exceptions.RayActorError:
                out = {"ok": False}
                with self._lock:
                    self._dead.add(name)
            with self._lock:
                if out.get("ok") and "attached_at" in out:
                    self._refs[self._handles[name].wait_call.remote(call_id)] = (call_id, name)
                    self._reattach.append({
                        "call_id": call_id, "from": dead, "to": name, "ok": True,
                        "reattach_ms": (time.monotonic() - noticed) * 1000,
                        "noticed_at": noticed_wall, "attached_at": out["attached_at"],
                    })
                    return
                self._where.pop(call_id, None)
                if out.get("ok"):  # taken, but over before it attached: the call had ended
                    self._reattach.append({"call_id": call_id, "from": dead, "to": name, "ok": True,
                                           "reattach_ms": None, "ended": True})
                    return

    def stats(self) -> dict[str, Any]:
        """Placed, rejected, finished call summaries, re-attaches, dead workers, webhook handling times."""
        with self._lock:
            return {
                "placed": self._placed, "rejected": self._rejected, "active": dict(self._where),
                "finished": list(self._finished), "reattach": list(self._reattach), "dead": sorted(self._dead),
                "webhook_ms": list(self._webhook_ms),
                "loads": [w.to_dict() for w in self._loads()],
            }

    def shutdown(self) -> None:
        """Stop the monitor thread and close call control."""
        with self._lock:
            self._stop.set()
            self._wake.notify_all()
        self._monitor.join(5.0)
        self._failovers.shutdown(wait=True)
        self._control.close()

    def __del__(self) -> None:  # Serve calls no hook on teardown; the thread is a daemon anyway
        self._stop.set()


# -- deployment ------------------------------------------------------------------------------------------


def deploy(
    app: str,
    *,
    webhook_secret: str,
    realtime_url: str | None = None,
    control_base_url: str | None = None,
    api_key: str | None = None,
    workers_per_node: int = 2,
    capacity: int = 50,
    http_port: int = 8000,
    namespace: str = NAMESPACE,
) -> dict[str, Any]:
    """Start the checkpoint keeper, ``workers_per_node`` worker actors on every alive node, and the ingress.

    Call after ``ray.init(...)``. The ingress listens on 127.0.0.1:``http_port``
    (``POST /sip`` for webhooks). Returns ``{"keeper", "workers": {name: handle},
    "router", "url"}``; tear down with :func:`shutdown`.
    """
    ray = ray_module()
    from ray import serve
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if workers_per_node < 1 or capacity < 1:
        raise InvalidArgument("workers_per_node and capacity must be >= 1")
    keeper_cls = ray.remote(num_cpus=0)(CheckpointKeeper)
    keeper = keeper_cls.options(name=KEEPER_NAME, namespace=namespace, lifetime="detached",
                                get_if_exists=True).remote()
    worker_cls = ray.remote(num_cpus=0, max_restarts=0)(WorkerActor)
    workers: dict[str, Any] = {}
    nodes = sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeID"])
    for k, node in enumerate(nodes):
        for j in range(workers_per_node):
            name = f"rtqueue-worker-{k}-{j}"
            workers[name] = worker_cls.options(
                name=name, namespace=namespace, max_concurrency=2 * capacity + 16,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            ).remote(app, name=name, capacity=capacity, realtime_url=realtime_url,
                     control_base_url=control_base_url, api_key=api_key, keeper=keeper)
    ray.get([w.load.remote() for w in workers.values()])  # every worker is up
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    router_cls = serve.deployment(num_replicas=1, max_ongoing_requests=1000,
                                  ray_actor_options={"num_cpus": 0})(CallRouter)
    handle = serve.run(router_cls.bind(list(workers), webhook_secret=webhook_secret,
                                       control_base_url=control_base_url, api_key=api_key, namespace=namespace),
                       name="rtqueue", route_prefix="/")
    return {"keeper": keeper, "workers": workers, "router": handle,
            "url": f"http://127.0.0.1:{http_port}", "webhook_url": f"http://127.0.0.1:{http_port}/sip"}


def shutdown(deployment: Mapping[str, Any]) -> None:
    """Stop the ingress (its monitor first), close and kill the workers, kill the keeper."""
    ray = ray_module()
    from ray import serve

    try:
        deployment["router"].shutdown.remote().result(timeout_s=10)
    except Exception as exc:  # the router may be gone already
        log.debug("router shutdown: %s", exc)
    serve.shutdown()  # type: ignore[no-untyped-call]
    for handle in deployment["workers"].values():
        try:
            ray.get(handle.close.remote(), timeout=15)
        except Exception as exc:  # a killed worker
            log.debug("worker close: %s", exc)
        ray.kill(handle)
    ray.kill(deployment["keeper"])
