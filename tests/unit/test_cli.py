"""The command's errors are one FAILED: line and a non-zero exit, before any connection."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SOMABRAIN = str(Path(sys.executable).parent / "somabrain")


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SOMABRAIN, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )


def test_publisher_run_invalid_tenant_fails_with_the_rule() -> None:
    result = _run("publisher", "run", "--tenant", "Not_Valid")

    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("FAILED: invalid tenant id")


def test_publisher_run_invalid_setting_names_the_variable() -> None:
    result = _run("publisher", "run", "--tenant", "acme", SOMABRAIN_BATCH_SIZE="0")

    assert result.returncode == 2
    assert "SOMABRAIN_BATCH_SIZE" in result.stderr


def test_help_explains_each_command_with_an_example() -> None:
    result = _run("publisher", "run", "--help")

    assert result.returncode == 0
    assert "Example: somabrain publisher run --tenant acme" in result.stdout


def test_unreachable_database_is_one_failed_line_naming_the_setting() -> None:
    result = _run("db", "current", SOMABRAIN_DATABASE_URL="postgresql://x@127.0.0.1:1/db")

    assert result.returncode == 2
    assert result.stderr.startswith("FAILED: cannot reach the database")
    assert "SOMABRAIN_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_database_url_is_one_failed_line() -> None:
    result = _run("db", "current", SOMABRAIN_DATABASE_URL="nonsense")

    assert result.returncode == 2
    assert result.stderr.startswith("FAILED: SOMABRAIN_DATABASE_URL is not a database URL")


def test_publisher_help_lists_every_setting_with_its_default() -> None:
    result = _run("publisher", "run", "--help")

    assert "SOMABRAIN_BATCH_SIZE" in result.stdout
    assert "(default: 500)" in result.stdout
    assert "SOMABRAIN_DELIVERY_MODE" in result.stdout


def test_help_names_option_values_not_python_types() -> None:
    for command in ((), ("publisher", "run"), ("db", "upgrade")):
        result = _run(*command, "--help")

        assert result.returncode == 0
        assert "<bool>" not in result.stdout
        assert "list[str]" not in result.stdout
    assert "--tenant TENANT" in _run("publisher", "run", "--help").stdout


def test_every_outbox_command_has_help_with_an_example_and_option_metavars() -> None:
    for command in ("stats", "list", "show", "replay", "purge", "check"):
        result = _run("outbox", command, "--help")

        assert result.returncode == 0, result.stderr
        assert f"Example: somabrain outbox {command}" in result.stdout
        assert "<bool>" not in result.stdout
        assert "list[str]" not in result.stdout
    assert "--state STATE" in _run("outbox", "list", "--help").stdout
    assert "--id EVENT_ID" in _run("outbox", "replay", "--help").stdout


def _commands() -> tuple[list[list[str]], list[list[str]]]:
    """Every command of `somabrain` as its words: those that do something, and the
    groups of them (`somabrain` itself the first)."""
    import typer.main

    from somabrain.edges.cli import app

    leaves: list[list[str]] = []
    groups: list[list[str]] = []

    def walk(command: Any, words: list[str]) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            groups.append(words)
            for name, sub in subcommands.items():
                walk(sub, [*words, name])
        else:
            leaves.append(words)

    walk(typer.main.get_command(app), [])
    return leaves, groups


def _assert_help_has_an_example_of(words: list[str]) -> None:
    result = _run(*words, "--help")

    assert result.returncode == 0, (words, result.stderr)
    example = result.stdout.split("Example", 1)
    assert len(example) == 2, (words, result.stdout)
    assert f"somabrain {' '.join(words)}".strip() in example[1], words
    assert "<bool>" not in result.stdout, words
    assert "list[str]" not in result.stdout, words


def test_every_command_has_help_with_an_example_of_itself() -> None:
    commands, _ = _commands()
    assert ["journal", "migrate"] in commands
    assert ["admin", "serve"] in commands
    for words in commands:
        _assert_help_has_an_example_of(words)


def test_every_command_group_has_help_with_an_example_of_one_of_its_commands() -> None:
    _, groups = _commands()
    assert [] in groups
    assert ["outbox"] in groups
    assert ["db"] in groups
    for words in groups:
        _assert_help_has_an_example_of(words)
