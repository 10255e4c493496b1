"""devenv's cached Go builds: built when a binary is missing, and only then."""

from pathlib import Path

from devenv import gobuild


def _put(bin_dir: Path, name: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o700)


def test_missing_binaries_are_built_once_and_then_reused(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(bin_dir: Path) -> None:
        calls.append(bin_dir)
        _put(bin_dir, "a")
        _put(bin_dir, "b")

    first = gobuild.build_once(tmp_path / "tool", ["a", "b"], build)
    again = gobuild.build_once(tmp_path / "tool", ["a", "b"], build)

    assert first == again == tmp_path / "tool" / "bin"
    assert calls == [first]


def test_one_binary_missing_builds_again(tmp_path: Path) -> None:
    bin_dir = tmp_path / "tool" / "bin"
    bin_dir.mkdir(parents=True)
    _put(bin_dir, "a")
    built: list[str] = []

    gobuild.build_once(tmp_path / "tool", ["a", "b"], lambda d: (built.append("b"), _put(d, "b")))

    assert built == ["b"]
