"""A missing tool stops the stack with one line saying what is missing and how to get it."""

from __future__ import annotations

from pathlib import Path

import pytest

from devenv import common, helm, kafka, kube, prometheus
from devenv.common import MissingPrerequisite


@pytest.fixture
def empty_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))


@pytest.mark.usefixtures("empty_machine")
def test_kafka_without_maven_says_how_to_install_it() -> None:
    with pytest.raises(MissingPrerequisite) as missing:
        kafka.ensure_installed()

    message = str(missing.value)
    assert "'mvn' is not on PATH" in message
    assert "apt-get install maven" in message
    assert "\n" not in message


@pytest.mark.usefixtures("empty_machine")
def test_kube_without_go_says_how_to_install_it() -> None:
    with pytest.raises(MissingPrerequisite) as missing:
        kube.ensure_installed()

    message = str(missing.value)
    assert "'go' is not on PATH" in message
    assert "\n" not in message


@pytest.mark.usefixtures("empty_machine")
def test_prometheus_without_go_says_how_to_install_it() -> None:
    with pytest.raises(MissingPrerequisite) as missing:
        prometheus.ensure_installed()

    message = str(missing.value)
    assert "'go' is not on PATH" in message
    assert "apt-get install golang" in message
    assert "\n" not in message


@pytest.mark.usefixtures("empty_machine")
def test_helm_without_go_says_how_to_install_it() -> None:
    with pytest.raises(MissingPrerequisite) as missing:
        helm.ensure_installed()

    message = str(missing.value)
    assert "'go' is not on PATH" in message
    assert "apt-get install golang" in message
    assert "\n" not in message
