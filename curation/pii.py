"""PII redaction: e-mail addresses, phone numbers, IP addresses, payment card numbers.

Each kind is a regular expression plus a check that removes look-alikes:

- email: `local@domain.tld`.
- phone: international `+CC ...` numbers of 8-15 digits, or North-American
  style `(555) 123-4567` / `555-123-4567` / `555.123.4567`; digits only in
  groups joined by spaces, dots or dashes, so version numbers and plain
  integers are left alone.
- ip_address: IPv4 dotted quads and full or compressed IPv6, parsed by
  `ipaddress`; only global addresses are redacted (127.0.0.1, 10.x, 192.168.x
  and documentation ranges are code examples, not personal data).
- credit_card: 13-19 digits, optionally grouped by spaces or dashes, that
  pass the Luhn checksum; not the digits of a decimal number (`2.6220575542921198`)
  nor an ISBN.

A match is replaced by `replacement` with `{kind}` filled in with the kind's
upper-case name, e.g. "<EMAIL>" for the default "<{kind}>".
"""

from __future__ import annotations

import collections
import ipaddress
import re
from collections.abc import Callable

PII_KINDS = ("email", "phone", "ip_address", "credit_card")

EMAIL = re.compile(r"\b[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
PHONE = re.compile(
    r"(?<![\w.+-])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"  # +44 20 7946 0958, +1-555-123-4567
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"  # (555) 123-4567
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 555-123-4567, 555.123.4567
    r")(?![\w.-]?\d)"
)
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]?\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{1,4})*(?![\w:])")
# not the digits of a decimal fraction (3.50000000000000) nor an ISBN
CARD = re.compile(r"(?<![\w.,-])(?<!ISBN )(?<!ISBN: )\d(?:[ -]?\d){12,18}(?![\w-]?\d)(?![.,]\d)")


def luhn_valid(digits: str) -> bool:
    """Return True when the digit string passes the Luhn checksum."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_phone(match: str) -> bool:
    """Return True for 8-15 digits (an international or North-American number)."""
    return 8 <= sum(c.isdigit() for c in match) <= 15


def _is_global_ip(match: str) -> bool:
    """Return True for a valid, globally routable IP address."""
    try:
        return ipaddress.ip_address(match).is_global
    except ValueError:
        return False


def _is_card(match: str) -> bool:
    """Return True for 13-19 digits passing Luhn."""
    digits = re.sub(r"[ -]", "", match)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


# kind -> (patterns, check); cards go before phones so a grouped card number is a card
DETECTORS: dict[str, tuple[tuple[re.Pattern, ...], Callable[[str], bool]]] = {
    "email": ((EMAIL,), lambda m: True),
    "credit_card": ((CARD,), _is_card),
    "ip_address": ((IPV4, IPV6), _is_global_ip),
    "phone": ((PHONE,), _is_phone),
}


def redact(
    text: str, kinds: tuple[str, ...] | list[str] = PII_KINDS, replacement: str = "<{kind}>"
) -> tuple[str, dict[str, int]]:
    """Return (`text` with PII of `kinds` replaced, count of replacements per kind)."""
    counts: collections.Counter[str] = collections.Counter()
    for kind in (k for k in DETECTORS if k in kinds):
        patterns, check = DETECTORS[kind]
        label = replacement.format(kind=kind.upper())

        def substitute(match: re.Match, kind: str = kind, check=check, label: str = label) -> str:
            if not check(match.group(0)):
                return match.group(0)
            counts[kind] += 1
            return label

        for pattern in patterns:
            text = pattern.sub(substitute, text)
    return text, dict(counts)


def check_kinds(kinds: list[str]) -> None:
    """Raise ValueError naming any kind that is not one of PII_KINDS."""
    unknown = sorted(set(kinds) - set(PII_KINDS))
    if unknown:
        raise ValueError(f"unknown PII kinds {unknown}; choose from {', '.join(PII_KINDS)}")
