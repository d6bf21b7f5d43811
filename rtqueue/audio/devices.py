"""The pair of audio endpoints a session uses."""

from __future__ import annotations

import attrs

from ._backend import load_sounddevice
from .input import AudioInput, Microphone, NullMicrophone
from .output import AudioOutput, NullSpeaker, Speaker

__all__ = ["AudioIO"]


@attrs.define(eq=False)
class AudioIO:
    """An output for assistant audio and an input for the user's voice; either may be None.

    The session starts and closes both; :meth:`close` is provided for apps that
    drive them directly.
    """

    output: AudioOutput | None = None
    input: AudioInput | None = None

    @classmethod
    def default(cls, *, output_device: int | str | None = None, input_device: int | str | None = None) -> AudioIO:
        """:class:`Speaker` + :class:`Microphone` on the default (or given) devices.

        Checks at once that PortAudio loads, raising
        :class:`~rtqueue.errors.AudioUnavailable` with install instructions if not.
        Devices are opened by ``start()``.
        """
        load_sounddevice()
        return cls(Speaker(output_device), Microphone(input_device))

    @classmethod
    def null(cls) -> AudioIO:
        """:class:`NullSpeaker` + :class:`NullMicrophone`: no device, real-time playback clock."""
        return cls(NullSpeaker(), NullMicrophone())

    def close(self) -> None:
        """Close both endpoints (idempotent)."""
        if self.input is not None:
            self.input.close()
        if self.output is not None:
            self.output.close()
