"""Status messages that quote what a client sent, bounded.

A client's string echoed into an error (an unknown model name, a request id) could be longer
than gRPC lets a status message be (it travels in the trailing metadata, percent-encoded, under
an 8 KiB soft and 16 KiB hard limit): the refusal would turn into RESOURCE_EXHAUSTED. Every
message a door sends goes through `bounded`, and a client string is quoted with `shown`.
"""

from __future__ import annotations

MAX_MESSAGE_CHARS = 400  # 4 bytes a character, percent-encoded x3: under 5 KiB
MAX_SHOWN_CHARS = 48


def shown(value: str) -> str:
    """repr(value), cut to MAX_SHOWN_CHARS characters of it (the cut is marked)."""
    if len(value) <= MAX_SHOWN_CHARS:
        return repr(value)
    return repr(value[:MAX_SHOWN_CHARS]) + f"... ({len(value)} characters)"


def bounded(message: str) -> str:
    """message, cut to MAX_MESSAGE_CHARS characters (the cut is marked)."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[:MAX_MESSAGE_CHARS - 3] + "..."
