"""PII redaction: emails, card numbers (Luhn-checked), IP addresses and phone numbers become
placeholders. Pure: the inference server uses it on captured traffic too."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable

from kubetune_trainer.config import ALL_PII_KINDS

# -- PII ----------------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
    r"(?![\w-])"
)
# 13-19 digits, optionally grouped by spaces or dashes; the Luhn check decides.
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w]|-\d)")
# Candidates only: ipaddress decides. No word char, ':' or '.' just before, so "std::vector",
# "10:30" (one colon) and "12:30:00" (not a valid address) never become <IPV6>.
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?"
    r"(?![\w:]|\.\d)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d|\w)")
# North American: (212) 555-0187, 415-555-0132, 415.555.0132, 1-800-555-0199. The separator must
# repeat, so dates (2024-01-15), versions (10.2.3) and IPv4 addresses do not match.
_PHONE_NANP = re.compile(
    r"(?<![\w.+-])(?:\+?1[-. ]?)?(?:\(\d{3}\)[ -]?\d{3}[-. ]|\d{3}([-. ])\d{3}\1)\d{4}"
    r"(?![\w]|[-.]\d)"
)
# Local seven-digit numbers: 555-0123. Dash only, exchange code 2-9 as in the NANP (so ranges
# like 100-2000 stay), and not part of an ID such as INV-555-0123.
_PHONE_LOCAL = re.compile(r"(?<![\w.+#/-])[2-9]\d{2}-\d{4}(?![\w]|[-./]\d)")
# International: a leading + and 8-15 digits in groups: +44 20 7946 0958, +1 415-555-0132.
_PHONE_INTL = re.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,5}(?![\w]|[-.]\d)"
)

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ipv4": "<IPV4>",
    "ipv6": "<IPV6>",
    "credit_card": "<CREDIT_CARD>",
}
# Order matters: emails hold digits, cards are long digit runs, IPv6 can embed an IPv4.
_ORDER = ("email", "credit_card", "ipv6", "ipv4", "phone")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(s: str) -> str | None:
    # Try the whole run, then without trailing groups: "4111 1111 1111 1111 123" ends in a CVV.
    groups = re.split(r"([ -])", s)
    for end in range(len(groups), 0, -2):
        head = "".join(groups[:end])
        digits = head.replace(" ", "").replace("-", "")
        if len(digits) < 13:
            break
        if len(digits) <= 19 and luhn_ok(digits):
            return PLACEHOLDERS["credit_card"] + "".join(groups[end:])
    return None


def _ipv6(s: str) -> str | None:
    for cand, rest in ((s, ""), (s[:-1], s[-1:])):
        if not cand or (cand.endswith(":") and not cand.endswith("::")):
            continue
        try:
            ipaddress.IPv6Address(cand)
        except ValueError:
            continue
        if not any(c.isdigit() for c in cand):
            return None  # "Face::add" is C++, not an address; real ones nearly always hold digits
        return PLACEHOLDERS["ipv6"] + rest
    return None


def _phone_intl(s: str) -> str | None:
    digits = sum(c.isdigit() for c in s)
    return PLACEHOLDERS["phone"] if 8 <= digits <= 15 else None


_CHECKS: dict[str, list[tuple[re.Pattern[str], Callable[[str], str | None]]]] = {
    "email": [(_EMAIL, lambda s: PLACEHOLDERS["email"])],
    "credit_card": [(_CARD, _card)],
    "ipv6": [(_IPV6, _ipv6)],
    "ipv4": [(_IPV4, lambda s: PLACEHOLDERS["ipv4"])],
    "phone": [
        (_PHONE_INTL, _phone_intl),
        (_PHONE_NANP, lambda s: PLACEHOLDERS["phone"]),
        (_PHONE_LOCAL, lambda s: PLACEHOLDERS["phone"]),
    ],
}


def redact_pii(text: str, kinds: Iterable[str]) -> tuple[str, dict[str, int]]:
    """Replace each kind of PII with its placeholder; returns (text, {kind: replacements})."""
    wanted = set(kinds)
    unknown = wanted - set(ALL_PII_KINDS)
    if unknown:
        raise ValueError(f"unknown PII kinds {sorted(unknown)}; accepted: {list(ALL_PII_KINDS)}")
    counts: dict[str, int] = {}
    for kind in _ORDER:
        if kind not in wanted:
            continue
        for pattern, check in _CHECKS[kind]:
            text, n = _count_sub(pattern, text, check)
            if n:
                counts[kind] = counts.get(kind, 0) + n
    return text, counts


def _count_sub(
    pattern: re.Pattern[str], text: str, check: Callable[[str], str | None]
) -> tuple[str, int]:
    n = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal n
        out = check(m.group(0))
        if out is None:
            return m.group(0)
        n += 1
        return out

    return pattern.sub(repl, text), n
