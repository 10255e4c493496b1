"""The one canonical JSON encoder for payloads and headers.

Every payload goes through `encode_payload` at enqueue, so what cannot be delivered is
refused there, with the path of the offending value, and never discovered by the
publisher. Encoding is stable: the same value always gives the same text.

- `Decimal` and `int` become JSON numbers with their exact digits (never through
  float), however many PostgreSQL's numeric holds; a float is written with the digits
  of its shortest repr, in positional form, as PostgreSQL's JSONB keeps it; NaN and
  infinities are refused.
- timezone-aware `datetime` becomes ISO 8601 in UTC; a naive one is refused, since
  its meaning depends on a clock we cannot see. `date` and `time` become ISO 8601.
- `UUID` becomes its canonical string; `Enum` its value.
- strings holding NUL are refused: PostgreSQL's JSONB cannot store them.
- `bytes`, sets and any other type are refused: their JSON form is a choice the
  caller must make explicitly (base64, a sorted list, ...). So is a payload nested
  deeper than Python can recurse, or one that contains itself.

`reencode_stored` turns any payload enqueue accepted back into the bytes it encoded,
so a stored event can always be published; what it cannot re-encode (a row written
around enqueue) raises EventEncodingError, for that event alone.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

from somabrain.config.errors import EventEncodingError


class _Number(str):
    """A Decimal's exact digits, written into the JSON text unquoted."""


# PostgreSQL's numeric holds at most this many digits before and after the point.
_MAX_INTEGER_DIGITS = 131_072
_MAX_FRACTION_DIGITS = 16_383


def _number(value: decimal.Decimal, path: str) -> _Number:
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite: checked by the callers
    integer_digits = len(digits) + exponent
    if integer_digits > _MAX_INTEGER_DIGITS or -exponent > _MAX_FRACTION_DIGITS:
        raise EventEncodingError(
            f"payload{path}: {value:.6E} has more digits than PostgreSQL's numeric holds "
            f"({_MAX_INTEGER_DIGITS} before the point, {_MAX_FRACTION_DIGITS} after)"
        )
    # PostgreSQL's numeric has no negative zero.
    return _Number(format(value.copy_abs() if value.is_zero() else value, "f"))


def _normalise(value: Any, path: str) -> Any:
    if isinstance(value, str):
        check_encodable(f"payload{path}", value)
        if "\x00" in value:
            raise EventEncodingError(
                f"payload{path}: string holds a NUL character (\\u0000), "
                "which PostgreSQL cannot store; remove or escape it"
            )
        return value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        # Through Decimal: str() of an int over 4,300 digits raises ValueError in Python.
        return _number(decimal.Decimal(value), path)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EventEncodingError(f"payload{path}: {value!r} is not a finite number")
        # Written as PostgreSQL's numeric writes it (1e300 in full, 1e-07 as 0.0000001):
        # the bytes checked against the size limit here are the bytes published.
        return _number(decimal.Decimal(repr(value)), path)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise EventEncodingError(f"payload{path}: Decimal {value} is not a finite number")
        return _number(value, path)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise EventEncodingError(
                f"payload{path}: naive datetime {value.isoformat()} has no time zone; "
                "pass an aware datetime (e.g. datetime.now(timezone.utc))"
            )
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return _normalise(value.value, path)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise EventEncodingError(f"payload{path}: key {k!r} is not a string")
            _normalise(k, f"{path} key")
            out[k] = _normalise(v, f"{path}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_normalise(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise EventEncodingError(
        f"payload{path}: {type(value).__name__} has no canonical JSON form; "
        "convert it first (bytes: base64 string; set: sorted list)"
    )


