"""The operator at scale on the local API server, in one run: N Tenants to Ready, its
memory, its CPU and API writes once idle, and how fast a policy change reaches tenants.

Set-up: a namespace of its own per run (`bench-ops-<run>`), the CRDs, --policies
OutboxPolicies and N Tenants spread over them round-robin (deletionPolicy Retain, so
no finalizer), and the real operator process, `somabrain-operator`, started as the e2e
tests start it (database access), with the status loop every --status-interval s
(default 2, as in the e2e tests; the operator's own default is 10). No publisher runs,
so every Tenant's PublisherAvailable settles on False (NoReport). The stack has no
controller-manager: Deployments stay as applied (no ReplicaSets, no pods) and nothing
is garbage-collected.

Measured, from watches on the namespace (nothing is polled):
1. apply: the N Tenants applied by --threads client threads with server-side apply
   (as `kubectl apply --server-side`); converge: from the first apply until every
   Tenant is Ready for its generation (status.observedGeneration and the Ready
   condition's both equal metadata.generation) and has its Deployment. A Tenant that
   loses Ready again counts as not converged until it has it back.
2. memory: the operator's VmHWM from /proc at the end (the kernel's peak of resident
   memory), and VmRSS sampled every 100 ms.
3. idle CPU: the operator's user + system CPU seconds over the watch window divided by
   the window; the window starts once the namespace has had no write for --quiet s.
4. writes in steady state: watch events on Tenants, OutboxPolicies, Deployments,
   ConfigMaps, Services, ResourceQuotas and Events in the namespace during the window;
   and the write requests the operator's client sent in it (its own counter), which
   also catches writes that change nothing or are refused, and so make no event.
5. policy change: quotas.batchSize of the first OutboxPolicy raised by one; the time
   until the `tenants.yaml` of every one of its Tenants' ConfigMaps holds it.

Reference, same run, same client and threads, before the operator starts, in a
second namespace: the same N Tenants applied with no operator running (deleted again
before it starts). Time to converge divided by the time to apply the Tenants alone is
comparable between a busy machine and a quiet one. CPU seconds of the operator,
kube-apiserver, etcd, PostgreSQL and this process are given per phase: they share the
cpus.

With --profile, py-spy records the operator's stacks (raw format) while it converges
and while the policy change spreads (every thread's, --idle), and while idle (only
stacks on a cpu); the files are named in the result.
That slows the operator: a profiled run's figures are not the bench's.

Clean-up: the operator is stopped, then every object the run made in the two
namespaces is deleted, kind by kind. The namespaces themselves stay, empty: deleting
a namespace needs the controller-manager this stack has not. Results go to
bench/results/operator_scale.json. Run: `.venv/bin/python -m bench.operator_scale`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, watch
from kubernetes import config as kube_config
from prometheus_client.parser import text_string_to_metric_families
from somabrain_operator.children import TENANT_FILE, publisher_name

from bench.common import (
    ROOT,
    STATE_DIR,
    MemoryWatch,
    command_line,
    fresh_database,
    local_stack,
    machine,
    process_tree_cpu_seconds,
    progress,
    timestamp,
    write_result,
)
from devenv import common, stack
from devenv.mainjob import MainJob

RESULTS = ROOT / "bench" / "results" / "operator_scale.json"
GROUP, VERSION = "somabrain.io", "v1alpha1"
PLURALS = {"Tenant": "tenants", "OutboxPolicy": "outboxpolicies"}
WATCHED = ("Tenant", "OutboxPolicy", "Deployment", "ConfigMap", "Service", "ResourceQuota", "Event")
MANAGER = "bench-operator-scale"
APPLY = "application/apply-patch+yaml"
BATCH_SIZE = 100  # the first policy's quotas.batchSize; the change raises it by one
TARGETS = {
    "converge_seconds_for_1000_tenants": 60,
    "operator_peak_rss_mb": 200,
    "operator_idle_cpu_fraction": 0,
    "writes_per_minute_in_steady_state": 0,
}


# Manifests ----------------------------------------------------------------------------


def policy_manifest(name: str, batch_size: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "OutboxPolicy",
        "metadata": {"name": name},
        "spec": {"quotas": {"batchSize": batch_size, "maxInFlight": 10 * batch_size}},
    }


def tenant_manifest(name: str, policy: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {
            "tenantId": name,
            "policyRef": {"name": policy},
            "topics": [f"{name}.orders"],
            "publisher": {"mode": "dedicated"},
            "deletionPolicy": "Retain",
        },
    }


def tenant_names(count: int) -> list[str]:
    return [f"tenant-{i:05d}" for i in range(count)]


def policy_of(index: int, policies: int) -> str:
    return f"policy-{index % policies}"


# Applying -----------------------------------------------------------------------------


def apply(api: client.ApiClient, namespace: str, obj: dict[str, Any]) -> None:
    """Server-side apply of one Tenant or OutboxPolicy."""
    options: dict[str, Any] = {"field_manager": MANAGER, "force": True, "_content_type": APPLY}
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURALS[obj["kind"]], obj["metadata"]["name"], obj, **options
    )


@dataclasses.dataclass(frozen=True)
class Applied:
    started: float
    finished: float
    done_at: dict[str, float]

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def apply_all(
    api: client.ApiClient, namespace: str, objects: list[dict[str, Any]], *, threads: int
) -> Applied:
    """Apply the objects as fast as `threads` client threads can; when each was done."""
    done_at: dict[str, float] = {}

    def one(obj: dict[str, Any]) -> None:
        apply(api, namespace, obj)
        done_at[obj["metadata"]["name"]] = time.monotonic()

    started = time.monotonic()
    with ThreadPoolExecutor(threads, thread_name_prefix="apply") as pool:
        list(pool.map(one, objects))
    return Applied(started, time.monotonic(), done_at)


# Watching -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Seen:
    """One watch event: when this process received it, of which object, which type."""

    at: float
    kind: str
    type: str
    name: str


def lister(api: client.ApiClient, kind: str) -> Callable[..., Any]:
    """The namespaced list call of a kind, without a documented return type, so that
    watch events carry plain dicts (no model is built for each event)."""
    if kind in PLURALS:
        custom = client.CustomObjectsApi(api)

        def list_custom(namespace: str, **options: Any) -> Any:
            return custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURALS[kind], **options
            )

        return list_custom
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    typed: dict[str, Callable[..., Any]] = {
        "Deployment": apps.list_namespaced_deployment,
        "ConfigMap": core.list_namespaced_config_map,
        "Service": core.list_namespaced_service,
        "ResourceQuota": core.list_namespaced_resource_quota,
        "Event": core.list_namespaced_event,
    }
    method = typed[kind]

    def list_typed(namespace: str, **options: Any) -> Any:
        return method(namespace, **options)

    return list_typed


class Follow:
    """Every watch event of one kind in a namespace from now on, handed to `on_event`
    from a thread of its own, until stopped."""

    def __init__(
        self,
        api: client.ApiClient,
        kind: str,
        namespace: str,
        on_event: Callable[[Seen, dict[str, Any]], None],
    ) -> None:
        self.kind = kind
        self.namespace = namespace
        self.restarts = 0
        self.errors: list[str] = []
        self._list = lister(api, kind)
        self._on_event = on_event
        self._watch = watch.Watch()  # type: ignore[no-untyped-call]
        self._stopping = threading.Event()
        self._version = self._current_version()
        self._thread = threading.Thread(target=self._run, name=f"watch-{kind}", daemon=True)
        self._thread.start()

    def _current_version(self) -> str:
        response = self._list(self.namespace, limit=1, _preload_content=False)
        return str(json.loads(response.data)["metadata"]["resourceVersion"])

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._follow()
            except client.ApiException as exc:
                if exc.status != 410:
                    self.errors.append(f"{exc.status} {exc.reason}")
                    time.sleep(1)
                # Gone: a resourceVersion too old to resume from; events may be missed.
                self.restarts += 1
                self._version = self._current_version()
            except Exception as exc:  # the stream's socket is shut when stopping
                if self._stopping.is_set():
                    return
                self.errors.append(repr(exc))
                time.sleep(1)

    def _follow(self) -> None:
        stream = self._watch.stream(  # type: ignore[no-untyped-call]
            self._list, self.namespace, resource_version=self._version, timeout_seconds=3600
        )
        for event in stream:
            obj = event["object"]
            self._version = obj["metadata"]["resourceVersion"]
            seen = Seen(time.monotonic(), self.kind, event["type"], obj["metadata"]["name"])
            self._on_event(seen, obj)

    def stop(self) -> None:
        self._stopping.set()
        self._watch.stop()  # type: ignore[no-untyped-call]
        # The stream notices only at its next event; the thread is a daemon.
        self._thread.join(1)


def _tenants_yaml_batch_size(obj: dict[str, Any]) -> int | None:
    text = (obj.get("data") or {}).get(TENANT_FILE)
    if not text:
        return None
    entries = (yaml.safe_load(text) or {}).get("tenants") or {}
    sizes = [e.get("batch_size") for e in entries.values() if isinstance(e, dict)]
    return int(sizes[0]) if sizes and sizes[0] is not None else None


def _is_ready(obj: dict[str, Any]) -> bool:
    generation = obj["metadata"].get("generation")
    status = obj.get("status") or {}
    ready: dict[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {}
    )
    return (
        status.get("observedGeneration") == generation
        and ready.get("status") == "True"
        and ready.get("observedGeneration") == generation
        and (status.get("children") or {}).get("deployment")
        == publisher_name(obj["spec"]["tenantId"])
    )


class Namespace:
    """What the watches on the run's namespace showed: every event, and the state of
    the Tenants, policies, Deployments and ConfigMaps as of the latest one."""

    def __init__(self, tenants: Iterable[str]) -> None:
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.tenants = set(tenants)
        self.ready: set[str] = set()
        self.first_ready: dict[str, float] = {}
        self.lost_ready: set[str] = set()
        self.reporting: set[str] = set()  # has the status loop's PublisherAvailable
        self.deployments: set[str] = set()
        self.converged: set[str] = set()
        self.converged_at: float | None = None
        self.policies: dict[str, dict[str, Any]] = {}
        self.batch_size: dict[str, int | None] = {}
        self.batch_size_at: dict[str, float] = {}

    def on_event(self, seen: Seen, obj: dict[str, Any]) -> None:
        with self.lock:
            self.seen.append(seen)
            if seen.kind == "Tenant" and seen.name in self.tenants:
                self._tenant(seen, obj)
            elif seen.kind == "Deployment":
                self._deployment(seen)
            elif seen.kind == "ConfigMap":
                size = None if seen.type == "DELETED" else _tenants_yaml_batch_size(obj)
                if self.batch_size.get(seen.name) != size:
                    self.batch_size[seen.name] = size
                    self.batch_size_at[seen.name] = seen.at
            elif seen.kind == "OutboxPolicy":
                self.policies[seen.name] = obj

    def _tenant(self, seen: Seen, obj: dict[str, Any]) -> None:
        name = seen.name
        conditions = (obj.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "PublisherAvailable" for c in conditions):
            self.reporting.add(name)
        if seen.type != "DELETED" and _is_ready(obj):
            self.ready.add(name)
            self.first_ready.setdefault(name, seen.at)
        elif name in self.ready:
            self.ready.discard(name)
            self.lost_ready.add(name)
        self._update(name, seen.at)

    def _deployment(self, seen: Seen) -> None:
        if seen.type == "DELETED":
            self.deployments.discard(seen.name)
        else:
            self.deployments.add(seen.name)
        tenant = seen.name.removeprefix(publisher_name(""))
        if tenant in self.tenants:
            self._update(tenant, seen.at)

    def _update(self, tenant: str, at: float) -> None:
        if tenant in self.ready and publisher_name(tenant) in self.deployments:
            self.converged.add(tenant)
            if self.converged_at is None and self.converged == self.tenants:
                self.converged_at = at
        else:
            self.converged.discard(tenant)

    def last_event_at(self) -> float:
        with self.lock:
            return self.seen[-1].at if self.seen else 0.0

    def events_between(self, start: float, end: float) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if start <= s.at < end]

    def policy_ready(self, name: str) -> bool:
        obj = self.policies.get(name) or {}
        status = obj.get("status") or {}
        return bool(obj) and status.get("observedGeneration") == obj["metadata"].get("generation")

    def policy_count(self, name: str) -> int | None:
        count = ((self.policies.get(name) or {}).get("status") or {}).get("tenants")
        return None if count is None else int(count)


def wait_until(done: Callable[[], bool], *, timeout: float, alive: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        if not alive():
            raise SystemExit("the operator exited during the run; see its log")
        time.sleep(0.05)
    return done()


# What the processes used ----------------------------------------------------------------


class Usage:
    """CPU seconds of the processes that share the machine, read at phase boundaries."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.marks: list[tuple[str, dict[str, float]]] = []

    def now(self) -> dict[str, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        used = {name: process_tree_cpu_seconds(pid) for name, pid in self.pids.items()}
        return {**used, "bench_client": own.ru_utime + own.ru_stime}

    def mark(self, phase_end: str) -> None:
        self.marks.append((phase_end, self.now()))

    def by_phase(self) -> dict[str, dict[str, float]]:
        phases = {}
        for (_, before), (name, after) in itertools.pairwise(self.marks):
            phases[name] = {k: round(after[k] - before.get(k, 0.0), 2) for k in after}
        return phases


def reconciles(port: int) -> dict[str, float]:
    """The operator's own counters: reconciles by kind/trigger/outcome, status writes,
    its client's API requests by method and status."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "somabrain_operator_reconciles_total":
                key = f"{labels['kind']}/{labels['trigger']}/{labels['outcome']}"
            elif sample.name == "somabrain_operator_status_writes_total":
                key = f"status_writes/{labels['kind']}"
            elif sample.name == "somabrain_operator_reconcile_seconds_sum":
                key = f"reconcile_seconds_sum/{labels['kind']}"
            elif sample.name == "somabrain_operator_api_requests_total":
                key = f"api_requests/{labels['method']}/{labels['code']}"
            else:
                continue
            counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 3) for k, v in after.items() if v != before.get(k)}


class Profile:
    """py-spy recording the operator's stacks into a raw file until stopped: every
    thread's (`idle`), or only those running on a cpu."""

    def __init__(self, pid: int, path: Path, *, idle: bool = True) -> None:
        self.path = path
        exe = Path(sys.executable).with_name("py-spy")
        argv = [str(exe), "record", "--pid", str(pid), "--format", "raw"]
        argv += ["--idle"] if idle else []
        self.process = subprocess.Popen(
            [*argv, "--rate", "50", "--output", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return str(self.path)


# The phases -----------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 2)

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": round(ordered[-1], 2)}


def reference(
    api: client.ApiClient, namespace: str, count: int, threads: int, policies: int
) -> dict[str, Any]:
    """The same client applying the same N Tenants with no operator running."""
    progress(f"reference: applying {count} Tenants, no operator running ...")
    tenants = [
        tenant_manifest(n, policy_of(i, policies)) for i, n in enumerate(tenant_names(count))
    ]
    bare = apply_all(api, namespace, tenants, threads=threads)
    left = delete_all(api, namespace)
    if left:
        raise SystemExit(f"the reference objects could not all be deleted: {left} are left")
    return {
        "tenants_apply_seconds_without_operator": round(bare.seconds, 2),
        "tenants_per_second_without_operator": round(count / bare.seconds, 1),
    }


def converge(
    api: client.ApiClient,
    job: MainJob,
    seen: Namespace,
    *,
    count: int,
    policies: int,
    threads: int,
    timeout: float,
    alive: Callable[[], bool],
) -> dict[str, Any]:
    names = tenant_names(count)
    manifests = [tenant_manifest(n, policy_of(i, policies)) for i, n in enumerate(names)]
    progress(f"applying {count} Tenants with {threads} threads, the operator running ...")
    applied = apply_all(api, job.namespace, manifests, threads=threads)
    progress(f"applied in {applied.seconds:.1f} s; waiting for all to be Ready ...")
    wait_until(lambda: seen.converged_at is not None, timeout=timeout, alive=alive)
    with seen.lock:
        at, done = seen.converged_at, len(seen.converged)
        per_tenant = [
            seen.first_ready[n] - applied.done_at[n] for n in names if n in seen.first_ready
        ]
        lost = sorted(seen.lost_ready)
    figures: dict[str, Any] = {
        "apply_seconds": round(applied.seconds, 2),
        "tenants_applied_per_second": round(count / applied.seconds, 1),
        "converged": at is not None,
        "converged_tenants": done,
        "tenants_that_lost_ready_again": len(lost),
        "examples_lost_ready": lost[:5],
        "seconds_from_each_apply_to_its_first_ready": percentiles(per_tenant),
    }
    if at is not None:
        figures["converge_seconds_from_first_apply"] = round(at - applied.started, 2)
        figures["converge_seconds_after_last_apply"] = round(at - applied.finished, 2)
        figures["tenants_converged_per_second"] = round(count / (at - applied.started), 1)
    return figures


def settle(
    seen: Namespace,
    policies: int,
    count: int,
    *,
    quiet: float,
    timeout: float,
    alive: Callable[[], bool],
) -> dict[str, Any]:
    """Wait for the status loop's first reports and the policies' counts, then quiet."""
    started = time.monotonic()
    expected = {policy_of(p, policies): len(range(p, count, policies)) for p in range(policies)}

    def reported() -> bool:
        with seen.lock:
            counted = all(seen.policy_count(p) == n for p, n in expected.items())
            return counted and seen.reporting >= seen.tenants

    reports = wait_until(reported, timeout=timeout, alive=alive)
    calm = wait_until(
        lambda: time.monotonic() - seen.last_event_at() >= quiet,
        timeout=max(0.0, timeout - (time.monotonic() - started)),
        alive=alive,
    )
    return {
        "seconds": round(time.monotonic() - started, 2),
        "every_tenant_reported_and_policies_counted": reports,
        f"quiet_for_{quiet:g}_seconds": calm,
    }


def idle(seen: Namespace, operator_pid: int, seconds: float) -> dict[str, Any]:
    """The operator's CPU and the writes in the namespace while nothing changes."""
    cpu_before = process_tree_cpu_seconds(operator_pid)
    start = time.monotonic()
    time.sleep(seconds)
    end = time.monotonic()
    cpu = process_tree_cpu_seconds(operator_pid) - cpu_before
    time.sleep(1)  # events of the window's last moments still on their way
    writes = seen.events_between(start, end)
    by_kind = Counter(f"{s.kind} {s.type}" for s in writes)
    return {
        "window_seconds": round(end - start, 2),
        "operator_cpu_seconds": round(cpu, 3),
        "operator_cpu_fraction": round(cpu / (end - start), 4),
        "writes": len(writes),
        "writes_per_minute": round(60 * len(writes) / (end - start), 1),
        "writes_by_kind": dict(sorted(by_kind.items())),
        "examples": [f"{s.kind} {s.name} {s.type}" for s in writes[:10]],
    }


def change_policy(
    api: client.ApiClient,
    job: MainJob,
    seen: Namespace,
    *,
    count: int,
    policies: int,
    timeout: float,
    alive: Callable[[], bool],
) -> dict[str, Any]:
    """Raise the first policy's batchSize by one; time until each of its tenants'
    ConfigMaps holds it."""
    policy = policy_of(0, policies)
    targets = {publisher_name(n) for i, n in enumerate(tenant_names(count)) if i % policies == 0}
    new = BATCH_SIZE + 1
    progress(f"raising {policy}'s batchSize to {new} ({len(targets)} tenants) ...")
    start = time.monotonic()
    apply(api, job.namespace, policy_manifest(policy, new))

    def arrived() -> bool:
        with seen.lock:
            return all(seen.batch_size.get(cm) == new for cm in targets)

    complete = wait_until(arrived, timeout=timeout, alive=alive)
    with seen.lock:
        times = [seen.batch_size_at[cm] - start for cm in targets if seen.batch_size.get(cm) == new]
    end = start + max(times, default=0.0)
    time.sleep(2)
    during = seen.events_between(start, end + 2)
    others = {s.name for s in during if s.kind == "ConfigMap" and s.name not in targets}
    return {
        "policy": policy,
        "tenants": len(targets),
        "complete": complete,
        "config_maps_updated": len(times),
        "seconds_to_all": round(max(times), 2) if times else None,
        "seconds_per_config_map": percentiles(times),
        "config_maps_per_second": round(len(times) / max(times), 1) if times else None,
        "other_config_maps_written": len(others),
        "writes_by_kind_until_all_plus_2s": dict(
            sorted(Counter(f"{s.kind} {s.type}" for s in during).items())
        ),
    }


# Clean-up -------------------------------------------------------------------------------


def delete_all(api: client.ApiClient, namespace: str) -> dict[str, int]:
    """Delete every object of the kinds the run made in the namespace; what is left."""
    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    for plural in PLURALS.values():
        custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, plural)
    apps.delete_collection_namespaced_deployment(namespace)
    core.delete_collection_namespaced_config_map(namespace)
    core.delete_collection_namespaced_resource_quota(namespace)
    core.delete_collection_namespaced_event(namespace)
    core.delete_collection_namespaced_secret(namespace)
    core.delete_collection_namespaced_service(namespace)
    left = {}
    for kind in WATCHED:
        response = lister(api, kind)(namespace, _preload_content=False)
        left[kind] = len(json.loads(response.data)["items"])
    return {k: v for k, v in left.items() if v}


# The run --------------------------------------------------------------------------------


def api_client(kubeconfig: str) -> client.ApiClient:
    api: client.ApiClient = kube_config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig
    )
    return api


def stack_pids() -> dict[str, int]:
    running = stack.load(STATE_DIR)
    etcd, apiserver = running["kube"].pids[:2]
    return {"kube_apiserver": apiserver, "etcd": etcd, "postgres": running["postgres"].pids[0]}


def run(env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:6]
    work_dir = STATE_DIR / f"operator-scale-{run_id}"
    # No publisher runs: the broker address in the namespace's Secret is never used.
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", **env}
    job = MainJob(env, work_dir=work_dir, namespace=f"bench-ops-{run_id}")
    job.prepare([])
    api = api_client(env["KUBECONFIG"])
    api.configuration.connection_pool_maxsize = max(10, 2 * args.threads)
    ref_ns = f"bench-ref-{run_id}"
    client.CoreV1Api(api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=ref_ns))
    )
    usage = Usage(stack_pids())
    result: dict[str, Any] = {"namespace": job.namespace, "reference_namespace": ref_ns}
    try:
        usage.mark("start")
        result["reference"] = reference(api, ref_ns, args.tenants, args.threads, args.policies)
        usage.mark("reference")
        seen = Namespace(tenant_names(args.tenants))
        follows = [
            Follow(api_client(env["KUBECONFIG"]), kind, job.namespace, seen.on_event)
            for kind in WATCHED
        ]
        try:
            result |= operator_phases(api, job, seen, usage, args, work_dir)
        finally:
            job.stop()
            for follow in follows:
                follow.stop()
        result["watch_restarts"] = {f.kind: f.restarts for f in follows if f.restarts}
        result["watch_errors"] = {f.kind: f.errors[:3] for f in follows if f.errors}
        result["cpu_seconds_by_phase"] = usage.by_phase()
    finally:
        progress("cleaning up: deleting the run's objects ...")
        left = {ns: delete_all(api, ns) for ns in (job.namespace, ref_ns)}
        result["left_after_clean_up"] = {ns: kinds for ns, kinds in left.items() if kinds}
        api.close()  # type: ignore[no-untyped-call]
    return result


