"""The chart's operations objects, on the renders of test_deploy_helm.py: the `restricted` Pod
Security Standard, PodDisruptionBudgets, the optional ServiceAccount, /dev/shm on GPU workers,
and probes (readiness: gRPC health; worker liveness: the engine loop's health service)."""

from __future__ import annotations

import pytest

from test_deploy_helm import CASES, ROLES, _render, _selects, helm  # noqa: F401  (helm: skips without it)

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(str(__import__("test_deploy_helm").CHART))


def _pods(release) -> list[tuple[str, dict]]:
    return [(w["metadata"]["name"], w["spec"]["template"]["spec"]) for w in release.workloads()]


def restricted_violations(name: str, pod: dict) -> list[str]:
    """What the `restricted` Pod Security Standard (baseline included) refuses in a pod spec."""
    bad, psc = [], pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad.append(f"{name}: {key}")
    for v in pod.get("volumes") or []:
        kind = next(k for k in v if k != "name")
        if kind not in RESTRICTED_VOLUMES:
            bad.append(f"{name}: volume {v['name']} is {kind}")
    if psc.get("runAsUser") == 0:
        bad.append(f"{name}: pod runAsUser 0")
    for c in (pod.get("initContainers") or []) + pod["containers"]:
        where, sc = f"{name}/{c['name']}", c.get("securityContext") or {}
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation must be false")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad.append(f"{where}: runAsNonRoot must be true")
        if sc.get("runAsUser") == 0:
            bad.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile {seccomp}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{where}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: capabilities add {caps['add']}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            bad.append(f"{where}: hostPort")
    return bad


@pytest.mark.parametrize("case", sorted(c for c in CASES if c != "external-redis"))  # that one mounts a hostPath
def test_every_pod_passes_the_restricted_pod_security_standard(chart, case):
    release = _render(chart, case)
    bad = [b for name, pod in _pods(release) for b in restricted_violations(name, pod)]
    assert not bad, bad


def test_the_check_sees_what_the_standard_refuses():
    pod = {"volumes": [{"name": "m", "hostPath": {"path": "/x"}}],
           "containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]}
    bad = " ".join(restricted_violations("p", pod))
    for word in ("hostPath", "allowPrivilegeEscalation", "runAsNonRoot", "seccompProfile", "drop ALL", "SYS_ADMIN"):
        assert word in bad


@pytest.mark.parametrize("case", ["default", "serviceaccount-no-pdb"])
def test_pod_disruption_budgets_one_per_role(chart, case):
    release = _render(chart, case)
    pdbs = release.of("PodDisruptionBudget")
    if not release.values.get("podDisruptionBudget", {}).get("enabled", True):
        assert pdbs == []
        return
    assert len(pdbs) == len(ROLES)
    for role in ROLES:
        w = release.workload(role)
        mine = [p for p in pdbs if _selects(p["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(mine) == 1 and mine[0]["spec"]["maxUnavailable"] == 1, role
        assert mine[0]["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize("case", ["default", "serviceaccount-no-pdb"])
def test_service_account_optional(chart, case):
    release = _render(chart, case)
    sa = release.of("ServiceAccount")
    wanted = release.values.get("serviceAccount", {})
    for name, pod in _pods(release):
        if name.endswith("-redis"):
            continue
        assert pod["automountServiceAccountToken"] is bool(wanted.get("automountToken", False))
        if wanted.get("create"):
            assert pod["serviceAccountName"] == sa[0]["metadata"]["name"], name
        else:
            assert "serviceAccountName" not in pod, name
    assert len(sa) == (1 if wanted.get("create") else 0)
    if sa:
        assert sa[0]["metadata"]["annotations"] == wanted["annotations"]


@pytest.mark.parametrize("case", ["default", "gpu-production", "expert-parallel", "serviceaccount-no-pdb"])
def test_dev_shm_is_a_sized_memory_volume_on_gpu_workers(chart, case):
    release = _render(chart, case)
    gpu = release.values.get("gpu", {}).get("enabled", False)
    for role in ROLES:
        pod = release.workload(role)["spec"]["template"]["spec"]
        shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
        mounts = [m for m in pod["containers"][0].get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        if gpu and role != "router":
            size = release.values["gpu"].get("shmSize", "16Gi")
            assert shm == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}], role
            assert [m["name"] for m in mounts] == ["dshm"]
        else:
            assert not shm and not mounts, role


@pytest.mark.parametrize("case", ["default", "expert-parallel"])
def test_probes_readiness_from_grpc_health_liveness_from_the_engine_loop(chart, case):
    from dsv32_cluster.liveness import SERVICE

    release = _render(chart, case)
    for role in ROLES:
        c = release.container(role)
        assert "service" not in c["readinessProbe"]["grpc"], "readiness: the overall gRPC health status"
        if role != "router":
            assert c["livenessProbe"]["grpc"] == {"port": c["readinessProbe"]["grpc"]["port"], "service": SERVICE}
