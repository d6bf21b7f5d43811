"""Audio formats, for device code: a re-export of :mod:`rtqueue.formats`.

The sans-I/O cores import :mod:`rtqueue.formats` directly (importing this
package would pull in device modules and their threads).
"""

from ..formats import PCM16, PCMA, PCMU, AudioFormat, Transcoder, convert, format_of

__all__ = ["PCM16", "PCMA", "PCMU", "AudioFormat", "Transcoder", "convert", "format_of"]
