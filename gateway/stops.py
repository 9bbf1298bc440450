"""Stop strings over streamed text: hold back only what could still become a stop string."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        if not self.stops:  # most requests: nothing to hold back, every token
            return text, False
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[:min(hits)], True
        keep = self._partial_stop_suffix(buf)
        self._pending = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def _partial_stop_suffix(self, buf: str) -> int:
        """Length of the longest end of buf that begins some stop string."""
        for n in range(min(len(buf), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(buf[-n:]) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
