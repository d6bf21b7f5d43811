"""An embedded OpenAI Realtime API (GA protocol) simulator.

A real WebSocket server on loopback that speaks the GA Realtime protocol:
sessions and ``session.update`` validation, conversation items, server VAD on
the PCM16 24 kHz audio actually sent, paced audio and transcript streaming,
function calls from a deterministic scripted model, out-of-band responses,
cancellation and truncation checks, with the real service's error codes and
messages. Latency and faults can be injected.

Quick start::

    from rtqueue.sim import Simulator

    with Simulator(speed=20.0) as sim:
        print(sim.url)            # ws://127.0.0.1:PORT/v1/realtime?model=gpt-realtime
        ...                       # point any Realtime client at it
        print(sim.stats())

The official client works too: ``OpenAI(api_key="sk-test",
websocket_base_url=sim.websocket_base_url).realtime.connect(model="gpt-realtime")``.

A small phone network too: ``sim.place_call(webhook_url, secret=..., caller=CallerScript([...]))``
rings a SIP call into an app (a signed ``realtime.call.incoming`` webhook),
``sim.http_base_url`` serves ``/v1/realtime/calls/{call_id}/accept|reject|refer|hangup``,
``?call_id=`` sockets attach to the call, and a scripted caller speaks, presses
DTMF keys and hangs up (:mod:`.phone`; ``sim.call(call_id)`` is the record).

Modules: :mod:`.core` (pure state machine), :mod:`.model` (scripted model and
its rules), :mod:`.vad`, :mod:`.synth`, :mod:`.faults`, :mod:`.server`,
:mod:`.phone` and :mod:`.phone_net` (SIP calls),
:mod:`.schema` (conformance checks against ``openai.types.realtime``),
:mod:`.cli` (``python -m rtqueue.sim``).
"""

from __future__ import annotations

from .core import SimSession
from .faults import FaultPlan
from .model import Reply, ScriptedModel, ToolCall, Turn
from .phone import CallerScript, CallRecord
from .server import Simulator
from .synth import Speech, noise, silence, synthesize

__all__ = [
    "CallRecord",
    "CallerScript",
    "FaultPlan",
    "Reply",
    "ScriptedModel",
    "SimSession",
    "Simulator",
    "Speech",
    "ToolCall",
    "Turn",
    "noise",
    "silence",
    "synthesize",
]
