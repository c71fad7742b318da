"""Row validation into the canonical per-format shape, naming the field of each problem."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from kubetune_trainer.config import FieldNames
from kubetune_trainer.data.readers import Record, Source, as_object, typename
from kubetune_trainer.data.rows import ROLES, Row

# -- validation ---------------------------------------------------------------------------------


def _missing(src: Source, name: str, line: int, expected: str) -> Exception:
    if src.columns is not None and name not in src.columns:
        where = "header (line 1)" if src.ext == ".csv" else "schema"
        return src.error(
            f"the {where} has no column {name!r} (columns: {', '.join(src.columns)}); "
            f"expected a column with {expected}",
            1 if src.ext == ".csv" else None,
            name,
        )
    return src.error(f"missing field {name!r}; expected {expected}", line, name)


def _text(src: Source, row: dict[str, Any], name: str, line: int) -> str:
    if name not in row or row[name] is None:
        raise _missing(src, name, line, "a string")
    value = row[name]
    if not isinstance(value, str):
        raise src.error(f"expected a string, got {typename(value)}", line, name)
    return value


def _messages(src: Source, row: dict[str, Any], name: str, line: int) -> list[dict[str, str]]:
    if name not in row or row[name] is None:
        raise _missing(src, name, line, "a list of messages")
    value = row[name]
    if isinstance(value, str) and src.ext in (".csv", ".parquet"):
        # Tabular files carry the message list as a JSON string.
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise src.error(
                f"invalid JSON ({err.msg}); expected a JSON list of messages", line, name
            ) from None
    if not isinstance(value, list):
        raise src.error(f"expected a list of messages, got {typename(value)}", line, name)
    if not value:
        raise src.error("the message list is empty; expected at least one message", line, name)
    out: list[dict[str, str]] = []
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise src.error(
                f"expected an object with 'role' and 'content', got {typename(msg)}", line, where
            )
        role = msg.get("role")
        if role not in ROLES:
            shown = "missing" if role is None else repr(role)
            raise src.error(
                f"role {shown} is not accepted; expected one of {', '.join(ROLES)}",
                line,
                f"{where}.role",
            )
        content = msg.get("content")
        if not isinstance(content, str):
            got = "missing" if "content" not in msg else typename(content)
            raise src.error(f"expected a string, got {got}", line, f"{where}.content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise src.error(
            "no assistant message; expected at least one turn with role 'assistant' to learn from",
            line,
            name,
        )
    return out


def _label(src: Source, row: dict[str, Any], name: str, line: int) -> str:
    if name not in row or row[name] is None:
        raise _missing(src, name, line, "a label (string or integer)")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise src.error(f"expected a label (string or integer), got {typename(value)}", line, name)
    label = str(value).strip()
    if not label:
        raise src.error("the label is empty; expected a label (string or integer)", line, name)
    return label


def canonical(fmt: str, fields: FieldNames, src: Source, rec: Record) -> Row:
    row = as_object(src, rec)
    line = rec.line
    if fmt == "chat":
        return {"messages": _messages(src, row, fields.messages, line)}
    if fmt == "instruction":
        return {
            "prompt": _text(src, row, fields.prompt, line),
            "completion": _text(src, row, fields.completion, line),
        }
    if fmt == "text":
        return {"text": _text(src, row, fields.text, line)}
    if fmt == "classification":
        return {
            "text": _text(src, row, fields.text, line),
            "label": _label(src, row, fields.label, line),
        }
    raise ValueError(f"unknown data format {fmt!r}")


def map_texts(fmt: str, row: Row, fn: Callable[[str], str]) -> Row:
    if fmt == "chat":
        return {
            "messages": [{"role": m["role"], "content": fn(m["content"])} for m in row["messages"]]
        }
    if fmt == "instruction":
        return {"prompt": fn(row["prompt"]), "completion": fn(row["completion"])}
    out = dict(row)
    out["text"] = fn(row["text"])
    return out


def is_empty(fmt: str, row: Row) -> bool:
    if fmt == "chat":
        # Nothing to learn from when every assistant turn is empty.
        return not any(m["content"] for m in row["messages"] if m["role"] == "assistant")
    if fmt == "instruction":
        return not row["prompt"] or not row["completion"]
    return not row["text"]


def canon_json(row: Row) -> bytes:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def row_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()
