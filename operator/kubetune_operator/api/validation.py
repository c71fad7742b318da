"""Read FineTuneJob YAML files and explain what is wrong with them, field by field.

Used by `kubetune validate`, `kubetune run` and the operator, so every entry point words
errors the same way: the field path (camelCase, as written), the bad value, what is accepted.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kubetune_operator.api.models import API_VERSION, KIND, FineTuneJob


@dataclass(frozen=True)
class FieldError:
    """One problem in one document."""

    path: str
    message: str
    value: str | None = None

    def __str__(self) -> str:
        got = f" (got {self.value})" if self.value is not None else ""
        return f"{self.path or '<document>'}: {self.message}{got}"


class SpecError(ValueError):
    """A job document (or file) is invalid; carries every error found."""

    def __init__(self, source: str, errors: list[FieldError]) -> None:
        self.source = source
        self.errors = errors
        super().__init__("\n".join(f"{source}: {e}" for e in errors))


_FIELD_MSG = re.compile(r"^([A-Za-z][\w.\[\]]*): (.+)$", re.DOTALL)
# user:password@ in a URI: never echoed back (into a status, an Event or a log line).
# Greedy up to the last @: a raw secret key may hold '/' (over-redacting a path is harmless).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s'\"]*@")


def redact(text: str) -> str:
    """`scheme://user:secret@host` -> `scheme://***@host`."""
    return _USERINFO.sub(r"\1***@", text)


def _short(value: Any) -> str:
    text = redact(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model class found by walking `loc` (wire names) from FineTuneJob."""
    current: Any = FineTuneJob
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = next(
            (f for name, f in current.model_fields.items() if part in (name, f.alias)), None
        )
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Optional[X] -> X, list[X] -> X, so a path can keep walking into X."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    if origin is list:
        return _unwrap(typing.get_args(annotation)[0])
    return annotation


def _accepted_fields(loc: tuple[int | str, ...]) -> str:
    model = _model_at(loc)
    if model is None:
        return ""
    names = sorted(f.alias or n for n, f in model.model_fields.items())
    return "; accepted fields: " + ", ".join(names)


def explain(err: ValidationError) -> list[FieldError]:
    out: list[FieldError] = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        kind = e["type"]
        msg = redact(str(e["msg"]).removeprefix("Value error, "))
        value: str | None = _short(e.get("input"))
        if kind == "missing":
            msg, value = "required field is missing", None
        elif kind == "extra_forbidden":
            msg = "unknown field" + _accepted_fields(loc[:-1])
            value = None
        elif isinstance(e.get("input"), dict | list) and (m := _FIELD_MSG.match(msg)):
            # A cross-field check names the field it blames; point the path at it.
            path = f"{path}.{m.group(1)}" if path else m.group(1)
            msg, value = m.group(2), None
        elif kind == "literal_error":
            msg = msg.replace("Input should be", "accepted values are")
        out.append(FieldError(path, msg, value))
    return out


def validate_document(doc: Any) -> FineTuneJob:
    """Validate one parsed YAML document; raise SpecError listing every problem."""
    if not isinstance(doc, dict):
        raise SpecError(
            "document",
            [FieldError("", f"expected a mapping (a Kubernetes object), got {type(doc).__name__}")],
        )
    head: list[FieldError] = []
    if doc.get("apiVersion") != API_VERSION:
        head.append(
            FieldError("apiVersion", f"must be {API_VERSION}", _short(doc.get("apiVersion")))
        )
    if doc.get("kind") != KIND:
        head.append(FieldError("kind", f"must be {KIND}", _short(doc.get("kind"))))
    if head:
        raise SpecError("document", head)
    try:
        return FineTuneJob.model_validate(doc)
    except ValidationError as err:
        raise SpecError("document", explain(err)) from None


def load_jobs(path: str | Path) -> list[FineTuneJob]:
    """Every FineTuneJob in a (possibly multi-document) YAML file, or one SpecError for all."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(p), [FieldError("", "file not found")]) from None
    except UnicodeDecodeError as err:
        raise SpecError(str(p), [FieldError("", f"not UTF-8 text ({err.reason})")]) from None
    except OSError as err:
        raise SpecError(str(p), [FieldError("", f"cannot read: {err.strerror}")]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(str(p), [FieldError("", f"malformed YAML: {where}{problem}")]) from None
    if not docs:
        raise SpecError(str(p), [FieldError("", "no YAML documents in file")])
    jobs: list[FineTuneJob] = []
    errors: list[FieldError] = []
    for index, doc in enumerate(docs):
        label = f"document {index + 1}" if len(docs) > 1 else ""
        try:
            jobs.append(validate_document(doc))
        except SpecError as err:
            prefix = f"[{label}] " if label else ""
            errors.extend(FieldError(prefix + e.path, e.message, e.value) for e in err.errors)
    if errors:
        raise SpecError(str(p), errors)
    return jobs
