"""Lazy access to sounddevice, so ``import rtqueue.audio`` works without PortAudio.

sounddevice loads the PortAudio shared library at import time and raises
``OSError`` when it is missing; we import it only when a real device is opened
and turn both failure modes into :class:`~rtqueue.errors.AudioUnavailable`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import AudioUnavailable

# Indirection so tests can simulate a machine without PortAudio.
_import_module = importlib.import_module

_PORTAUDIO_HINT = (
    "install the PortAudio library: `apt-get install libportaudio2` (Debian/Ubuntu), "
    "`dnf install portaudio` (Fedora), `brew install portaudio` (macOS); "
    "or use AudioIO.null() / NullSpeaker / WavMicrophone, which need no device"
)


def load_sounddevice() -> ModuleType:
    """Return the ``sounddevice`` module, or raise :class:`AudioUnavailable` saying what to install."""
    try:
        return _import_module("sounddevice")
    except OSError as exc:
        raise AudioUnavailable(f"PortAudio library not found ({exc}); {_PORTAUDIO_HINT}") from exc
    except ImportError as exc:
        raise AudioUnavailable(
            "the 'sounddevice' package is not installed (`pip install sounddevice`); "
            f"it also needs PortAudio: {_PORTAUDIO_HINT}"
        ) from exc
