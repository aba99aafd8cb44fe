"""The Helm chart (deploy/helm/dsv32-serve), offline: rendered by the Helm engine
of ``helm-python-sdk`` (no binary, no cluster), linted strictly, every manifest
validated against the Kubernetes 1.37 schemas, and the wiring checked: each
role's environment parses through that role's own CLI into the intended flags,
Services and NetworkPolicies select the pods they mean, HPAs point at
workloads that exist and export the metric they scale on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from unittest import mock

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "dsv32-serve"
KUBE = "1.37.0"
ROLES = ("router", "prefill", "decode")
ALL_PORTS = "all"


def _ci(name: str) -> dict:
    return yaml.safe_load((CHART / "ci" / name).read_text())


CASES = {
    "default": {},
    "gpu-production": _ci("gpu-production-values.yaml"),
    "external-redis": _ci("external-redis-values.yaml"),
    "autoscale-all": {r: {"autoscaling": {"enabled": True}} for r in ROLES},
    "pvc-created-no-netpol": {"model": {"volume": {"type": "pvc"}}, "networkPolicy": {"enabled": False},
                              "metrics": {"serviceMonitor": {"enabled": True}}},
    "long-release-name": {},
    "expert-parallel": {"gpu": {"enabled": True}, "decode": {"expertParallel": {"size": 4}},
                        "prefill": {"expertParallel": {"size": 2}}},
    "serviceaccount-no-pdb": {"serviceAccount": {"create": True, "automountToken": True,
                                                 "annotations": {"iam.example.com/role": "dsv32"}},
                              "podDisruptionBudget": {"enabled": False}, "gpu": {"enabled": True, "shmSize": "2Gi"}},
}
RELEASE = {"long-release-name": "r" * 53}  # Helm's longest release name


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(str(CHART))


class Rendered:
    """One release's manifests, indexed."""

    def __init__(self, manifests: dict[str, str], values: dict, name: str = "demo"):
        self.values, self.name = values, name
        self.notes = next((t for path, t in manifests.items() if path.endswith("NOTES.txt")), "")
        self.docs = [d for path, text in manifests.items() if path.endswith(".yaml")
                     for d in yaml.safe_load_all(text) if d]

    def of(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        [doc] = [d for d in self.of(kind) if d["metadata"]["name"] == name]
        return doc

    def workloads(self) -> list[dict]:
        return self.of("Deployment") + self.of("StatefulSet")

    def workload(self, component: str) -> dict:
        [w] = [w for w in self.workloads() if _labels(w).get("app.kubernetes.io/component") == component]
        return w

    def container(self, component: str) -> dict:
        return self.workload(component)["spec"]["template"]["spec"]["containers"][0]


def _labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against a label set."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": present and value in e.get("values", []), "NotIn": not present or value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


def _render(chart, case: str) -> Rendered:
    values, name = CASES[case], RELEASE.get(case, "demo")
    return Rendered(chart.render(values, name=name, namespace="serving"), values, name)


@pytest.fixture(scope="module", params=sorted(CASES))
def release(request, chart) -> Rendered:
    r = _render(chart, request.param)
    r.case = request.param
    return r


# -- the chart as a whole --------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_lint_strict_is_clean(case):
    report = helm.lint(str(CHART), CASES[case], strict=True, kube_version=f"v{KUBE}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # info ("icon is recommended") only


def test_every_manifest_is_valid_kubernetes(release):
    kinds = set()
    for doc in release.docs:
        kinds.add(doc["kind"])
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD: no schema in kubernetes_validate; checked in test_service_monitor_*
        kubernetes_validate.validate(doc, KUBE, strict=True)
    assert {"Deployment", "StatefulSet", "Service"} <= kinds


def test_names_fit_kubernetes_limits(release):
    for doc in release.docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and name == name.lower(), name
        if doc["kind"] == "StatefulSet":
            # the controller-revision-hash label is "<name>-<10 chars>", a 63-character label value
            assert len(name) <= 52, name
    names = [(d["kind"], d["metadata"]["name"]) for d in release.docs]
    assert len(names) == len(set(names)), "duplicate objects"


def test_roles_and_redis_are_where_the_values_say(release):
    v = release.values
    assert release.workload("router")["kind"] == "Deployment"
    assert release.workload("prefill")["kind"] == "StatefulSet"
    assert release.workload("decode")["kind"] == "StatefulSet"
    redis_enabled = v.get("redis", {}).get("enabled", True)
    components = {_labels(w)["app.kubernetes.io/component"] for w in release.workloads()}
    assert ("redis" in components) == redis_enabled
    for role in ROLES:
        c = release.container(role)
        assert c["args"] == [role] and c["command"] == ["dsv32-serve"]
    for sts in release.of("StatefulSet"):
        assert release.get("Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


# -- environment: parsed by each role's own CLI ------------------------------------------

POD_IP, POD_NAME = "10.1.2.3", "demo-dsv32-serve-decode-0"


def _env_of(container: dict, secrets: dict) -> dict[str, str]:
    """The container's environment as the kubelet would build it (fieldRefs filled in)."""
    env = {}
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        src = e["valueFrom"]
        if "fieldRef" in src:
            env[e["name"]] = {"status.podIP": POD_IP, "metadata.name": POD_NAME}[src["fieldRef"]["fieldPath"]]
        else:
            ref = src["secretKeyRef"]
            if ref["key"] in ("internal-token", "api-token", "redis-password"):  # the release's auth Secret
                env[e["name"]] = f"test-{ref['key']}"
                continue
            env[e["name"]] = secrets[(ref["name"], ref["key"])]
    # the kubelet expands $(VAR) with variables defined earlier in the list
    return {k: re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), v) for k, v in env.items()}


def _parse_role_cli(role: str, env: dict[str, str]):
    """What ``dsv32-serve ROLE`` would parse from this environment and no flags."""
    from dsv32_serve.cli import build_parser

    clean = {k: v for k, v in os.environ.items() if not k.startswith("DSV32_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return build_parser([role]).parse_args([role])


# secrets travel only in the environment (never as flags, which `ps` shows): dsv32_cluster.auth
SECRET_ENVS = {"DSV32_INTERNAL_TOKEN", "DSV32_API_TOKEN"}


def test_every_dsv32_variable_is_a_flag_of_its_role(release):
    from dsv32_serve.cli import build_parser

    for role in ROLES:
        flags = set(vars(build_parser([role]).parse_args([role]))) - {"command"}
        names = [e["name"] for e in release.container(role)["env"]
                 if e["name"].startswith("DSV32_") and e["name"] not in SECRET_ENVS]
        assert len(names) == len(set(names)), f"{role}: a variable set twice"
        unknown = {n for n in names if n[len("DSV32_"):].lower() not in flags}
        assert not unknown, f"{role}: {unknown} match no flag of `dsv32-serve {role}`"


def test_env_wires_each_role(release):
    secrets = {("dsv32-redis", "url"): "redis://:pw@redis.infra:6379/2"}
    v = release.values
    model = v.get("model", {})
    expected_model = f"{model.get('mountPath', '/models')}/{model.get('dir', 'tiny')}"
    redis_vals = v.get("redis", {})
    metrics_on = v.get("metrics", {}).get("enabled", True)
    gpu = v.get("gpu", {}).get("enabled", False)
    for role in ROLES:
        c = release.container(role)
        args = _parse_role_cli(role, _env_of(c, secrets))
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert args.model == expected_model
        assert args.numerics == model.get("numerics", "exact")
        assert args.host == "0.0.0.0" and args.port == ports["grpc"]
        assert args.redis_prefix == (redis_vals.get("prefix") or f"{release.name}:")
        if redis_vals.get("enabled", True):
            svc = release.get("Service", [s["metadata"]["name"] for s in release.of("Service")
                                          if s["metadata"]["name"].endswith("-redis")][0])
            assert args.redis_url == (f"redis://:test-redis-password@{svc['metadata']['name']}:"
                                      f"{svc['spec']['ports'][0]['port']}/0")
        else:
            assert args.redis_url == secrets[("dsv32-redis", "url")]
        assert args.metrics_port == (ports["metrics"] if metrics_on else 0)
        # one session TTL for the router's records and the workers' cached pages
        assert args.session_ttl == int(v.get("sessions", {}).get("ttlSeconds", 3600))
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert expected_model.startswith(mounts["models"]["mountPath"] + "/") and mounts["models"]["readOnly"]
        if role == "router":
            continue
        assert args.advertise_host == POD_IP and args.worker_id == POD_NAME
        assert args.device == ("cuda" if gpu else "cpu")
        if role == "decode":
            assert args.transfer_port == ports["kv-transfer"]
        for key, value in v.get(role, {}).get("config", {}).items():
            if value not in ("", None):
                assert str(getattr(args, key)) == str(value), key


def test_default_tuning_flags_reach_the_workers(chart):
    r = _render(chart, "default")
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for role in ROLES:
        args = _parse_role_cli(role, _env_of(r.container(role), {}))
        for key, value in defaults[role]["config"].items():
            if value not in ("", None):
                assert float(getattr(args, key)) == float(value), (role, key)
    big = {"prefill": {"config": {"max_queued_tokens": 1_000_000}}}
    env = _env_of(_render_values(chart, big).container("prefill"), {})
    assert env["DSV32_MAX_QUEUED_TOKENS"] == "1000000"  # not 1e+06


def _render_values(chart, values: dict) -> Rendered:
    return Rendered(chart.render(values, name="demo", namespace="serving"), values)


# -- probes, ports, Services ---------------------------------------------------------------

def test_probes_use_grpc_health_on_the_grpc_port(release):
    for role in ROLES:
        c = release.container(role)
        grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        assert c["readinessProbe"]["grpc"]["port"] == grpc_port
        if role == "router":
            # NOT_SERVING (no workers registered) is not a reason to restart a router
            assert c["livenessProbe"]["tcpSocket"]["port"] == grpc_port
        else:
            assert c["livenessProbe"]["grpc"]["port"] == grpc_port
            assert c["startupProbe"]["grpc"]["port"] == grpc_port


def test_services_select_pods_and_target_their_named_ports(release):
    for svc in release.of("Service"):
        matched = [w for w in release.workloads() if _selects({"matchLabels": svc["spec"]["selector"]}, _labels(w))]
        assert len(matched) == 1, svc["metadata"]["name"]
        names = {p["name"] for c in matched[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names, (svc["metadata"]["name"], p)
    for w in release.workloads():
        assert _selects(w["spec"]["selector"], _labels(w)), w["metadata"]["name"]


def test_service_monitor_scrapes_the_three_roles(chart):
    r = _render(chart, "gpu-production")
    [sm] = r.of("ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    scraped = [s for s in r.of("Service") if _selects(sm["spec"]["selector"], s["metadata"]["labels"])]
    assert sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped) == sorted(ROLES)
    for s in scraped:
        assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in s["spec"]["ports"]}
    assert not _render(chart, "default").of("ServiceMonitor")


# -- NetworkPolicy -------------------------------------------------------------------------

def _ingress_graph(r: Rendered) -> dict[str, set[tuple[str, object]]]:
    """component -> {(source, port)}: source is a component, 'any' or 'external:<peer>'; port a number or ALL."""
    components = {_labels(w)["app.kubernetes.io/component"]: w for w in r.workloads()}
    graph: dict[str, set] = {}
    for np in r.of("NetworkPolicy"):
        targets = [c for c, w in components.items() if _selects(np["spec"]["podSelector"], _labels(w))]
        assert len(targets) == 1, np["metadata"]["name"]
        target = targets[0]
        assert np["spec"]["policyTypes"] == ["Ingress"]
        for rule in np["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])] or [ALL_PORTS]
            sources = []
            for peer in rule.get("from", [{"any": True}]):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    matched = [c for c, w in components.items() if _selects(peer["podSelector"], _labels(w))]
                    assert matched, f"{np['metadata']['name']}: a peer that selects no pod of the release"
                    sources += matched
                else:
                    sources.append("any" if "any" in peer else "external")
            graph.setdefault(target, set()).update((s, p) for s in sources for p in ports)
        container_ports = {p["containerPort"] for c in components[target]["spec"]["template"]["spec"]["containers"]
                           for p in c.get("ports", [])}
        assert {p for _, p in graph[target] if p != ALL_PORTS} <= container_ports, target
    return graph


def test_network_policies_allow_exactly_the_data_paths(chart):
    r = _render(chart, "default")
    grpc = {role: r.values.get(role, {}).get("port") or next(
        p["containerPort"] for p in r.container(role)["ports"] if p["name"] == "grpc") for role in ROLES}
    metrics = ("external", 9400)  # Prometheus, from the monitoring namespace
    http = ("any", next(p["containerPort"] for p in r.container("router")["ports"] if p["name"] == "http"))
    assert _ingress_graph(r) == {
        "router": {("any", grpc["router"]), http, metrics},
        "prefill": {("router", grpc["prefill"]), ("decode", ALL_PORTS), metrics},
        "decode": {("router", grpc["decode"]), ("prefill", ALL_PORTS), metrics},
        "redis": {("router", 6379), ("prefill", 6379), ("decode", 6379)},
    }


def test_network_policies_select_real_pods_in_every_case(release):
    if release.of("NetworkPolicy"):
        graph = _ingress_graph(release)
        assert set(graph) >= set(ROLES)
        for role in ("prefill", "decode"):  # no worker port is open to the outside
            assert not {s for s, _ in graph[role]} & {"any"}


def test_router_sources_can_be_restricted(chart):
    r = _render(chart, "gpu-production")
    graph = _ingress_graph(r)
    assert ("any", 50051) not in graph["router"] and ("external", 50051) in graph["router"]


# -- autoscaling -----------------------------------------------------------------------------

def _exported_metrics() -> dict[str, tuple[str, ...]]:
    """Prometheus series name -> label names, as the processes register them."""
    from dsv32_cluster import metrics

    return metrics.exported_names()


def test_hpas_target_workloads_they_own(release):
    exported = _exported_metrics()
    hpas = release.of("HorizontalPodAutoscaler")
    enabled = {role for role in ROLES if release.values.get(role, {}).get("autoscaling", {}).get("enabled")}
    assert {h["metadata"]["labels"]["app.kubernetes.io/component"] for h in hpas} == enabled
    for role in ROLES:
        assert ("replicas" in release.workload(role)["spec"]) == (role not in enabled), \
            f"{role}: an HPA and a fixed replica count would fight"
    for h in hpas:
        ref = h["spec"]["scaleTargetRef"]
        target = release.get(ref["kind"], ref["name"])
        assert ref["apiVersion"] == target["apiVersion"]
        assert h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"]
        for m in h["spec"]["metrics"]:
            if m["type"] == "Resource":
                c = target["spec"]["template"]["spec"]["containers"][0]
                assert c["resources"]["requests"]["cpu"], "CPU utilisation needs a CPU request"
                continue
            spec = m[m["type"].lower()]
            name = spec["metric"]["name"]
            assert name in exported, f"{name}: no process exports it"
            selector = spec["metric"].get("selector", {}).get("matchLabels", {})
            # `service` is the scrape target's label (ServiceMonitor), the rest the metric's own
            assert set(selector) - {"service"} <= set(exported[name]), (name, selector)
            if "service" in selector:
                assert release.get("Service", selector["service"])["metadata"]["labels"][
                    "app.kubernetes.io/component"] == "router"
            assert release.values.get("metrics", {}).get("enabled", True)


# -- GPUs, model volume ----------------------------------------------------------------------

def test_gpus_only_for_workers_and_only_when_enabled(chart):
    for case, want in (("default", 0), ("gpu-production", 1)):
        r = _render(chart, case)
        assert "nvidia.com/gpu" not in str(r.container("router")["resources"])
        for role in ("prefill", "decode"):
            res = r.container(role)["resources"]
            got = res.get("limits", {}).get("nvidia.com/gpu", 0)
            assert got == want and res.get("requests", {}).get("nvidia.com/gpu", 0) == want, (case, role)
            tolerations = r.workload(role)["spec"]["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations) == bool(want)


def test_model_volume_and_demo_checkpoint(chart):
    r = _render(chart, "default")
    for role in ROLES:
        spec = r.workload(role)["spec"]["template"]["spec"]
        [init] = spec["initContainers"]
        assert "make-checkpoint --preset tiny" in init["command"][-1]
        assert {e["name"]: e["value"] for e in init["env"]}["DSV32_MODEL"] == "/models/tiny"
        assert not init["volumeMounts"][0].get("readOnly")
        assert [v for v in spec["volumes"] if v["name"] == "models"][0]["emptyDir"]
    r = _render(chart, "pvc-created-no-netpol")
    [pvc] = r.of("PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for role in ROLES:
        [vol] = r.workload(role)["spec"]["template"]["spec"]["volumes"]
        assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    r = _render(chart, "gpu-production")
    assert not r.of("PersistentVolumeClaim")
    for role in ROLES:
        spec = r.workload(role)["spec"]["template"]["spec"]
        assert "initContainers" not in spec
        assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "dsv32-weights"


@pytest.mark.parametrize("values, message", [
    ({"decode": {"config": {"port": 1}}}, "decode.config.port is set by the chart"),
    ({"router": {"config": {"redis_url": "redis://x"}}}, "router.config.redis_url is set by the chart"),
    ({"decode": {"expertParallel": {"size": 0}}}, "size"),
    ({"redis": {"enabled": False}}, "needs redis.externalUrl"),
    ({"model": {"makeCheckpoint": {"enabled": False}}}, "emptyDir holds no model"),
    ({"prefill": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0,
                                  "queueMetric": {"enabled": False}}}}, "enable queueMetric"),
    ({"metrics": {"enabled": False}, "decode": {"autoscaling": {"enabled": True}}}, "needs metrics.enabled"),
    ({"prefil": {"replicaCount": 2}}, "additional properties 'prefil' not allowed"),
    ({"model": {"numerics": "fp16"}}, "numerics"),
], ids=["managed-flag", "managed-redis", "ep-size", "no-redis", "empty-model", "hpa-no-metric", "hpa-no-metrics",
        "typo", "bad-numerics"])
def test_bad_values_are_refused_with_a_message(chart, values, message):
    with pytest.raises(helm.HelmError) as e:
        chart.render(values, name="demo", namespace="serving")
    assert message in str(e.value)


def test_an_expert_parallel_pod_runs_its_group(chart):
    """One pod = one EP group: DSV32_EP_SIZE, one GPU per rank, a port (and KV port) per rank,
    and the NetworkPolicy opens the ranks' port range."""
    r = _render(chart, "expert-parallel")
    for role, size in (("decode", 4), ("prefill", 2)):
        [c] = r.workload(role)["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["DSV32_EP_SIZE"] == str(size)
        gpus = [v for k, v in c["resources"]["limits"].items() if "gpu" in k]
        assert gpus == [size]
        base = r.values[role]["port"] if "port" in r.values.get(role, {}) else None
        grpc = sorted(p["containerPort"] for p in c["ports"] if p["name"].startswith("grpc"))
        assert grpc == list(range(grpc[0], grpc[0] + size)) and (base is None or grpc[0] == base)
        if role == "decode":
            kv = sorted(p["containerPort"] for p in c["ports"] if p["name"].startswith("kv"))
            assert len(kv) == size and kv == list(range(kv[0], kv[0] + size))
        [pol] = [p for p in r.of("NetworkPolicy") if p["metadata"]["name"].endswith(role)]
        opened = pol["spec"]["ingress"][0]["ports"][0]
        assert (opened["port"], opened["endPort"]) == (grpc[0], grpc[-1])


def test_in_chart_redis_asks_for_a_password_from_the_secret(chart):
    r = _render(chart, "default")
    [redis] = [d for d in r.of("Deployment") + r.of("StatefulSet") if d["metadata"]["name"].endswith("-redis")]
    [c] = redis["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--protected-mode") + 1] == "yes"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env["REDIS_PASSWORD"]["key"] == env["REDISCLI_AUTH"]["key"] == "redis-password"
    [secret] = [s for s in r.of("Secret") if s["metadata"]["name"] == env["REDIS_PASSWORD"]["name"]]
    assert secret["data"]["redis-password"]


def test_router_serves_the_http_api_on_its_own_port(chart):
    r = _render(chart, "default")
    c = r.container("router")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    args = _parse_role_cli("router", _env_of(c, {}))
    assert args.http_port == ports["http"] == r.values.get("router", {}).get("httpPort", 8000)
    [svc] = [s for s in r.of("Service") if s["metadata"]["name"].endswith("-router")]
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}["http"] == "http"
    off = _render_values(chart, {"router": {"httpPort": 0}})
    assert "http" not in {p["name"] for p in off.container("router")["ports"]}
