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
`run_operator` starts the operator itself as a pod of a release would run it, with the
database of the main stack's Postgres (`database_secret`, for `database.urlSecret.name`).
"""

from __future__ import annotations

import os
import re
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes import config as kube_config
from prometheus_client.parser import text_string_to_metric_families

from devenv import common, podrunner, stack
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


# --------------------------------------------------------------------------------------------
# The operator itself, as the chart's Deployment declares it
# --------------------------------------------------------------------------------------------

DATABASE_SECRET = "operator-database"


@dataclass
class OperatorProcess:
    """One operator process, run with the command, arguments and environment of the
    chart's Deployment, under the chart's ServiceAccount; it serves its metrics on
    `metrics_port` (added for the tests, as the chart serves none)."""

    name: str
    pid: int
    log_path: Path
    metrics_port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return common.pid_alive(self.pid)

    def wait_started(self, timeout: float = 60) -> None:
        common.wait_for_port(
            self.metrics_port, pid=self.pid, log_path=self.log_path, what=self.name,
            timeout=timeout,
        )  # fmt: skip

    def metric(self, name: str) -> float:
        """The sum of a counter's samples (every label set), from /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        )

    def reconciles(self) -> float:
        return self.metric("somabrain_operator_reconciles_total")

    def status_writes(self) -> float:
        return self.metric("somabrain_operator_status_writes_total")

    def peer(self) -> tuple[str, int] | None:
        """Its peering identity and priority, as it logged them at start."""
        found = re.search(r"peering under \S+ as (\S+), priority (-?\d+)", self.log())
        return (found[1], int(found[2])) if found else None

    def stop(self) -> None:
        common.stop_pid(self.pid)


@pytest.fixture(scope="session")
def operator_database_url(make_database: Callable[[], str]) -> str:
    """A migrated outbox database of the main stack's Postgres, for the operator's
    status loop."""
    from somabrain.store import migrate

    url = make_database()
    migrate.upgrade(url)
    return url


@pytest.fixture
def database_secret(chart_cluster: ChartCluster, operator_database_url: str) -> str:
    """The Secret, in the release namespace, that `database.urlSecret.name` names."""
    core = client.CoreV1Api(chart_cluster.api)
    try:
        core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=RELEASE_NAMESPACE))
        )
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name=DATABASE_SECRET),
        string_data={"DATABASE_URL": operator_database_url},
    )
    try:
        core.create_namespaced_secret(RELEASE_NAMESPACE, secret)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        core.replace_namespaced_secret(DATABASE_SECRET, RELEASE_NAMESPACE, secret)
    return DATABASE_SECRET


@pytest.fixture
def run_operator(
    chart_cluster: ChartCluster, tmp_path: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    """Start an operator process as a pod of the release would run: the Deployment's
    command and args, its environment resolved as the kubelet resolves it (Secret
    references included), and the ServiceAccount's credentials (`kubeconfig`, standing
    in for the mounted token). Every process is stopped afterwards."""
    started: list[OperatorProcess] = []
    core = client.CoreV1Api(chart_cluster.api)

    def run(
        release: Release, kubeconfig: Path, *extra_args: str, name: str = "operator"
    ) -> OperatorProcess:
        deployment = client.AppsV1Api(chart_cluster.api).read_namespaced_deployment(
            release.name, release.namespace
        )
        [container] = deployment.spec.template.spec.containers
        env = podrunner.resolve_env(core, release.namespace, container)
        env |= podrunner.base_environment() | {
            "KUBECONFIG": str(kubeconfig),
            # Faster than the default 10 s, for the tests.
            "SOMABRAIN_OPERATOR_STATUS_INTERVAL_SECONDS": "2",
        }
        port = common.free_port()
        argv = [*container.command, *(container.args or []), "--metrics-port", str(port)]
        log_path = tmp_path / f"{name}.log"
        pid = common.spawn([*argv, *extra_args], log_path=log_path, env=env, inherit_env=False)
        process = OperatorProcess(name, pid, log_path, port)
        started.append(process)
        return process

    yield run
    for process in started:
        process.stop()
