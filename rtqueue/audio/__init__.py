"""Audio for rtqueue: speakers that know what they played, microphones, WAV and null devices.

Devices exchange 24 kHz PCM16 little-endian mono unless they declare another
:class:`AudioFormat` (``format`` attribute); the session transcodes between a
device's format and the session's negotiated one (:mod:`rtqueue.audio.formats`).
Importing this package never loads PortAudio; only :class:`Speaker`,
:class:`Microphone` and :meth:`AudioIO.default` do, raising
:class:`~rtqueue.errors.AudioUnavailable` when it is missing.
"""

from .devices import AudioIO
from .formats import PCM16, PCMA, PCMU, AudioFormat, Transcoder, convert, format_of
from .input import AudioInput, Microphone, NullMicrophone, PcmMicrophone, WavMicrophone
from .output import AudioOutput, NullSpeaker, PlaybackCut, Speaker, WavSpeaker
from .pcm import (
    BYTES_PER_MS,
    SAMPLE_RATE,
    StreamResampler,
    float_to_pcm16,
    pcm16_to_float,
    read_wav_24k_mono,
    resample,
    rms_dbfs,
)

__all__ = [
    "BYTES_PER_MS",
    "PCM16",
    "PCMA",
    "PCMU",
    "SAMPLE_RATE",
    "AudioFormat",
    "AudioIO",
    "AudioInput",
    "AudioOutput",
    "Microphone",
    "NullMicrophone",
    "NullSpeaker",
    "PcmMicrophone",
    "PlaybackCut",
    "Speaker",
    "StreamResampler",
    "Transcoder",
    "WavMicrophone",
    "WavSpeaker",
    "convert",
    "float_to_pcm16",
    "format_of",
    "pcm16_to_float",
    "read_wav_24k_mono",
    "resample",
    "rms_dbfs",
]
