"""Masking secrets (S3 keys, tokens) out of any text before it is logged or reported."""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


SECRET_ENV_VARS: tuple[str, ...] = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
)
REDACTED = "***"
# Values shorter than this are not masked: replacing every "a" in a message would garble it, and
# no real AWS credential is that short.
_MIN_SECRET_LEN = 4
_SECRET_ASSIGNMENT_RE = re.compile(
    r"(?i)\b(aws_secret_access_key|aws_session_token|secret_?access_?key|session_?token)"
    r"(\s*[=:]\s*|\"\s*:\s*\")([^\s\"',;&]+)"
)


def redact_secrets(text: str, env: Mapping[str, str] | None = None) -> str:
    """Mask the values of the AWS credential env vars wherever they occur in `text`.

    Also masks their URL-encoded form (session tokens appear encoded in presigned URLs) and
    `secret_access_key=...`-style assignments whose value is not in the environment.
    """
    environ = os.environ if env is None else env
    values: set[str] = set()
    for var in SECRET_ENV_VARS:
        value = environ.get(var, "")
        if len(value) >= _MIN_SECRET_LEN:
            values.add(value)
            values.add(urllib.parse.quote(value, safe=""))
            values.add(urllib.parse.quote_plus(value, safe=""))
    # Longest first, so a value containing another is masked whole.
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return _SECRET_ASSIGNMENT_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