def operator_phases(
    api: client.ApiClient,
    job: MainJob,
    seen: Namespace,
    usage: Usage,
    args: argparse.Namespace,
    work_dir: Path,
) -> dict[str, Any]:
    policies = [
        policy_manifest(policy_of(p, args.policies), BATCH_SIZE) for p in range(args.policies)
    ]
    for policy in policies:
        apply(api, job.namespace, policy)
    port = common.free_port()
    pid = job.start_operator(
        "--metrics-port",
        str(port),
        env={"SOMABRAIN_OPERATOR_STATUS_INTERVAL_SECONDS": f"{args.status_interval:g}"},
    )
    memory = MemoryWatch(pid)
    usage.pids["operator"] = pid

    def alive() -> bool:
        return common.pid_alive(pid)

    progress(f"operator started (pid {pid}, log {work_dir / 'operator.log'}); waiting for it ...")
    names = [p["metadata"]["name"] for p in policies]
    if not wait_until(lambda: all(seen.policy_ready(n) for n in names), timeout=120, alive=alive):
        raise SystemExit("the operator did not reconcile the OutboxPolicies within 120 s")
    usage.mark("operator_start")
    out: dict[str, Any] = {
        "operator_pid": pid,
        "operator_log": str(work_dir / "operator.log"),
        "memory_with_no_tenant": {"vm_rss_mib": round((memory.status("VmRSS") or 0) / 1024, 1)},
    }
    counters = [reconciles(port)]

    profile = Profile(pid, work_dir / "stacks-converge.txt") if args.profile else None
    out["converge"] = converge(
        api,
        job,
        seen,
        count=args.tenants,
        policies=args.policies,
        threads=args.threads,
        timeout=args.timeout,
        alive=alive,
    )
    if profile:
        out["profile_converge"] = profile.stop()
    out["memory_at_converged"] = {"vm_rss_mib": round((memory.status("VmRSS") or 0) / 1024, 1)}
    usage.mark("converge")
    progress(f"converge: {out['converge']}")

    out["settle"] = settle(
        seen, args.policies, args.tenants, quiet=args.quiet, timeout=args.timeout, alive=alive
    )
    usage.mark("settle")
    counters.append(reconciles(port))
    progress(f"settled: {out['settle']}; watching for {args.watch_seconds:g} s ...")
    profile = Profile(pid, work_dir / "stacks-idle.txt", idle=False) if args.profile else None
    out["idle"] = idle(seen, pid, args.watch_seconds)
    if profile:
        out["profile_idle"] = profile.stop()
    usage.mark("idle")
    counters.append(reconciles(port))
    progress(f"idle: {out['idle']}")

    profile = Profile(pid, work_dir / "stacks-policy.txt") if args.profile else None
    out["policy_change"] = change_policy(
        api,
        job,
        seen,
        count=args.tenants,
        policies=args.policies,
        timeout=args.timeout,
        alive=alive,
    )
    if profile:
        out["profile_policy_change"] = profile.stop()
    usage.mark("policy_change")
    counters.append(reconciles(port))
    progress(f"policy change: {out['policy_change']}")
    out["memory"] = memory.stop()
    out["operator_counters_by_phase"] = dict(
        zip(
            ("converge_and_settle", "idle", "policy_change"),
            (_delta(b, a) for a, b in itertools.pairwise(counters)),
            strict=True,
        )
    )
    return out


WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def write_requests(result: dict[str, Any], phase: str) -> float:
    """Write requests the operator's client sent in a phase, whatever their answer: a
    write the API server refuses (409) or finds changes nothing makes no watch event."""
    counters = result.get("operator_counters_by_phase", {}).get(phase, {})
    writes = [
        v
        for k, v in counters.items()
        if k.startswith("api_requests/") and k.split("/")[1] in WRITE_METHODS
    ]
    return float(sum(writes))


def table(result: dict[str, Any]) -> str:
    """The figures against their targets, one line each."""
    conv, idle_, change = result["converge"], result["idle"], result["policy_change"]
    mem = result["memory"]
    rows = [
        ("apply N Tenants (s)", "-", conv["apply_seconds"]),
        (
            "reference: N Tenants, no operator (s)",
            "-",
            result["reference"]["tenants_apply_seconds_without_operator"],
        ),
        (
            "first apply to all Ready (s)",
            "<= 60 for 1,000",
            conv.get("converge_seconds_from_first_apply"),
        ),
        ("  ratio to the Tenant reference", "-", result["ratios"]["converge_vs_reference_tenants"]),
        ("operator peak RSS, VmHWM (MiB)", "<= 200 MB", mem["vm_hwm_mib"]),
        ("operator idle CPU (fraction of a cpu)", "~ 0", idle_["operator_cpu_fraction"]),
        ("writes per minute in steady state", "0", idle_["writes_per_minute"]),
        ("  write requests, refused ones too", "0", write_requests(result, "idle")),
        ("policy change to all its ConfigMaps (s)", "-", change["seconds_to_all"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'measure':<{width}}  {'target':<16}  measured", "-" * (width + 30)]
    lines += [f"{name:<{width}}  {target:<16}  {value}" for name, target, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.operator_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tenants", type=int, default=1000, help="Tenants to apply (default 1000)")
    parser.add_argument(
        "--watch-seconds",
        type=float,
        default=60.0,
        help="length of the steady-state window (default 60)",
    )
    parser.add_argument(
        "--policies",
        type=int,
        default=4,
        help="OutboxPolicies the Tenants are spread over (default 4)",
    )
    parser.add_argument(
        "--threads", type=int, default=4, help="client threads applying (default 4)"
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=5.0,
        help="seconds without a write before the window starts (default 5)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="longest wait for each phase, in seconds (default 900)",
    )
    parser.add_argument(
        "--status-interval",
        type=float,
        default=2.0,
        help="the operator's status loop interval in seconds (default 2, as the e2e tests; "
        "the operator's default is 10)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="record the operator's stacks with py-spy (slows it)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    # A run stopped by SIGTERM still stops the operator and deletes what it made.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: stopped by SIGTERM"))
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    started = timestamp()
    with (
        local_stack(["postgres", "kube"]) as running,
        fresh_database(running.env["DATABASE_URL"]) as database_url,
    ):
        figures = run({**running.env, "DATABASE_URL": database_url}, args)
    converged = figures["converge"].get("converge_seconds_from_first_apply")
    bare = figures["reference"]["tenants_apply_seconds_without_operator"]
    result = {
        "command": command_line("bench.operator_scale"),
        "started": started,
        "tenants": args.tenants,
        "policies": args.policies,
        "apply_threads": args.threads,
        "watch_seconds": args.watch_seconds,
        "status_interval_seconds": args.status_interval,
        "profiled": args.profile,
        "targets": TARGETS,
        **figures,
        "ratios": {
            "converge_vs_reference_tenants": None
            if converged is None
            else round(converged / bare, 2),
            "apply_with_operator_vs_without": round(figures["converge"]["apply_seconds"] / bare, 2),
        },
        "load_average_at_start_1_5_15": load_at_start,
        "machine": machine(),
    }
    write_result(args.output, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
