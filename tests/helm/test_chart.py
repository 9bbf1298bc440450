"""The Helm chart: rendered by Helm's Go engine, linted, validated against the Kubernetes
schemas, and checked for the facts the mesh depends on (ranks, addresses, flags, probes, GPUs).

Mesh shape in the chart: per replica, a StatefulSet of `pp` pods (pod s = pipeline stage s),
each running the stage's `tp` ranks as processes; see docs/deploy.md.
"""

from __future__ import annotations

import itertools
import json

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from gateway.settings import GatewaySettings
from services.scheduler.server import SchedulerSettings
from services.scheduler.speculative import SpeculativeConfig
from services.worker.settings import WorkerSettings
from tests.helm.chart import (CHART, FULLNAME, KUBE_VERSION, NAMESPACE, RELEASE, container, env_of,
                              expand, flag, lint, render)
from tests.helm.pods import start_worker_pod

CASES = {
    "defaults": {},
    "tp2-pp2-dp2-gpu": {"tp": 2, "pp": 2, "replicas": 2, "gpu": {"enabled": True}},
    "external-redis": {"redis": {"enabled": False, "url": "redis://redis.infra:6379/3"}},
    "api-keys": {"gateway": {"apiKeys": {"enabled": True, "keys": ["k1", "k2"]}}},
    "rdma": {"tp": 8, "pp": 2, "gpu": {"enabled": True}, "securityContext": {
        "capabilities": {"add": ["SYS_PTRACE"]}}, "rdma": {
        "enabled": True, "ucxTls": "rc,cuda_copy,cuda_ipc", "ucxNetDevices": "mlx5_0:1",
        "ncclIbHca": "mlx5", "ncclSocketIfname": "eth0"}},
    "gateway-hpa": {"gateway": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
                                "resources": {"requests": {"cpu": "2"}}}},
    "redis-auth": {"redis": {"auth": {"enabled": True, "existingSecret": "meshserve-redis"}}},
    "network-policy-no-http": {"networkPolicy": {"enabled": True, "extraIngressFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
        "gateway": {"httpPort": -1}, "podDisruptionBudget": {"maxUnavailable": 2}},
    "tp4-pp3-model": {"tp": 4, "pp": 3, "gpu": {"enabled": True, "runtimeClassName": "nvidia"},
                      "model": {"path": "/models/Llama-3.1-70B", "volume": {
                          "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}},
                      "worker": {"layerSplit": [26, 28, 26], "resources": {"limits": {
                          "cpu": 8, "memory": "64Gi"}}, "tolerations": [
                          {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
}
SHAPE = {"defaults": (1, 1, 1), "tp2-pp2-dp2-gpu": (2, 2, 2), "external-redis": (1, 1, 1),
         "api-keys": (1, 1, 1), "tp4-pp3-model": (4, 3, 1),
         "network-policy-no-http": (1, 1, 1), "redis-auth": (1, 1, 1),
         "rdma": (8, 2, 1), "gateway-hpa": (1, 1, 1)}  # (tp, pp, replicas)
POD_ENV = {"POD_IP": "10.1.2.3", "REDIS_URL": "redis://from-secret:6379/0"}


@pytest.fixture(scope="module")
def rendered():
    return {case: render(values) for case, values in CASES.items()}


def workers_of(r, replica: int) -> tuple[dict, dict, dict]:
    """(StatefulSet, headless Service, scheduler Deployment) of one replica."""
    name = f"{FULLNAME}-r{replica}-worker"
    return (r.get("StatefulSet", name), r.get("Service", name),
            r.get("Deployment", f"{FULLNAME}-r{replica}-scheduler"))


def scheduler_args(deployment: dict) -> list[str]:
    c = container(deployment, "scheduler")
    return expand(c["args"], POD_ENV)


# -- the chart is well formed -----------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_lint_passes_strict(case):
    report = lint(CASES[case])
    assert report["errors"] == []
    # severity 2 = warning, 3 = error; 1 is Helm's "icon is recommended" info
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", CASES)
def test_every_manifest_is_valid_kubernetes(rendered, case):
    r = rendered[case]
    kinds = sorted({d["kind"] for d in r.docs})
    assert {"ConfigMap", "Deployment", "Service", "StatefulSet"} <= set(kinds)
    for doc in r.docs:
        # strict: an unknown field (a typo, a field from another version) is an error too
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        assert doc["metadata"].get("namespace") in (None, NAMESPACE)
        assert len(doc["metadata"]["name"]) <= 63
    names = [(d["kind"], d["metadata"]["name"]) for d in r.docs]
    assert len(names) == len(set(names))


def test_long_release_names_still_fit():
    r = render({"tp": 2, "pp": 2, "replicas": 12}, name="a-very-long-release-name-for-a-team-" * 2)
    for sts in r.of_kind("StatefulSet"):  # the workers' and Redis'
        # pods carry controller-revision-hash=<name>-<10 chars>, a label value: 63 at most
        assert len(sts["metadata"]["name"]) + 11 <= 63
    for doc in r.docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


# -- the mesh: pods, ranks, addresses -------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_each_replica_has_pp_stage_pods_of_tp_ranks(rendered, case):
    tp, pp, replicas = SHAPE[case]
    r = rendered[case]
    assert len(r.worker_sets()) == replicas
    assert len([d for d in r.of_kind("Deployment") if "scheduler" in d["metadata"]["name"]]) \
        == replicas
    for i in range(replicas):
        sts, svc, _ = workers_of(r, i)
        assert sts["spec"]["replicas"] == pp
        assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
        pod_labels = sts["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        env = env_of(container(sts, "worker"))
        assert (env["TP_SIZE"]["value"], env["PP_SIZE"]["value"]) == (str(tp), str(pp))
        named = {p["name"]: p["containerPort"] for p in container(sts, "worker")["ports"]}
        ports = [named[f"rank-{rank}"] for rank in range(tp)]
        assert ports == [50061 + rank for rank in range(tp)]
        assert [named[f"metrics-{rank}"] for rank in range(tp)] == [9100 + r for r in range(tp)]
        assert len(named) == 2 * tp
        assert [p["port"] for p in svc["spec"]["ports"]] == ports
    # no two replicas select each other's pods
    selectors = [tuple(sorted(workers_of(r, i)[1]["spec"]["selector"].items()))
                 for i in range(replicas)]
    assert len(set(selectors)) == replicas


@pytest.mark.parametrize("case", ["defaults", "tp2-pp2-dp2-gpu", "tp4-pp3-model"])
def test_worker_processes_cover_the_grid_and_match_the_scheduler(rendered, case, tmp_path):
    """Runs every worker pod's entrypoint (a stand-in `meshserve` records each process's argv),
    parses each argv with the worker's real CLI, and checks: tp*pp processes per replica, one
    per (pp_rank, tp_rank); the stage's ranks share one rendezvous; and the scheduler's
    --workers names exactly these processes (pod DNS name, port)."""
    tp, pp, replicas = SHAPE[case]
    r = rendered[case]
    for i in range(replicas):
        sts, svc, scheduler = workers_of(r, i)
        sts_name = sts["metadata"]["name"]
        listening = set()
        grid = set()
        for ordinal in range(sts["spec"]["replicas"]):
            pod = start_worker_pod(r, sts_name, ordinal, tmp_path / f"r{i}")
            try:
                argvs = pod.wait_for(tp)
                assert pod.stop() == 0  # SIGTERM reaches every rank and the pod exits cleanly
            finally:
                pod.kill()
            assert len(argvs) == tp
            settings = [WorkerSettings.from_args(argv[1:]) for argv in argvs]
            assert all(argv[0] == "worker" for argv in argvs)
            assert {s.dist_init for s in settings} == {"tcp://127.0.0.1:29500"}
            for s in settings:
                assert (s.tp_size, s.pp_size, s.pp_rank, s.host) == (tp, pp, ordinal, "0.0.0.0")
                assert s.port == 50061 + s.tp_rank
                grid.add((s.pp_rank, s.tp_rank))
                host = f"{sts_name}-{ordinal}.{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
                listening.add(f"{host}:{s.port}")
        assert grid == set(itertools.product(range(pp), range(tp)))
        workers = flag(scheduler_args(scheduler), "--workers").split(",")
        assert len(workers) == len(set(workers)) == tp * pp
        assert set(workers) == listening
        waits_for = container(scheduler, "wait-for-workers", init=True)["args"]
        assert waits_for == workers


def test_layer_split_and_model_reach_every_worker(rendered, tmp_path):
    r = rendered["tp4-pp3-model"]
    sts, _, _ = workers_of(r, 0)
    pod = start_worker_pod(r, sts["metadata"]["name"], 2, tmp_path)
    try:
        argvs = pod.wait_for(4)
        pod.stop()
    finally:
        pod.kill()
    for argv in argvs:
        s = WorkerSettings.from_args(argv[1:])
        assert s.layer_split == (26, 28, 26)
        assert s.model == "/models/Llama-3.1-70B"
    spec = sts["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in container(sts, "worker")["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"]
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "models"
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"


# -- flags: values map one to one onto the services' settings -------------------------------------

NON_DEFAULT = {
    "gateway": {"port": 7000, "httpPort": 7080, "maxInflightRequests": 17, "refreshPeriod": 1.25,
                "maxAttempts": 5, "requestClaimTtl": 90.5, "streamInterval": 6},
    "scheduler": {"port": 7001, "modelName": "llama", "maxNumSeqs": 9, "maxNumBatchedTokens": 1024,
                  "chunkedPrefill": False, "prefixCaching": False, "heartbeatTtl": 7.5,
                  "maxInflightSteps": 4, "metricsPort": 7002,
                  "speculativeConfig": {"method": "ngram", "num_speculative_tokens": 3,
                                        "prompt_lookup_max": 2}},
    "worker": {"port": 7100, "distInitPort": 7099, "metricsPort": 7200, "device": "cpu", "dtype": "bfloat16",
               "blockSize": 32, "numKvBlocks": 1000000, "kvCacheMemoryGb": 1.5,
               "maxModelLen": 4096, "numThreads": 2},
    "model": {"path": "/models/m"},
    "redis": {"enabled": False, "url": "redis://r:1/2"},
}


def test_values_map_onto_the_cli_settings(tmp_path):
    r = render(NON_DEFAULT)
    gateway = GatewaySettings.from_args(
        expand(container(r.get("Deployment", f"{FULLNAME}-gateway"), "gateway")["args"][1:],
               POD_ENV))
    assert gateway == GatewaySettings(
        redis_url="redis://r:1/2", model="/models/m", host="0.0.0.0", port=7000,
        max_inflight_requests=17, refresh_period_s=1.25, max_attempts=5,
        request_claim_ttl_s=90.5, http_port=7080, stream_interval=6)

    sts, _, scheduler = workers_of(r, 0)
    args = scheduler_args(scheduler)
    assert args[0] == "scheduler"
    s = SchedulerSettings.from_args(args[1:])
    host = f"{sts['metadata']['name']}-0.{sts['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local"
    assert s == SchedulerSettings(
        workers=(f"{host}:7100",), redis_url="redis://r:1/2", host="0.0.0.0", port=7001,
        advertise_host="10.1.2.3", replica_id=f"{FULLNAME}-r0-scheduler", model_name="llama",
        max_num_seqs=9, max_num_batched_tokens=1024, enable_chunked_prefill=False,
        enable_prefix_caching=False, heartbeat_ttl_s=7.5, max_inflight_steps=4, metrics_port=7002,
        speculative=SpeculativeConfig("ngram", num_speculative_tokens=3, prompt_lookup_max=2))

    pod = start_worker_pod(r, sts["metadata"]["name"], 0, tmp_path)
    try:
        (argv,) = pod.wait_for(1)
        pod.stop()
    finally:
        pod.kill()
    w = WorkerSettings.from_args(argv[1:])
    assert w == WorkerSettings(
        model="/models/m", tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
        dist_init="tcp://127.0.0.1:7099", host="0.0.0.0", port=7100, device="cpu",
        dtype="bfloat16", block_size=32, num_kv_blocks=1000000, kv_cache_memory_gb=1.5,
        max_model_len=4096, num_threads=2, metrics_port=7200, num_speculative_tokens=3)


def test_defaults_match_the_cli_defaults(rendered, tmp_path):
    """Every value the chart passes by default is the service's own default, except the
    addresses and ports the chart decides (metrics ports: a pod has fixed ones)."""
    r = rendered["defaults"]
    gateway = GatewaySettings.from_args(
        container(r.get("Deployment", f"{FULLNAME}-gateway"), "gateway")["args"][1:])
    cli = GatewaySettings.from_args(["--redis-url", gateway.redis_url, "--host", "0.0.0.0"])
    assert gateway == cli
    _, _, scheduler = workers_of(r, 0)
    s = SchedulerSettings.from_args(scheduler_args(scheduler)[1:])
    cli = SchedulerSettings.from_args(["--workers", ",".join(s.workers), "--redis-url",
                                       s.redis_url, "--host", "0.0.0.0", "--port", "50052",
                                       "--advertise-host", "10.1.2.3", "--replica-id",
                                       s.replica_id, "--metrics-port", "9090"])
    assert s == cli
    sts, _, _ = workers_of(r, 0)
    pod = start_worker_pod(r, sts["metadata"]["name"], 0, tmp_path)
    try:
        (argv,) = pod.wait_for(1)
        pod.stop()
    finally:
        pod.kill()
    w = WorkerSettings.from_args(argv[1:])
    cli = WorkerSettings.from_args(["--dist-init", "tcp://127.0.0.1:29500", "--host", "0.0.0.0",
                                    "--port", "50061", "--metrics-port", "9100"])
    assert w == cli


def test_scheduler_readiness_is_its_grpc_health(rendered):
    *_, deployment = workers_of(rendered["defaults"], 0)
    c = container(deployment, "scheduler")
    probe = c["readinessProbe"]["grpc"]
    assert probe == {"port": int(flag(c["args"], "--port")),
                     "service": "meshserve.internal.v1.Scheduler"}


def test_a_replica_drains_within_its_pods_grace(rendered):
    """Kubernetes waits terminationGracePeriodSeconds before SIGKILL: longer than the drain."""
    sts, _, deployment = workers_of(rendered["defaults"], 0)
    for workload, name in ((sts, "worker"), (deployment, "scheduler")):
        c = container(workload, name)
        assert flag(c["args"], "--drain-timeout") == "60"
        assert workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90


# -- gateway, redis, keys, GPUs -------------------------------------------------------------------

def test_gateway_probes_are_grpc_health(rendered):
    deployment = rendered["defaults"].get("Deployment", f"{FULLNAME}-gateway")
    c = container(deployment, "gateway")
    port = flag(c["args"], "--port")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert set(c[probe]) - {"periodSeconds", "failureThreshold"} == {"grpc"}, probe
        assert c[probe]["grpc"]["port"] == int(port)
    assert c["readinessProbe"]["grpc"]["service"] == "meshserve.v1.Generation"
    assert "service" not in c["livenessProbe"]["grpc"]  # "" = the whole server
    svc = rendered["defaults"].get("Service", f"{FULLNAME}-gateway")
    assert svc["spec"]["ports"][0] == {"name": "grpc", "port": int(port), "targetPort": "grpc",
                                       "appProtocol": "grpc"}
    assert c["ports"][0] == {"name": "grpc", "containerPort": int(port)}


def test_gpu_resource_only_with_gpu_on(rendered):
    for case in ("defaults", "external-redis", "api-keys"):
        assert "nvidia.com/gpu" not in rendered[case].text
        assert "NCCL_" not in rendered[case].text
    for case in ("tp2-pp2-dp2-gpu", "tp4-pp3-model"):
        tp = SHAPE[case][0]
        r = rendered[case]
        for doc in r.of_kind("Deployment"):  # gateway, schedulers, redis: no GPU
            for c in doc["spec"]["template"]["spec"]["containers"]:
                assert "nvidia.com/gpu" not in str(c.get("resources", {}))
        for sts in r.worker_sets():
            c = container(sts, "worker")
            assert c["resources"]["limits"]["nvidia.com/gpu"] == tp  # one GPU per TP rank
            assert "nvidia.com/gpu" not in c["resources"].get("requests", {})
            assert env_of(c)["NCCL_DEBUG"]["value"] == "WARN"
    limits = container(rendered["tp4-pp3-model"].worker_sets()[0], "worker")[
        "resources"]["limits"]
    assert limits == {"cpu": 8, "memory": "64Gi", "nvidia.com/gpu": 4}  # merged with the user's


def test_shared_memory_is_sized_for_nccl_and_ucx(rendered):
    sts = rendered["tp2-pp2-dp2-gpu"].worker_sets()[0]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(sts, "worker")["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}


def redis_urls(r) -> set[str]:
    urls = {flag(container(d, "gateway")["args"], "--redis-url")
            for d in r.of_kind("Deployment") if d["metadata"]["name"].endswith("-gateway")}
    urls |= {flag(container(d, "scheduler")["args"], "--redis-url")
             for d in r.of_kind("Deployment") if d["metadata"]["name"].endswith("-scheduler")}
    return urls


def test_rdma_gives_worker_pods_devices_ipc_lock_and_the_transports(rendered):
    (sts,) = rendered["rdma"].worker_sets()
    c = container(sts, "worker")
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 8, "rdma/hca": 1}
    assert c["securityContext"]["capabilities"]["add"] == ["SYS_PTRACE", "IPC_LOCK"]
    env = {k: e["value"] for k, e in env_of(c).items() if "value" in e}
    assert {k: env[k] for k in ("UCX_TLS", "UCX_NET_DEVICES", "NCCL_IB_HCA",
                                "NCCL_SOCKET_IFNAME")} == {
        "UCX_TLS": "rc,cuda_copy,cuda_ipc", "UCX_NET_DEVICES": "mlx5_0:1", "NCCL_IB_HCA": "mlx5",
        "NCCL_SOCKET_IFNAME": "eth0"}
    _, _, scheduler = workers_of(rendered["rdma"], 0)  # no GPU, no RDMA on the scheduler
    assert "resources" not in container(scheduler, "scheduler")
    (plain,) = rendered["defaults"].worker_sets()
    assert "securityContext" not in container(plain, "worker")
    assert "UCX_TLS" not in env_of(container(plain, "worker"))


def test_gateways_scale_on_cpu_when_autoscaling_is_on(rendered):
    assert not rendered["defaults"].of_kind("HorizontalPodAutoscaler")
    assert rendered["defaults"].get("Deployment", f"{FULLNAME}-gateway")["spec"]["replicas"] == 1
    r = rendered["gateway-hpa"]
    (hpa,) = r.of_kind("HorizontalPodAutoscaler")
    deployment = r.get("Deployment", f"{FULLNAME}-gateway")
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}


def test_bundled_redis(rendered):
    r = rendered["defaults"]
    svc = r.get("Service", f"{FULLNAME}-redis")
    deployment = r.get("StatefulSet", f"{FULLNAME}-redis")
    assert svc["spec"]["selector"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    assert redis_urls(r) == {f"redis://{FULLNAME}-redis:6379/0"}


def test_bundled_redis_password_comes_from_a_secret_never_a_literal(rendered):
    r = rendered["redis-auth"]
    from_secret = {"secretKeyRef": {"name": "meshserve-redis", "key": "REDIS_PASSWORD"}}
    redis_c = container(r.get("StatefulSet", f"{FULLNAME}-redis"), "redis")
    assert redis_c["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    env = env_of(redis_c)
    assert env["REDIS_PASSWORD"]["valueFrom"] == env["REDISCLI_AUTH"]["valueFrom"] == from_secret
    url = f"redis://:$(REDIS_PASSWORD)@{FULLNAME}-redis:6379/0"
    _, _, scheduler = workers_of(r, 0)
    for workload, name in ((r.get("Deployment", f"{FULLNAME}-gateway"), "gateway"),
                           (scheduler, "scheduler")):
        c = container(workload, name)
        assert flag(c["args"], "--redis-url") == url
        assert env_of(c)["REDIS_PASSWORD"]["valueFrom"] == from_secret
    assert "REDIS_PASSWORD" not in rendered["defaults"].text  # no auth, no password variable


def test_external_redis(rendered):
    r = rendered["external-redis"]
    assert not [d for d in r.docs if "redis" in d["metadata"]["name"]]
    assert redis_urls(r) == {"redis://redis.infra:6379/3"}


def test_external_redis_url_from_a_secret():
    r = render({"replicas": 2, "redis": {"enabled": False, "existingSecret": "redis-url"}})
    assert redis_urls(r) == {"$(REDIS_URL)"}  # expanded by the kubelet from the env below
    for d in r.of_kind("Deployment"):
        (c,) = d["spec"]["template"]["spec"]["containers"]
        ref = env_of(c)["REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "redis-url", "key": "REDIS_URL"}


def test_api_keys_come_from_a_secret(rendered):
    r = rendered["api-keys"]
    (secret,) = r.of_kind("Secret")
    assert secret["stringData"] == {"MESHSERVE_API_KEYS": "k1,k2"}
    c = container(r.get("Deployment", f"{FULLNAME}-gateway"), "gateway")
    ref = env_of(c)["MESHSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "MESHSERVE_API_KEYS"}
    assert "--api-keys" not in c["args"]  # never on the command line

    r = render({"gateway": {"apiKeys": {"enabled": True, "existingSecret": "team-keys",
                                        "existingSecretKey": "keys"}}})
    assert r.of_kind("Secret") == []
    c = container(r.get("Deployment", f"{FULLNAME}-gateway"), "gateway")
    assert env_of(c)["MESHSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"] == \
        {"name": "team-keys", "key": "keys"}

    c = container(rendered["defaults"].get("Deployment", f"{FULLNAME}-gateway"), "gateway")
    assert "MESHSERVE_API_KEYS" not in env_of(c)
    assert rendered["defaults"].of_kind("Secret") == []


def test_gateway_reads_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv("MESHSERVE_API_KEYS", "k1,k2")
    c = container(render(CASES["api-keys"]).get("Deployment", f"{FULLNAME}-gateway"), "gateway")
    assert GatewaySettings.from_args(c["args"][1:]).api_keys == ("k1", "k2")


def _matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions with In) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", [])
               if e["operator"] == "In")


def _pod_labels(r) -> dict[str, dict]:
    """component -> the labels of its pods (one of each)."""
    out = {}
    for kind in ("Deployment", "StatefulSet"):
        for d in r.of_kind(kind):
            labels = d["spec"]["template"]["metadata"]["labels"]
            out[labels["app.kubernetes.io/component"]] = labels
    return out


def test_the_gateway_serves_the_openai_http_port(rendered):
    r = rendered["defaults"]
    gateway = r.get("Deployment", f"{FULLNAME}-gateway")
    c = container(gateway, "gateway")
    assert flag(c["args"], "--http-port") == "8000"
    assert {"name": "http", "containerPort": 8000} in c["ports"]
    ports = r.get("Service", f"{FULLNAME}-gateway")["spec"]["ports"]
    assert [p["name"] for p in ports] == ["grpc", "http"]
    off = rendered["network-policy-no-http"]
    assert [p["name"] for p in off.get("Service", f"{FULLNAME}-gateway")["spec"]["ports"]] == ["grpc"]
    assert flag(container(off.get("Deployment", f"{FULLNAME}-gateway"), "gateway")["args"],
                "--http-port") == "-1"


def test_disruption_budgets_cover_every_pod_kind_once(rendered):
    for case, limit in (("defaults", 1), ("network-policy-no-http", 2)):
        r = rendered[case]
        budgets = r.of_kind("PodDisruptionBudget")
        pods = _pod_labels(r)
        for component in ("gateway", "scheduler", "worker"):
            covering = [b for b in budgets if _matches(b["spec"]["selector"], pods[component])]
            assert len(covering) == 1, (case, component)
            assert covering[0]["spec"]["maxUnavailable"] == limit
        assert not any(_matches(b["spec"]["selector"], pods["redis"]) for b in budgets)
    assert not render({"podDisruptionBudget": {"enabled": False}}).of_kind("PodDisruptionBudget")


def test_the_network_policy_closes_the_inside_of_the_mesh_to_other_pods(rendered):
    assert not rendered["defaults"].of_kind("NetworkPolicy")
    r = rendered["network-policy-no-http"]
    (policy,) = r.of_kind("NetworkPolicy")
    pods = _pod_labels(r)
    guarded = {c for c, labels in pods.items() if _matches(policy["spec"]["podSelector"], labels)}
    assert guarded == {"scheduler", "worker", "redis"}  # the gateway is the public door
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert "ports" not in rule  # every port: UCX stage links use ephemeral ones
    mesh_peer, extra = rule["from"]
    assert all(_matches(mesh_peer["podSelector"], labels) for labels in pods.values())
    assert not _matches(mesh_peer["podSelector"], {**pods["gateway"],
                                                   "app.kubernetes.io/instance": "other"})
    assert extra == {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}


def test_notes_name_the_gateway(rendered):
    assert f"{FULLNAME}-gateway.{NAMESPACE}.svc:50051" in rendered["defaults"].notes
    assert "4 nvidia.com/gpu per stage pod" in rendered["tp4-pp3-model"].notes


# -- bad values are refused, with a message that says what to change --------------------------------

@pytest.mark.parametrize("values, words", [
    ({"tp": 0}, "tp"),
    ({"pp": 0}, "pp"),
    ({"replicas": -1}, "replicas"),
    ({"tp": "2"}, "tp"),
    ({"worker": {"dtype": "fp8"}}, "dtype"),
    ({"worker": {"device": "gpu0"}}, "device"),
    ({"worker": {"gpusPerPod": 2}}, "gpusPerPod"),  # not a setting: a pod holds tp GPUs
    ({"gateway": {"port": 70000}}, "port"),
    ({"redis": {"enabled": False}}, "redis"),
    ({"redis": {"enabled": False, "url": "http://r:6379"}}, "url"),
    ({"gateway": {"apiKeys": {"keys": ["a,b"]}}}, "keys"),
    ({"gateway": {"httpPort": 0}}, "httpPort"),
    ({"podDisruptionBudget": {"maxUnavailable": 0}}, "maxUnavailable"),
    ({"worker": {"shmSize": "lots"}}, "shmSize"),
    ({"gpu": {"gpusPerNode": 0}}, "gpusPerNode"),
])
def test_schema_rejects_bad_values(values, words):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match=words):
            chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError):  # rendering (as helm install does) refuses them too
        render(values)


def test_schema_accepts_every_case():
    with helm.Chart.load(CHART) as chart:
        for values in CASES.values():
            chart.validate_schema(values)


@pytest.mark.parametrize("values, message", [
    ({"pp": 2, "worker": {"layerSplit": [10, 10, 12]}}, "layerSplit has 3 entries but pp is 2"),
    ({"tp": 4, "worker": {"port": 29498}}, "distInitPort 29500 falls among the worker ports"),
    ({"gateway": {"apiKeys": {"enabled": True}}}, "set gateway.apiKeys.existingSecret"),
    ({"tp": 4, "worker": {"metricsPort": 50063}}, "worker.metricsPort 50063..50066 overlaps the "
                                                 "worker ports 50061..50064"),
    ({"tp": 16, "gpu": {"enabled": True}}, "tp 16 needs 16 GPUs in one worker pod but "
                                           "gpu.gpusPerNode is 8"),
    ({"redis": {"auth": {"enabled": True}}}, "set redis.auth.existingSecret"),
    ({"gateway": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2},
                  "resources": {"requests": {"cpu": 1}}}}, "minReplicas 5 is above maxReplicas 2"),
    ({"gateway": {"autoscaling": {"enabled": True}}}, "set gateway.resources.requests.cpu"),
])
def test_inconsistent_values_fail_with_a_clear_message(values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


def test_every_value_is_documented():
    """docs/deploy.md's values table names every setting of values.yaml (rows may group a
    component's placement keys as `gateway.resources`, `.nodeSelector`, ...)."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    text = (CHART.parents[1] / "docs" / "deploy.md").read_text()
    rows = [ln for ln in text.split("## Values", 1)[1].splitlines() if ln.startswith("| `")]

    def leaves(values: dict, prefix: str = ""):
        for key, value in values.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value and key not in ("env",):
                yield from leaves(value, path + ".")
            else:
                yield path

    for path in leaves(defaults):
        parent, _, leaf = path.rpartition(".")
        assert any(f"`{path}`" in row or (f"`{parent}." in row and f"`.{leaf}`" in row)
                   for row in rows), f"{path} is not in the values table of docs/deploy.md"


def test_the_grafana_dashboard_ships_for_the_sidecar(rendered):
    cm = rendered["defaults"].get("ConfigMap", f"{FULLNAME}-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(cm["data"]["meshserve.json"])
    assert shipped == json.loads((CHART / "dashboards" / "meshserve.json").read_text())
    off = render({"grafanaDashboard": {"enabled": False}})
    assert [d["metadata"]["name"] for d in off.of_kind("ConfigMap")] == [f"{FULLNAME}-scripts"]
