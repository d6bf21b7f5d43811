"""rtqueue: conflict-free OpenAI Realtime voice agents in plain, synchronous Python.

::

    import rtqueue

    with rtqueue.Simulator() as sim:
        with rtqueue.Session.connect(url=sim.url, instructions="Be brief.") as session:
            print(session.ask("Hello there").text)

The public API is exactly ``__all__`` below (a test checks it). Audio devices
live in :mod:`rtqueue.audio`, imported on demand so that ``import rtqueue``
works without PortAudio.
"""

import logging as _logging
from typing import TYPE_CHECKING, Any

from .agents import Agent, Handoff, handoff
from .approvals import ApprovalDecision, ApprovalRequest
from .audio_session import Interruption
from .config import SessionConfig
from .errors import (
    AudioFormatError,
    AudioUnavailable,
    AuthenticationError,
    CallControlError,
    ConnectError,
    ConnectionLost,
    GateTimeout,
    InputGuardrailTripped,
    InvalidArgument,
    ProtocolError,
    ResponseError,
    ResponseRejected,
    ResponseTimeout,
    RtqueueError,
    ServerError,
    SessionClosed,
    ToolError,
    WebhookVerificationError,
)
from .formats import PCM16, PCMA, PCMU, AudioFormat
from .gate import GateStats, ResponseGate
from .guardrails import (
    GuardrailContext,
    GuardrailResult,
    InputGuardrail,
    OutputGuardrail,
    input_guardrail,
    output_guardrail,
)
from .handles import ResponseHandle, SendHandle
from .hosted_mcp import HostedMCP
from .reconnect import ReconnectPolicy
from .session import Session
from .tools import Tool, ToolContext, tool
from .usage import Usage
from .values import Event, Response

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .sim import FaultPlan, Simulator


def __getattr__(name: str) -> Any:
    # The simulator (websockets, numpy, jsonschema, its models) is imported on first use: an app
    # that talks to OpenAI never pays its import time, nor its objects in every garbage collection.
    if name in ("Simulator", "FaultPlan"):
        from . import sim

        value = getattr(sim, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rtqueue' has no attribute {name!r}")

# A library never configures logging; this keeps "No handlers could be found" away.
_logging.getLogger("rtqueue").addHandler(_logging.NullHandler())

__all__ = [
    "PCM16",
    "PCMA",
    "PCMU",
    "Agent",
    "ApprovalDecision",
    "ApprovalRequest",
    "AudioFormat",
    "AudioFormatError",
    "AudioUnavailable",
    "AuthenticationError",
    "CallControlError",
    "ConnectError",
    "ConnectionLost",
    "Event",
    "FaultPlan",
    "GateStats",
    "GateTimeout",
    "GuardrailContext",
    "GuardrailResult",
    "Handoff",
    "HostedMCP",
    "InputGuardrail",
    "InputGuardrailTripped",
    "Interruption",
    "InvalidArgument",
    "OutputGuardrail",
    "ProtocolError",
    "ReconnectPolicy",
    "Response",
    "ResponseError",
    "ResponseGate",
    "ResponseHandle",
    "ResponseRejected",
    "ResponseTimeout",
    "RtqueueError",
    "SendHandle",
    "ServerError",
    "Session",
    "SessionClosed",
    "SessionConfig",
    "Simulator",
    "Tool",
    "ToolContext",
    "ToolError",
    "Usage",
    "WebhookVerificationError",
    "__version__",
    "handoff",
    "input_guardrail",
    "output_guardrail",
    "tool",
]
