"""Errors in the task data: each names the file, line or row, field and what was expected."""

from __future__ import annotations

from typing import Any


class InvalidDataError(ValueError):
    """The task data cannot be used. The message says where and what was expected."""

    def __init__(
        self,
        message: str,
        *,
        source: str = "",
        line: int | None = None,
        field: str | None = None,
        unit: str = "line",
    ) -> None:
        self.reason = message
        self.source = source
        self.line = line
        self.field = field
        self.unit = unit
        parts = [source] if source else []
        if line is not None:
            parts.append(f"{unit} {line}")
        if field is not None:
            parts.append(f"field {field!r}")
        super().__init__(f"{', '.join(parts)}: {message}" if parts else message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments: without this, pickling (multiprocessing) loses the parts.
        return (_rebuild_invalid, (self.reason, self.source, self.line, self.field, self.unit))


def _rebuild_invalid(
    message: str, source: str, line: int | None, field: str | None, unit: str
) -> InvalidDataError:
    return InvalidDataError(message, source=source, line=line, field=field, unit=unit)
