"""Fixtures of the end-to-end tier: the operator on a real API server, run directly
(`job`) or installed by its Helm chart.

The chart's tests get an API server of their own (`chart_cluster`, a few seconds to
start). CRDs are cluster-wide and, once installed by a release, owned by it: Helm refuses
to adopt CRDs that the other tests apply straight from crds/, and those tests must not
see CRDs move under them either.

To run something under the chart's identity, take `operator_kubeconfig` (a kubeconfig of
the installed chart's ServiceAccount, for a process such as the operator that reads
KUBECONFIG), or `impersonating_client(...)` for API calls (tests/chart_support.py). Both
helpers take any admin kubeconfig, so they serve a release installed on the main stack too.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes import config as kube_config

from devenv import stack
from devenv.mainjob import MainJob
from tests.chart_support import CHART, Helm, write_service_account_kubeconfig
from tests.e2e.helpers import clean_up

# One release name for every test: after an uninstall the kept CRDs still name the release
# that installed them, and only a release of that name adopts them again without
# --take-ownership.
RELEASE = "somabrain-operator"
RELEASE_NAMESPACE = "somabrain-system"


@pytest.fixture
def job(stack_env: dict[str, str], tmp_path: Path) -> Iterator[MainJob]:
    """The operator running against the stack, and a namespace of the test's own."""
    namespace = f"e2e-{uuid.uuid4().hex[:8]}"
    job = MainJob(stack_env, work_dir=tmp_path, namespace=namespace)
    job.prepare([])
    job.start_operator(env={"SOMABRAIN_OPERATOR_PUBLISHER_REPORT_MAX_AGE_SECONDS": "8"})
    yield job
    job.stop_operator()
    clean_up(job)
    job.stop()


@dataclass(frozen=True)
class ChartCluster:
    """An API server for the chart's tests, its admin kubeconfig, and helm aimed at it."""

    kubeconfig: str
    helm: Helm
    api: client.ApiClient


@dataclass(frozen=True)
class Release:
    """An installed release of the chart."""

    name: str
    namespace: str
    # The chart names every object after the release ("somabrain-operator" contains the
    # chart's name, so it is used as is).
    service_account: str
    cluster: ChartCluster

    def upgrade(self, *options: str) -> None:
        self.cluster.helm.run("upgrade", self.name, str(CHART), "-n", self.namespace, *options)

    def uninstall(self) -> None:
        self.cluster.helm.run("uninstall", self.name, "-n", self.namespace, "--ignore-not-found")


@pytest.fixture(scope="session")
def chart_cluster(
    stack_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChartCluster]:
    state_dir = stack_dir.with_name(f"{stack_dir.name}-chart")
    env = stack.environment(stack.up(state_dir, only=("kube", "helm")))
    api = kube_config.new_client_from_config(config_file=env["KUBECONFIG"])  # type: ignore[no-untyped-call]
    helm = Helm(env["HELM"], home=tmp_path_factory.mktemp("helm"), kubeconfig=env["KUBECONFIG"])
    yield ChartCluster(kubeconfig=env["KUBECONFIG"], helm=helm, api=api)
    api.close()
    if os.environ.get("SOMABRAIN_TEST_KEEP_STACK") != "1":
        stack.down(state_dir)


@pytest.fixture
def install_chart(chart_cluster: ChartCluster) -> Iterator[Callable[..., Release]]:
    """Install the chart with extra helm options; the release is uninstalled afterwards
    (the CRDs, which Helm keeps, stay for the next test)."""
    installed: list[Release] = []

    def install(*options: str) -> Release:
        chart_cluster.helm.run(
            "install", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "--create-namespace",
            *options,
        )  # fmt: skip
        release = Release(RELEASE, RELEASE_NAMESPACE, RELEASE, chart_cluster)
        installed.append(release)
        return release

    yield install
    for release in installed:
        release.uninstall()


@pytest.fixture
def operator_release(install_chart: Callable[..., Release]) -> Release:
    """The chart installed with its default values."""
    return install_chart()


@pytest.fixture
def operator_kubeconfig(operator_release: Release, tmp_path: Path) -> Path:
    """A kubeconfig authenticating as the chart's ServiceAccount (a token valid for an hour)."""
    return write_service_account_kubeconfig(
        operator_release.cluster.kubeconfig,
        tmp_path / "operator.kubeconfig",
        namespace=operator_release.namespace,
        name=operator_release.service_account,
    )
