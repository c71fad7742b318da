"""Text cleaning: control characters, whitespace runs and blank-line runs."""

from __future__ import annotations

import re

from kubetune_trainer.config import CleaningSpec

# -- cleaning -----------------------------------------------------------------------------------

# C0/C1 control characters except \t and \n (\r goes too: "\r\n" becomes "\n").
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Runs of horizontal whitespace between two non-space characters on one line. Leading
# indentation is kept: it carries meaning in code completions.
_INNER_WS = re.compile(r"(?<=\S)[^\S\n]+(?=\S)")
_TRAILING_WS = re.compile(r"[^\S\n]+(?=\n)")
_MANY_NEWLINES = re.compile(r"\n{3,}")


class Cleaner:
    def __init__(self, spec: CleaningSpec) -> None:
        self.strip_control = spec.enabled and spec.strip_control_chars
        self.normalize = spec.enabled and spec.normalize_whitespace
        self.removed = 0  # control characters removed from the row being cleaned

    def __call__(self, text: str) -> str:
        if self.strip_control:
            text, n = _CONTROL.subn("", text)
            self.removed += n
        if self.normalize:
            if "  " in text or "\t" in text or "\n" in text or not text.isascii():
                text = _INNER_WS.sub(" ", text)
                text = _TRAILING_WS.sub("", text)
                text = _MANY_NEWLINES.sub("\n\n", text)
            text = text.strip()
        return text
