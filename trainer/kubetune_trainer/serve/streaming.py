"""Stop-string handling and server-sent-event framing for streamed completions."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class StopBuffer:
    """Releases streamed text only once it cannot be the start of a stop string.

    OpenAI semantics: the stop string itself is never sent, so a suffix that could still grow
    into one is held back until the next piece decides it.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to send now, and whether a stop string ended the stream."""
        self.pending += text
        out, found = cut_at_stop(self.pending, self.stops)
        if found:
            self.pending = ""
            return out, True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(stop[:n]):
                    keep = n
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    if isinstance(data.get("choices"), list):
        for choice in data["choices"]:  # OpenAI deltas carry only the keys that are set
            delta = choice.get("delta")
            if isinstance(delta, dict):
                choice["delta"] = {k: v for k, v in delta.items() if v is not None}
    if data.get("usage", ...) is None:
        del data["usage"]
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
