"""The admin API's token file: what it accepts, and what a broken or missing file does
to the tokens already read."""

import time
from pathlib import Path

import pytest

from somabrain.edges.admin.auth import InvalidTokens, TokenFile, parse_tokens

TOKEN = "t" * 32
OTHER = "o" * 32


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
    assert f"cannot read the admin API tokens {tokens.path}" in error
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
    time.sleep(0.01)  # past the file system's clock tick, so the change is seen
    tokens.path.write_text("tokens: []\n")

    with caplog.at_level("WARNING", logger="somabrain.edges.admin.auth"):
        assert tokens.caller(TOKEN) is None

    [warning] = [r.getMessage() for r in caplog.records]
    assert "lists no token: every token is revoked" in warning
    time.sleep(0.01)
    tokens.path.write_text("tokens: [\n")  # broken: the revocation stays in effect
    assert tokens.caller(TOKEN) is None
