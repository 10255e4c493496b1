"""The admin API's token file: what it accepts, and what a broken or missing file does
to the tokens already read."""

import os
import threading
from pathlib import Path

import pytest

from somabrain.edges.admin.auth import InvalidTokens, TokenFile, parse_tokens

TOKEN = "t" * 32
OTHER = "o" * 32
SECRET = "s3cr3t-PROD-token-0123456789"


@pytest.mark.parametrize("value", ['"yes"', '"true"', "1", '"false"'])
def test_parse_tokens_admin_not_a_yaml_boolean_is_refused(value: str) -> None:
    text = f"tokens: [{{name: a, token: {TOKEN}, admin: {value}}}]"

    with pytest.raises(InvalidTokens, match=r"tokens\.0\.admin: Input should be a valid boolean"):
        parse_tokens(text, source="tokens.yaml")


def _token_file(tmp_path: Path) -> TokenFile:
    path = tmp_path / "tokens.yaml"
    path.write_text(f"tokens: [{{name: a, token: {TOKEN}, admin: true}}]")
    return TokenFile(path)


def test_token_file_gone_keeps_the_tokens_and_logs_one_error_until_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = _token_file(tmp_path)
    tokens.path.unlink()

    with caplog.at_level("INFO", logger="somabrain.edges.admin.auth"):
        assert tokens.caller(TOKEN) is not None
        assert tokens.caller(TOKEN) is not None
        tokens.path.write_text(f"tokens: [{{name: b, token: {OTHER}, admin: true}}]")
        assert tokens.caller(OTHER) is not None
        tokens.path.unlink()
        assert tokens.caller(OTHER) is not None

    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"admin API tokens file {tokens.path} cannot be read")
    assert "the 1 tokens read before stay in effect: restore the file" in errors[0]
    assert tokens.caller(TOKEN) is None


def test_token_file_unreadable_keeps_the_tokens_and_logs_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = _token_file(tmp_path)
    tokens.path.unlink()
    tokens.path.mkdir()  # there, but not a file anyone can read tokens from

    with caplog.at_level("ERROR", logger="somabrain.edges.admin.auth"):
        assert tokens.caller(TOKEN) is not None

    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert f"admin API tokens file {tokens.path} cannot be read (Is a directory)" in error
    assert "the 1 tokens read before stay in effect" in error


def test_token_file_listing_no_token_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("tokens: []\n")

    with pytest.raises(InvalidTokens, match=r"lists no token; .* never runs open"):
        TokenFile(path)


def test_token_file_changed_to_list_no_token_revokes_every_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = _token_file(tmp_path)
    tokens.path.write_text("tokens: []\n")

    with caplog.at_level("WARNING", logger="somabrain.edges.admin.auth"):
        assert tokens.caller(TOKEN) is None

    [warning] = [r.getMessage() for r in caplog.records]
    assert "lists no token: every token is revoked" in warning
    tokens.path.write_text("tokens: [\n")  # broken: the revocation stays in effect
    assert tokens.caller(TOKEN) is None


def test_token_file_rewritten_in_place_takes_effect_even_seen_half_written(
    tmp_path: Path,
) -> None:
    tokens = _token_file(tmp_path)
    before = tokens.path.stat()
    # `echo 'tokens: []' > tokens.yaml`: truncated, then written, with a request in
    # between; the modification time set back as a coarse file system clock leaves it.
    tokens.path.write_bytes(b"")
    assert tokens.caller(TOKEN) is not None  # an empty file is not taken
    tokens.path.write_text("tokens: []\n")
    os.utime(tokens.path, ns=(before.st_atime_ns, before.st_mtime_ns))

    assert tokens.caller(TOKEN) is None


@pytest.mark.parametrize(
    "text",
    [
        f'tokens: [{{name: a, token: "{SECRET}, admin: true}}]',  # a quote not closed
        f"tokens:\n  - name: a\n    token: {TOKEN}\n    admin: true\n  {SECRET}\n",
        f"tokens: [{{name: a, {SECRET}: x, admin: true}}]",  # the token where a key goes
    ],
)
def test_an_invalid_token_file_is_reported_without_quoting_it(text: str) -> None:
    with pytest.raises(InvalidTokens) as refused:
        parse_tokens(text, source="tokens.yaml")

    assert SECRET not in str(refused.value)
    assert refused.value.__cause__ is None
    assert refused.value.__suppress_context__  # nor in a traceback's chained exception


def test_a_token_file_not_utf8_is_refused_at_start_and_ignored_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    latin1 = f"tokens: [{{name: caf\xe9, token: {OTHER}, admin: true}}]".encode("latin-1")
    path = tmp_path / "start.yaml"
    path.write_bytes(latin1)
    with pytest.raises(InvalidTokens, match=r"start\.yaml is not UTF-8 text \(byte 20 is not\)"):
        TokenFile(path)

    tokens = _token_file(tmp_path)
    tokens.path.write_bytes(latin1)
    with caplog.at_level("ERROR", logger="somabrain.edges.admin.auth"):
        assert tokens.caller(TOKEN) is not None
        assert tokens.caller(TOKEN) is not None
    [error] = [r.getMessage() for r in caplog.records]
    assert "is not UTF-8 text" in error
    assert "the 1 tokens read before stay in effect" in error


def test_a_changed_token_file_is_logged_once_however_many_requests_find_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = _token_file(tmp_path)
    tokens.path.write_text("tokens: [")
    start = threading.Barrier(8)
    found: list[object] = []

    def request() -> None:
        start.wait()
        found.append(tokens.caller(TOKEN))

    with caplog.at_level("ERROR", logger="somabrain.edges.admin.auth"):
        threads = [threading.Thread(target=request) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    assert len(found) == 8
    assert None not in found  # the tokens read before served every request
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("token", ["p\xe4ssw\xf6rd-" + "x" * 20, "with a space " + "x" * 20])
def test_a_token_an_http_header_cannot_carry_is_refused(token: str) -> None:
    text = f'tokens: [{{name: a, token: "{token}", admin: true}}]'

    with pytest.raises(InvalidTokens, match=r"tokens\.0\.token: .*printable ASCII without spaces"):
        parse_tokens(text, source="tokens.yaml")
