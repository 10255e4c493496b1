import datetime as dt
import decimal
import enum
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from somabrain.config.errors import EventEncodingError
from somabrain.store import codec
from somabrain.store.codec import encode_payload, reencode_stored, validate_headers


class Colour(enum.StrEnum):
    RED = "red"


class Size(enum.IntEnum):
    BIG = 2


def test_encode_payload_decimal_keeps_exact_digits() -> None:
    text = encode_payload({"price": decimal.Decimal("12345678901234567890.10")})

    assert text == '{"price":12345678901234567890.10}'


def test_encode_payload_aware_datetime_becomes_utc_iso() -> None:
    moment = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))

    assert encode_payload({"at": moment}) == '{"at":"2026-01-02T01:04:05Z"}'


def test_encode_payload_naive_datetime_is_refused_with_path() -> None:
    with pytest.raises(EventEncodingError, match=r"payload\.order\.at: naive datetime"):
        encode_payload({"order": {"at": dt.datetime(2026, 1, 2)}})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"raw", "bytes has no canonical JSON form"),
        ({1, 2}, "set has no canonical JSON form"),
        (float("nan"), "not a finite number"),
        (decimal.Decimal("Infinity"), "not a finite number"),
    ],
)
def test_encode_payload_values_without_canonical_form_are_refused(
    value: object, message: str
) -> None:
    with pytest.raises(EventEncodingError, match=message):
        encode_payload({"v": [value]})


def test_encode_payload_uuid_and_sorted_keys_are_stable() -> None:
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")

    assert encode_payload({"b": 1, "a": ident}) == encode_payload({"a": ident, "b": 1})
    assert json.loads(encode_payload({"a": ident}))["a"] == str(ident)


def test_encode_payload_non_string_key_is_refused() -> None:
    with pytest.raises(EventEncodingError, match="key 1 is not a string"):
        encode_payload({1: "x"})


def test_validate_headers_refuses_non_string_values() -> None:
    with pytest.raises(EventEncodingError, match="header 'n'"):
        validate_headers({"n": 1})  # type: ignore[dict-item]


def test_reencode_stored_none_is_a_tombstone() -> None:
    assert reencode_stored(None) is None


def test_encode_payload_nul_character_is_refused_before_the_database_sees_it() -> None:
    with pytest.raises(EventEncodingError, match="NUL"):
        encode_payload({"name": "a\x00b"})


def test_encode_payload_float_is_written_as_postgres_numeric_writes_it() -> None:
    assert encode_payload([1e-07, 1e16, -0.0, 0.5]) == "[0.0000001,10000000000000000,0.0,0.5]"


def test_encode_payload_float_size_is_its_published_size() -> None:
    assert len(encode_payload([1e300])) == 303


def test_encode_payload_decimal_beyond_postgres_numeric_is_refused() -> None:
    with pytest.raises(EventEncodingError, match="more digits than PostgreSQL"):
        encode_payload({"tiny": decimal.Decimal("1E-20000")})


def test_encode_payload_lone_surrogate_is_refused_with_its_path() -> None:
    with pytest.raises(EventEncodingError, match=r"payload\.name holds a character"):
        encode_payload({"name": "a\udc80"})


def test_encode_payload_int_longer_than_python_prints_keeps_every_digit() -> None:
    """O-14: str() of an int over 4,300 digits raises ValueError; the encoder writes it."""
    assert encode_payload({"n": -(10**5000)}) == '{"n":-1' + "0" * 5000 + "}"


def test_encode_payload_int_beyond_postgres_numeric_is_refused_briefly() -> None:
    with pytest.raises(EventEncodingError, match=r"^payload\.n: 1\.000000E\+200000 has more"):
        encode_payload({"n": 10**200000})


def test_reencode_stored_long_integer_gives_the_bytes_enqueue_encoded() -> None:
    """O-14: a number of more than 4,300 digits (which enqueue accepts) can be published."""
    encoded = encode_payload([decimal.Decimal("9" * 5000), 10**5000, -7, 0])

    assert reencode_stored(encoded) == encoded.encode()


def test_encode_payload_that_contains_itself_is_refused() -> None:
    payload: dict[str, object] = {}
    payload["self"] = payload

    with pytest.raises(EventEncodingError, match="nests deeper than Python can encode"):
        encode_payload(payload)


def test_reencode_stored_payload_nested_too_deep_raises_encoding_error() -> None:
    with pytest.raises(EventEncodingError, match="cannot be published"):
        reencode_stored("[" * 5000 + "]" * 5000)


_JSON_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | _JSON_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_JSON_TEXT, inner, max_size=4),
    max_leaves=20,
)


@given(_JSON_VALUES)
def test_reencode_stored_integer_payloads_give_the_bytes_enqueue_encoded(value: object) -> None:
    # JSONB's text form: spaces after separators, keys in its own order.
    stored = json.dumps(value, separators=(", ", ": "), ensure_ascii=False)

    assert reencode_stored(stored) == encode_payload(value).encode()


# Payloads of plain types take a faster path through the C encoder; it must write the
# same text, and refuse the same things with the same message, as the general encoder.
_TEXT = st.text(alphabet=st.characters(codec=None), max_size=12) | st.sampled_from(
    ["", "a\x00b", "\\u0000", "a\udc80", "\u2028", "é", '"', "\\", "\n\t"]
)
_PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | _TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=16,
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | _TEXT
    | st.floats()
    | st.decimals()
    | st.sampled_from([Colour.RED, Size.BIG, uuid.UUID(int=7), dt.date(2026, 1, 2)])
)
_PAYLOADS = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(_TEXT, children, max_size=4)
        | st.dictionaries(st.integers(0, 3) | st.none(), children, min_size=1, max_size=2)
    ),
    max_leaves=16,
)


def _outcome(encode: Callable[[Any], str], value: Any) -> tuple[str, str]:
    try:
        return ("text", encode(value))
    except Exception as exc:  # the kind and message are what is compared
        return (type(exc).__name__, str(exc))


@settings(max_examples=500, deadline=None)
@given(value=_PLAIN | _PAYLOADS)
def test_encode_payload_plain_path_writes_what_the_general_encoder_writes(value: Any) -> None:
    assert _outcome(encode_payload, value) == _outcome(codec._encode_general, value)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ({"b": [1, True, None], "a": "é\n"}, '{"a":"é\\n","b":[1,true,null]}'),
        ({"a": "\\u0000"}, '{"a":"\\\\u0000"}'),
        ("\u2028", '"\u2028"'),
        ({"s": Colour.RED, "n": Size.BIG}, '{"n":2,"s":"red"}'),
    ],
)
def test_encode_payload_plain_and_enum_values(value: Any, text: str) -> None:
    assert encode_payload(value) == text


def test_encode_payload_shared_and_cyclic_containers() -> None:
    shared = {"x": 1}
    assert encode_payload({"a": shared, "b": shared}) == '{"a":{"x":1},"b":{"x":1}}'
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(EventEncodingError, match="contains itself"):
        encode_payload(cycle)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"k\x00": 1}, "NUL"),
        ({"a": ["x", "y\x00"]}, r"payload\.a\[1\]: string holds a NUL"),
        ({"a": {"b": "\ud800"}}, r"payload\.a\.b holds a character that is not valid"),
        ({"a": {None: 1}}, "key None is not a string"),
    ],
)
def test_encode_payload_plain_values_are_refused_with_their_path(value: Any, message: str) -> None:
    with pytest.raises(EventEncodingError, match=message):
        encode_payload(value)
