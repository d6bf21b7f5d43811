"""Shared fixtures: one timeout unit, a simulator, and a thread-leak check."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest

from tests.utils import UNIT


def rtqueue_threads() -> list[threading.Thread]:
    """Live threads started by rtqueue (the SDK, its simulator, its audio)."""
    return [t for t in threading.enumerate() if t.name.startswith("rtqueue-") and t.is_alive()]


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_reaches_children() -> None:
    """Tests that stop a child process with SIGINT need it not to be ignored.

    A shell that starts the suite in the background (``cmd &`` without job
    control, or ``nohup``) hands it SIGINT ignored, and a child inherits an
    ignored signal across exec. A handled one is reset to the default there,
    so with Python's own handler installed here, children see Ctrl-C again.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """After each test, every thread rtqueue started has ended."""
    before = set(rtqueue_threads())
    yield
    deadline = time.monotonic() + UNIT
    leaked = [t for t in rtqueue_threads() if t not in before]
    while leaked and time.monotonic() < deadline:
        leaked[0].join(deadline - time.monotonic())
        leaked = [t for t in rtqueue_threads() if t not in before]
    assert not leaked, f"threads still alive after the test: {[t.name for t in leaked]}"


@pytest.fixture(scope="module")
def pulse() -> Iterator[object]:
    """A private PulseAudio: null sink rtq is the default output, its monitor the default input.

    Skips (with the reason) when pulseaudio, PortAudio or ALSA's pulse plugin
    is missing; ``.ci/run`` installs them.
    """
    from tests.pulse import PulseServer, PulseUnavailable

    try:
        server = PulseServer.start()
    except PulseUnavailable as exc:
        pytest.skip(f"private PulseAudio unavailable: {exc}")
    try:
        try:
            import sounddevice as sd
        except (OSError, ImportError) as exc:
            pytest.skip(f"sounddevice/PortAudio unavailable: {exc}")
        devices = sd.query_devices()
        if not any(d["max_output_channels"] for d in devices) or not any(d["max_input_channels"] for d in devices):
            pytest.skip("PortAudio sees no ALSA 'pulse'/'default' device (apt-get install libasound2-plugins)")
        yield server
    finally:
        server.stop()


@pytest.fixture
def sim() -> Iterator[object]:
    """A fast simulator (no pacing) on a free loopback port."""
    from rtqueue import Simulator

    with Simulator(speed=None, seed=1) as s:
        yield s
