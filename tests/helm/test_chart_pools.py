"""The chart's LeaderWorkerSet pools (lws.enabled): rendered by Helm's engine, the Kubernetes
objects validated against the Kubernetes schemas, the LeaderWorkerSet, KEDA ScaledObject and
PodMonitor objects against the JSON schemas under tests/helm/schemas (their pod templates as
Pods against Kubernetes'), the wiring checked, and one group's pods run here: worker pods with
the stand-in `meshserve`, whose argv the worker CLI parses, and the leader, whose scheduler must
dial exactly those processes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

from services.scheduler.server import SchedulerSettings
from services.worker.settings import WorkerSettings
from tests.helm.chart import FULLNAME, KUBE_VERSION, NAMESPACE, env_of, flag, lint, render
from tests.helm.pods import start_lws_pod
from tests.helm.test_chart import _matches

SCHEMAS = {kind: json.loads((Path(__file__).with_name("schemas") / name).read_text())
           for kind, name in (("LeaderWorkerSet", "leaderworkerset-v1.json"),
                              ("ScaledObject", "scaledobject-keda-v1alpha1.json"),
                              ("PodMonitor", "podmonitor-v1.json"))}
TWO_POOLS = {"lws": {"enabled": True, "pools": [
    {"name": "h200", "replicas": 2, "tp": 8, "pp": 2,
     "worker": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"}}},
    {"name": "a100", "tp": 4, "pp": 3, "autoscaling": {
        "enabled": True, "minReplicas": 1, "maxReplicas": 6, "waitingPerReplica": 8,
        "scaleDownWindowSeconds": 120}}]},
    "gpu": {"enabled": True}, "monitoring": {"podMonitor": {"enabled": True}},
    "networkPolicy": {"enabled": True}}
CASES = {
    "one-pool": {"lws": {"enabled": True}, "replicas": 0},
    "two-pools-autoscaling": TWO_POOLS,
    "external-redis-secret": {"lws": {"enabled": True}, "redis": {
        "enabled": False, "existingSecret": "redis-url"}},
    "redis-auth": {"lws": {"enabled": True}, "redis": {"auth": {
        "enabled": True, "existingSecret": "meshserve-redis"}}},
    "rdma": {"lws": {"enabled": True}, "tp": 8, "pp": 2, "gpu": {"enabled": True},
             "rdma": {"enabled": True, "ucxTls": "rc,cuda_copy", "ncclIbHca": "mlx5"}},
}


@pytest.fixture(scope="module")
def rendered():
    return {case: render(values) for case, values in CASES.items()}


def templates(lws: dict) -> tuple[dict, dict]:
    t = lws["spec"]["leaderWorkerTemplate"]
    return t["leaderTemplate"], t["workerTemplate"]


def as_pod(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", **template.get("metadata", {})}, "spec": template["spec"]}


def only(template: dict, name: str) -> dict:
    (c,) = [c for c in template["spec"]["containers"] if c["name"] == name]
    return c


@pytest.mark.parametrize("case", CASES)
def test_every_object_validates(rendered, case):
    assert lint(CASES[case])["errors"] == []
    r = rendered[case]
    assert not r.worker_sets() and not [d for d in r.of_kind("Deployment")
                                        if "scheduler" in d["metadata"]["name"]]
    assert r.of_kind("LeaderWorkerSet")
    for doc in r.docs:
        if doc["kind"] in SCHEMAS:
            jsonschema.validate(doc, SCHEMAS[doc["kind"]])
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        if doc["kind"] == "LeaderWorkerSet":
            for template in templates(doc):
                kubernetes_validate.validate(as_pod(template), KUBE_VERSION, strict=True)


def test_the_schemas_refuse_what_they_should():
    """The bundled schemas are not vacuous: a misplaced field and a wrong value fail."""
    lws = render(CASES["one-pool"]).of_kind("LeaderWorkerSet")[0]
    bad = json.loads(json.dumps(lws))
    bad["spec"]["leaderWorkerTemplate"]["sizee"] = 3
    with pytest.raises(jsonschema.ValidationError, match="sizee"):
        jsonschema.validate(bad, SCHEMAS["LeaderWorkerSet"])
    bad = json.loads(json.dumps(lws))
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="Always"):
        jsonschema.validate(bad, SCHEMAS["LeaderWorkerSet"])


def test_a_group_is_a_scheduler_and_pp_stage_pods_with_gpus_only_on_workers(rendered):
    r = rendered["two-pools-autoscaling"]
    h200, a100 = (r.get("LeaderWorkerSet", f"{FULLNAME}-{p}") for p in ("h200", "a100"))
    for lws, tp, pp in ((h200, 8, 2), (a100, 4, 3)):
        group = lws["spec"]["leaderWorkerTemplate"]
        assert group["size"] == pp + 1
        assert group["restartPolicy"] == "RecreateGroupOnPodRestart"
        leader, worker = templates(lws)
        assert "nvidia.com/gpu" not in json.dumps(leader)
        assert only(worker, "worker")["resources"]["limits"]["nvidia.com/gpu"] == tp
        env = env_of(only(worker, "worker"))
        assert (env["TP_SIZE"]["value"], env["PP_SIZE"]["value"]) == (str(tp), str(pp))
        leader_env = env_of(only(leader, "scheduler"))
        assert leader_env["WORKER_DOMAIN"]["value"] == \
            f"{lws['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert h200["spec"]["replicas"] == 2
    assert "replicas" not in a100["spec"]  # KEDA owns it
    assert templates(h200)[1]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert "nodeSelector" not in templates(a100)[1]["spec"]
    assert rendered["one-pool"].get("LeaderWorkerSet", f"{FULLNAME}-main")["spec"]["replicas"] == 0


def test_autoscaling_is_keda_on_the_pools_waiting_requests(rendered):
    r = rendered["two-pools-autoscaling"]
    (scaled,) = r.of_kind("ScaledObject")
    name = f"{FULLNAME}-a100"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "leaderworkerset.x-k8s.io/v1",
                                      "kind": "LeaderWorkerSet", "name": name}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 6)
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "8"
    assert trigger["metadata"]["query"] == (
        f'sum(meshserve:num_requests_waiting{{namespace="{NAMESPACE}",pod=~"{name}-[0-9]+"}})')


def test_scale_down_drains_first_within_the_grace(rendered):
    for r in rendered.values():
        for lws in r.of_kind("LeaderWorkerSet"):
            leader, worker = templates(lws)
            for template in (leader, worker):
                assert template["spec"]["terminationGracePeriodSeconds"] >= 60 + 30
            c = only(leader, "scheduler")
            hook = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
            assert 'meshserve drain --redis-url "$MESHSERVE_REDIS_URL" --wait 60 ' \
                   '"$MESHSERVE_REPLICA_ID"' in hook
            assert env_of(c)["MESHSERVE_REPLICA_ID"]["value"] == "$(POD_NAME)"
            names = [e["name"] for e in c["env"]]  # a $(VAR) reference needs VAR defined first
            assert names.index("POD_NAME") < names.index("MESHSERVE_REPLICA_ID")


def test_no_password_in_any_rendered_argument(rendered):
    r = rendered["redis-auth"]
    leader, _ = templates(r.of_kind("LeaderWorkerSet")[0])
    c = only(leader, "scheduler")
    url = f"redis://:$(REDIS_PASSWORD)@{FULLNAME}-redis:6379/0"
    assert flag(c["args"], "--redis-url") == url
    env = env_of(c)
    names = [e["name"] for e in c["env"]]
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "meshserve-redis"
    assert env["MESHSERVE_REDIS_URL"]["value"] == url
    assert names.index("REDIS_PASSWORD") < names.index("MESHSERVE_REDIS_URL")
    leader, _ = templates(rendered["external-redis-secret"].of_kind("LeaderWorkerSet")[0])
    assert flag(only(leader, "scheduler")["args"], "--redis-url") == "$(REDIS_URL)"


def test_the_network_policy_and_monitor_select_the_pool_pods(rendered):
    r = rendered["two-pools-autoscaling"]
    (policy,) = r.of_kind("NetworkPolicy")
    (monitor,) = r.of_kind("PodMonitor")
    for lws in r.of_kind("LeaderWorkerSet"):
        for template in templates(lws):
            labels = template["metadata"]["labels"]
            assert _matches(policy["spec"]["podSelector"], labels)
            assert _matches(policy["spec"]["ingress"][0]["from"][0]["podSelector"], labels)
            assert _matches(monitor["spec"]["selector"], labels)
    ports = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    assert ports == ["http", "metrics"] + [f"metrics-{rank}" for rank in range(8)]


@pytest.mark.parametrize("values, message", [
    ({"lws": {"enabled": True, "pools": [{"name": "a"}, {"name": "a"}]}}, "two pools are named"),
    ({"lws": {"enabled": True, "pools": [{"name": "big", "tp": 16}]}, "gpu": {"enabled": True}},
     "pool big: tp 16 needs 16 GPUs"),
    ({"lws": {"enabled": True, "pools": [{"name": "s", "autoscaling": {
        "enabled": True, "minReplicas": 5, "maxReplicas": 2}}]}}, "minReplicas 5 is above"),
])
def test_inconsistent_pools_fail_with_a_clear_message(values, message):
    with pytest.raises(Exception, match=message):
        render(values)


@pytest.mark.parametrize("pool", [{"name": "Bad_Name"}, {"name": "a-name-too-long"},
                                  {"name": "x", "replicas": -1},
                                  {"name": "x", "autoscaling": {"minReplicas": 0}}])
def test_the_schema_refuses_bad_pools(pool):
    report = lint({"lws": {"enabled": True, "pools": [pool]}})
    assert report["errors"], pool


def test_one_groups_pods_form_the_grid_its_scheduler_dials(rendered, tmp_path):
    """Runs group 1 of the tp 4 x pp 3 pool here: each worker pod's entrypoint with the index
    the LeaderWorkerSet controller gives it, then the leader's, with a wait for workers that
    records whom it waited for. The worker CLI parses every rank's argv; the scheduler's
    --workers (and the wait) name exactly those processes at their pod DNS names."""
    r = rendered["two-pools-autoscaling"]
    name = f"{FULLNAME}-a100"
    tp, pp, group = 4, 3, 1
    listening, grid = [], set()
    for index in range(1, pp + 1):
        pod = start_lws_pod(r, name, group, index, tmp_path)
        try:
            argvs = pod.wait_for(tp)
            assert pod.stop() == 0
        finally:
            pod.kill()
        for argv in argvs:
            s = WorkerSettings.from_args(argv[1:])
            assert (s.tp_size, s.pp_size, s.pp_rank) == (tp, pp, index - 1)
            grid.add((s.pp_rank, s.tp_rank))
            listening.append(f"{name}-{group}-{index}.{name}.{NAMESPACE}.svc.cluster.local:{s.port}")
    assert grid == set(itertools.product(range(pp), range(tp)))
    waited = 'printf "%s\\n" "$@" > "$POD_DIR/waited"\n'
    leader = start_lws_pod(r, name, group, 0, tmp_path, scripts={"wait-for-workers.sh": waited})
    try:
        (argv,) = leader.wait_for(1)
        assert leader.stop() == 0
    finally:
        leader.kill()
    assert argv[0] == "scheduler"
    settings = SchedulerSettings.from_args(argv[1:])
    assert sorted(settings.workers) == sorted(listening)
    assert settings.replica_id == f"{name}-{group}"
    assert (leader.pod_dir / "waited").read_text().split() == list(settings.workers)


def test_notes_list_the_pools(rendered):
    notes = rendered["two-pools-autoscaling"].notes
    assert notes.startswith("meshserve 0.1.0: LeaderWorkerSet pools\n")
    assert f"{FULLNAME}-h200: 2 replica(s) of a scheduler and 2 stage pod(s) x 8 TP rank(s)" in notes
    assert f"{FULLNAME}-a100: 1-6 (KEDA) replica(s)" in notes