def _dump(value: Any) -> str:
    if isinstance(value, _Number):
        return str.__str__(value)
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(f"{_dump(k)}:{_dump(v)}" for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def encode_payload(payload: Any) -> str:
    """Encode a payload to canonical JSON text (sorted keys, no spaces), or refuse it."""
    plain = _encode_plain(payload)
    return plain if plain is not None else _encode_general(payload)


def _encode_general(payload: Any) -> str:
    # Every type the encoder knows, with the path of whatever it refuses.
    try:
        return _dump(_normalise(payload, ""))
    except RecursionError:
        raise EventEncodingError(
            "payload nests deeper than Python can encode, or contains itself; flatten it"
        ) from None


_PLAIN_SCALARS = frozenset({str, int, bool, type(None)})
# Containers the plain path looks at before leaving the payload to the general path; only
# a cycle gets near it (the general path then refuses it as a payload that contains itself).
_PLAIN_CONTAINER_BUDGET = 100_000


def _encode_plain(payload: Any) -> str | None:
    """The canonical text of a payload made only of dicts with str keys, lists, str,
    int, bool and None (exact types), written by the json module's C encoder in one
    call; None when the payload holds anything else or anything `_encode_general`
    would refuse, which then decides. Both write the same text for such payloads:
    keys sorted, no spaces, non-ASCII kept, strings escaped by the same function."""
    stack = [payload]
    budget = _PLAIN_CONTAINER_BUDGET
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is dict:
            for key, item in value.items():
                if type(key) is not str:
                    return None
                if type(item) is dict or type(item) is list:
                    stack.append(item)
                elif type(item) not in _PLAIN_SCALARS:
                    return None
        elif kind is list:
            for item in value:
                if type(item) is dict or type(item) is list:
                    stack.append(item)
                elif type(item) not in _PLAIN_SCALARS:
                    return None
        elif kind not in _PLAIN_SCALARS:
            return None
        budget -= 1
        if budget == 0:
            return None
    try:
        text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):  # a cycle, an int too long to print, deep nesting
        return None
    # A NUL is written as \u0000 (this also matches an escaped backslash followed by
    # "u0000", which the general path then accepts); a lone surrogate cannot be UTF-8.
    if "\\u0000" in text:
        return None
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return None
    return text


def validate_headers(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """Headers are string to string; anything else is refused with the header's name."""
    if not headers:
        return {}
    out: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise EventEncodingError(f"header {name!r}: names and values must be strings")
        refuse_nul(f"header {name!r}", name + value)
        check_encodable(f"header {name!r}", name + value)
        out[name] = value
    return out


def reencode_stored(stored_text: str | None) -> bytes | None:
    """The exact bytes enqueue encoded, rebuilt from the JSONB column's text.

    JSONB keeps numbers as `numeric` (exact digits), so parsing its text with Decimal
    and encoding again gives the canonical form byte for byte. None is a tombstone.
    """
    if stored_text is None:
        return None
    try:
        fast = _reencode_without_fractions(stored_text)
        if fast is not None:
            return fast
        # Integers as Decimal too: int() refuses more than 4,300 digits; JSONB does not.
        value = json.loads(stored_text, parse_float=decimal.Decimal, parse_int=decimal.Decimal)
    except RecursionError:
        raise EventEncodingError(
            "stored payload nests deeper than Python can decode; it cannot be published"
        ) from None
    return encode_payload(value).encode()


class _NeedsExactDigits(Exception):
    """The stored payload holds a number json's C encoder would not write digit for digit."""


def _refuse_fraction(text: str) -> float:
    raise _NeedsExactDigits


def _small_int(text: str) -> int:
    if len(text) > 4000:  # int() refuses more than 4,300 digits
        raise _NeedsExactDigits
    return int(text)


_INTEGERS_ONLY = json.JSONDecoder(parse_float=_refuse_fraction, parse_int=_small_int)


def _reencode_without_fractions(stored_text: str) -> bytes | None:
    """The canonical bytes through json's C encoder, for the common payload whose numbers
    are all integers: the same bytes `encode_payload` writes (sorted keys, no spaces,
    exact integers). None when a number needs the exact-digit path."""
    try:
        value = _INTEGERS_ONLY.decode(stored_text)
    except _NeedsExactDigits:
        return None
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return None  # the exact path names what is wrong


def check_encodable(what: str, value: str) -> None:
    """Refuse strings that are not valid Unicode (lone surrogates cannot be UTF-8)."""
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise EventEncodingError(
            f"{what} holds a character that is not valid Unicode at position {exc.start}"
        ) from None


def refuse_nul(what: str, value: str | None) -> None:
    """PostgreSQL text cannot hold NUL; refuse it here with the field's name."""
    if value is not None and "\x00" in value:
        raise EventEncodingError(f"{what} holds a NUL character (\\u0000); remove it")
