"""The Helm chart in charts/optimodel: renders, validates against Kubernetes 1.37, lints,
ships the generated CRD unchanged, grants exactly the RBAC the operator needs, and carries
a working Argo CD health check. Offline: helm-python binds libhelm_c, no helm binary."""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "optimodel"
KUBE = "1.37.0"
RELEASE = "om"
NAMESPACE = "optimodel-system"

OVERRIDE = {
    "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "interval": "30s"},
    "watchNamespaces": ["team-a", "team-b"],
    "store": {"pvc": {"create": False, "existingClaim": "models", "subPath": "optimodel"}},
    "prometheus": {"url": "http://prometheus-operated.monitoring:9090"},
    "image": {
        "builder": {"repository": "registry.example/builder", "tag": "1.2.3", "pullPolicy": "Always"},
        "serving": {"repository": "registry.example/serving", "pullPolicy": "Always"},
    },
    "builder": {
        "tolerations": [{"key": "gpu", "operator": "Equal", "value": "h100", "effect": "NoSchedule"}],
        "toolchain": {"tensorrt": "10.13.3", "onnxruntime": "1.23.2"},
        "activeDeadlineSeconds": 3600,
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": 600,
    },
    "operator": {"peering": {"enabled": True}, "logLevel": "DEBUG", "resyncSeconds": 30, "workers": 4},
    "workloadServiceAccount": "optimodel-workload",
}
S3 = {"store": {"uri": "s3://models/optimodel", "credentialsSecret": "store-creds"}}
PEERED = {"operator": {"peering": {"enabled": True, "name": "optimodel"}}}
# custom kinds kubernetes-validate does not know: their fields are asserted by their own tests
NOT_BUILTIN = {"PodMonitor", "KopfPeering", "ClusterKopfPeering"}

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values=None) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def operator_role(docs: list[dict]) -> dict:
    """The operator's own ClusterRole (the others aggregate into edit/view)."""
    return one([d for d in docs if d["kind"] == "ClusterRole"
                and d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"], "ClusterRole")


def operator_container(docs):
    deployment = one(docs, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


# ---- rendering and validation ------------------------------------------------------


@pytest.mark.parametrize("values", [None, OVERRIDE, S3, PEERED], ids=["defaults", "override", "s3", "peered"])
def test_every_manifest_validates_against_kubernetes_1_37(chart, values):
    docs = objects(render(chart, values))
    kinds = sorted(d["kind"] for d in docs)
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "ConfigMap"} <= set(kinds)
    for doc in docs:
        labels = doc["metadata"]["labels"]
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, f"{doc['kind']} {doc['metadata']['name']} lacks labels {missing}"
        assert labels["app.kubernetes.io/part-of"] == "optimodel"
        if doc["kind"] in NOT_BUILTIN:
            continue
        kubernetes_validate.validate(doc, KUBE, strict=True)
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE


def test_defaults_render_the_expected_objects(chart):
    docs = objects(render(chart))
    assert sorted(d["kind"] for d in docs) == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "Deployment",
         "PersistentVolumeClaim", "ConfigMap"]
    )


def test_model_owners_get_optimizedmodels_through_the_built_in_edit_and_view_roles(chart):
    roles = {d["metadata"]["name"]: d for d in objects(render(chart)) if d["kind"] == "ClusterRole"}
    by_label = {label: d for d in roles.values() for label, v in d["metadata"]["labels"].items()
                if label.startswith("rbac.authorization.k8s.io/aggregate-to-") and v == "true"}
    edit, view = by_label["rbac.authorization.k8s.io/aggregate-to-edit"], by_label["rbac.authorization.k8s.io/aggregate-to-view"]
    assert by_label["rbac.authorization.k8s.io/aggregate-to-admin"] is edit
    assert {"create", "update", "patch", "delete"} <= granted(edit)[("optimodel.io", "optimizedmodels")]
    assert granted(view) == {("optimodel.io", "optimizedmodels"): {"get", "list", "watch"},
                             ("optimodel.io", "optimizedmodels/status"): {"get", "list", "watch"}}
    # neither writes status (the operator's) nor touches anything but OptimizedModels
    assert "patch" not in granted(edit)[("optimodel.io", "optimizedmodels/status")]
    assert {g for g, _ in granted(edit)} == {"optimodel.io"}
    off = objects(render(chart, {"rbac": {"aggregateToEditView": False}}))
    assert [d["kind"] for d in off].count("ClusterRole") == 1


@pytest.mark.parametrize("values", [None, OVERRIDE, S3, PEERED], ids=["defaults", "override", "s3", "peered"])
def test_helm_lint_passes(values):
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.37.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_chart_crd_is_the_generated_crd(chart):
    chart_crd = CHART / "crds" / "optimizedmodel.yaml"
    repo_crd = ROOT / "crds" / "optimizedmodel.yaml"
    assert not chart_crd.is_symlink(), "the chart must carry a copy: helm packages symlinks poorly"
    assert chart_crd.read_bytes() == repo_crd.read_bytes(), (
        "charts/optimodel/crds/optimizedmodel.yaml drifted from crds/optimizedmodel.yaml; re-copy it: "
        "cp crds/optimizedmodel.yaml charts/optimodel/crds/optimizedmodel.yaml"
    )
    # and Helm sees it as one of the chart's CRDs
    loaded = {c["filename"].rsplit("/", 1)[-1]: c["data"] for c in chart.crds}
    assert yaml.safe_load(loaded["optimizedmodel.yaml"])["metadata"]["name"] == "optimizedmodels.optimodel.io"


def test_kopf_peering_crds_ship_and_validate(chart):
    loaded = {c["filename"].rsplit("/", 1)[-1]: c["data"] for c in chart.crds}
    crds = [d for d in yaml.safe_load_all(loaded["kopf-peering.yaml"]) if d]
    assert {(c["spec"]["names"]["kind"], c["spec"]["scope"]) for c in crds} == {
        ("ClusterKopfPeering", "Cluster"), ("KopfPeering", "Namespaced")}
    for crd in crds:
        assert crd["spec"]["group"] == "kopf.dev"
        kubernetes_validate.validate(crd, KUBE, strict=True)


# ---- RBAC ------------------------------------------------------------------------------

CRUD = {"create", "get", "list", "watch", "patch", "update", "delete"}
# tests/operator/test_rbac.py derives these from the operator's requests; this copy keeps the
# chart test standalone (both fail when the chart drifts)
REQUIRED_RBAC = {
    ("optimodel.io", "optimizedmodels"): {"list", "watch"},
    ("optimodel.io", "optimizedmodels/status"): {"patch"},
    ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
    ("apps", "deployments"): {"create", "list", "watch", "patch"},
    ("", "services"): {"create", "list", "watch", "patch"},
    ("", "configmaps"): {"create", "list", "watch", "patch"},
    ("", "pods"): {"list", "watch"},
    ("", "nodes"): {"list", "watch"},
    ("", "secrets"): {"get"},
    ("", "events"): {"create"},
    ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
    ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},
}


def granted(role) -> dict[tuple[str, str], set[str]]:
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def test_cluster_role_grants_what_the_operator_needs_and_nothing_more(chart):
    role = operator_role(objects(render(chart)))
    grants = granted(role)
    for key, verbs in REQUIRED_RBAC.items():
        assert verbs <= grants.get(key, set()), f"{key}: missing {sorted(verbs - grants.get(key, set()))}"
    extra = {k: sorted(v - REQUIRED_RBAC.get(k, set())) for k, v in grants.items() if v - REQUIRED_RBAC.get(k, set())}
    assert extra == {}, f"grants beyond least privilege: {extra}"
    assert not any("*" in r["verbs"] or "*" in r["resources"] or "*" in r["apiGroups"] for r in role["rules"])


def test_cluster_role_binding_binds_the_operator_service_account(chart):
    docs = objects(render(chart))
    binding, role, account = one(docs, "ClusterRoleBinding"), operator_role(docs), one(docs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]


# ---- operator Deployment -------------------------------------------------------------


def test_settings_reach_the_operator_as_env(chart):
    container = operator_container(objects(render(chart, OVERRIDE)))
    env = env_of(container)
    assert env["OPTIMODEL_STORE_URI"] == "pvc://models/optimodel"
    assert env["OPTIMODEL_BUILDER_IMAGE"] == "registry.example/builder:1.2.3"
    assert env["OPTIMODEL_SERVING_IMAGE"] == "registry.example/serving:0.1.0"  # tag defaults to appVersion
    assert env["OPTIMODEL_IMAGE_PULL_POLICY"] == "Always"
    assert env["OPTIMODEL_SERVICE_ACCOUNT"] == "optimodel-workload"
    assert env["OPTIMODEL_PROMETHEUS_URL"] == "http://prometheus-operated.monitoring:9090"
    assert env["OPTIMODEL_NAMESPACES"] == "team-a,team-b"
    assert env["OPTIMODEL_PEERING"] == "optimodel"
    assert json.loads(env["OPTIMODEL_BUILDER_TOLERATIONS"]) == OVERRIDE["builder"]["tolerations"]
    assert json.loads(env["OPTIMODEL_BUILDER_TOOLCHAIN"]) == OVERRIDE["builder"]["toolchain"]
    assert json.loads(env["OPTIMODEL_BUILDER_RESOURCES"])["requests"]["memory"] == "8Gi"
    assert (env["OPTIMODEL_BUILDER_DEADLINE_SECONDS"], env["OPTIMODEL_BUILDER_BACKOFF_LIMIT"],
            env["OPTIMODEL_BUILDER_TTL_SECONDS"]) == ("3600", "0", "600")
    assert (env["OPTIMODEL_LOG_LEVEL"], env["OPTIMODEL_RESYNC_SECONDS"], env["OPTIMODEL_WORKERS"]) == ("DEBUG", "30", "4")
    assert container["image"] == "ghcr.io/optimodel/operator:0.1.0"


@pytest.mark.parametrize("values", [None, OVERRIDE, S3], ids=["defaults", "override", "s3"])
def test_operator_settings_parse_the_rendered_env(chart, values):
    """The operator's own parser reads what the chart sets, and every OPTIMODEL_* name is one it knows."""
    settings_mod = pytest.importorskip("optimodel_operator.settings", reason="operator package not importable")
    env = {k: v for k, v in env_of(operator_container(objects(render(chart, values)))).items() if v is not None}
    settings = settings_mod.Settings.from_env(env)
    merged = chart.merge_values(values)
    assert settings.store_uri == env["OPTIMODEL_STORE_URI"]
    assert settings.namespaces == tuple(merged["watchNamespaces"])
    assert list(settings.tolerations) == merged["builder"]["tolerations"]
    assert settings.builder_deadline_seconds == merged["builder"]["activeDeadlineSeconds"]
    assert settings.builder_backoff_limit == merged["builder"]["backoffLimit"]
    assert settings.builder_ttl_seconds == merged["builder"]["ttlSecondsAfterFinished"]
    assert dict(settings.builder_resources) == merged["builder"]["resources"]
    assert settings.image_pull_policy == merged["image"]["builder"]["pullPolicy"]
    assert settings.service_account == merged["workloadServiceAccount"]
    assert settings.peering == (merged["operator"]["peering"]["name"] if merged["operator"]["peering"]["enabled"] else "")
    assert settings.workers == merged["operator"]["workers"]
    assert settings.pvc_root == merged["store"]["pvcRoot"]
    if merged["builder"]["toolchain"]:
        assert dict(settings.toolchain) == merged["builder"]["toolchain"]
    unknown = [name for name in env if name.startswith("OPTIMODEL_") and name not in settings_mod.env_names()]
    assert unknown == [], f"the chart sets variables the operator never reads: {unknown}"


def test_builder_and_serving_pull_policies_must_agree(chart):
    with pytest.raises(helm.HelmError, match="must be equal"):
        render(chart, {"image": {"builder": {"repository": "b", "pullPolicy": "Always"}}})


def test_default_env_watches_all_namespaces_and_omits_the_toolchain(chart):
    env = env_of(operator_container(objects(render(chart))))
    assert env["OPTIMODEL_NAMESPACES"] == ""
    assert "OPTIMODEL_BUILDER_TOOLCHAIN" not in env
    assert json.loads(env["OPTIMODEL_BUILDER_TOLERATIONS"]) == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert env["OPTIMODEL_PEERING"] == ""  # standalone: needs no peering objects


def test_operator_command_and_kopf_liveness_probe(chart):
    container = operator_container(objects(render(chart)))
    assert container["command"] == ["python", "-m", "optimodel_operator"]
    assert "args" not in container
    assert env_of(container)["OPTIMODEL_LIVENESS"] == "http://0.0.0.0:8080/healthz"  # kopf.run(liveness_endpoint=...)
    [port] = container["ports"]
    assert port["containerPort"] == 8080
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and probe["port"] in (8080, port["name"])


def test_one_operator_replica_and_no_overlap_on_rollout(chart):
    # kopf peering pauses same-priority peers (or, with no peering object, both act): not HA
    deployment = one(objects(render(chart)), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_operator_pod_meets_restricted_pod_security(chart):
    pod = one(objects(render(chart, OVERRIDE)), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] != 0
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    assert all("hostPath" not in v for v in pod["volumes"])
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert sc.get("privileged") is not True
        # a read-only root still needs a writable /tmp
        assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


# ---- artifact store ----------------------------------------------------------------------


def store_volume(docs):
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    return volumes.get("store"), mounts.get("store")


def test_default_store_is_a_created_pvc_mounted_where_pvc_uris_resolve(chart):
    docs = objects(render(chart))
    pvc = one(docs, "PersistentVolumeClaim")
    claim = pvc["metadata"]["name"]
    assert env_of(operator_container(docs))["OPTIMODEL_STORE_URI"] == f"pvc://{claim}/artifacts"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volume, mount = store_volume(docs)
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    assert mount["mountPath"] == f"/mnt/pvc/{claim}"  # optimodel.storage: $OPTIMODEL_PVC_ROOT/<claim>
    assert env_of(operator_container(docs))["OPTIMODEL_PVC_ROOT"] == "/mnt/pvc"


def test_existing_claim_is_mounted_and_not_created(chart):
    docs = objects(render(chart, OVERRIDE))
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    volume, mount = store_volume(docs)
    assert volume["persistentVolumeClaim"]["claimName"] == "models"
    assert mount["mountPath"] == "/mnt/pvc/models"


def test_s3_store_mounts_nothing_and_loads_credentials(chart):
    docs = objects(render(chart, S3))
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert store_volume(docs) == (None, None)
    container = operator_container(docs)
    assert env_of(container)["OPTIMODEL_STORE_URI"] == "s3://models/optimodel"
    assert container["envFrom"] == [{"secretRef": {"name": "store-creds"}}]


def test_no_store_at_all_fails_with_a_message(chart):
    with pytest.raises(helm.HelmError, match="no artifact store"):
        render(chart, {"store": {"pvc": {"create": False}}})


# ---- values schema -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"operator": {"replicas": "two"}}, "got string, want integer"),
        ({"operator": {"replicas": 2}}, "maximum"),
        ({"store": {"uri": "ftp://host/models"}}, "does not match pattern"),
        ({"store": {"uri": "file:///srv/engines"}}, "does not match pattern"),  # no pod would see it
        ({"watchNamespaces": "team-a"}, "want array"),
        ({"podMonitor": {"enabled": "yes"}}, "want boolean"),
        ({"image": {"operator": {"repository": "x", "pullPolicy": "Sometimes"}}}, "pullPolicy"),
        ({"builder": {"tolerations": {"key": "gpu"}}}, "want array"),
        ({"opertor": {"replicas": 1}}, "additional properties 'opertor'"),
    ],
)
def test_schema_rejects_invalid_values(chart, values, message):
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        render(chart, values)


def test_schema_accepts_the_defaults_and_the_overrides(chart):
    for values in (None, OVERRIDE, S3):
        chart.validate_schema(chart.merge_values(values))


# ---- PodMonitor ------------------------------------------------------------------------


def test_pod_monitor_scrapes_serving_pods(chart):
    assert not [d for d in objects(render(chart)) if d["kind"] == "PodMonitor"]
    monitor = one(objects(render(chart, OVERRIDE)), "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert spec["selector"] == {
        "matchLabels": {"app.kubernetes.io/component": "server", "app.kubernetes.io/part-of": "optimodel"}
    }
    assert spec["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    [endpoint] = spec["podMetricsEndpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics" and endpoint["interval"] == "30s"
    # the tuner's PromQL selects by namespace (from the pod), model and arch (the server's labels)
    assert {"sourceLabels": ["__meta_kubernetes_namespace"], "targetLabel": "namespace"} in endpoint["relabelings"]
    assert set(spec) == {"selector", "namespaceSelector", "podMetricsEndpoints"}


def test_pod_monitor_selects_the_serving_pods_the_operator_renders(chart):
    render_mod = pytest.importorskip("optimodel_operator.render", reason="operator package not importable")
    from optimodel.spec import OptimizedModelSpec
    from optimodel.target import Target
    from optimodel_operator.settings import Settings

    manifest = yaml.safe_load((ROOT / "examples" / "minilm-cluster.yaml").read_text())
    spec = OptimizedModelSpec.model_validate(manifest["spec"])
    model = render_mod.ModelRef(namespace="team-a", name=manifest["metadata"]["name"], uid="uid")
    serving = render_mod.deployment(model, spec, Target(arch="sm90"), "pvc://models/x", "0" * 64, Settings())
    pod = serving["spec"]["template"]
    monitor = one(objects(render(chart, OVERRIDE)), "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in [p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
    # nor does it select builder pods
    job = render_mod.labels(model, render_mod.BUILDER, "sm90")
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= job.items()


def test_pod_monitor_watches_any_namespace_by_default(chart):
    monitor = one(objects(render(chart, {"podMonitor": {"enabled": True}})), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"any": True}


# ---- kopf peering -------------------------------------------------------------------------


def test_peering_off_by_default_creates_no_peering_objects(chart):
    docs = objects(render(chart))
    assert not [d for d in docs if d["kind"] in ("KopfPeering", "ClusterKopfPeering")]


def test_peering_clusterwide_creates_the_cluster_peering_the_operator_names(chart):
    docs = objects(render(chart, PEERED))
    [peering] = [d for d in docs if d["kind"] in ("KopfPeering", "ClusterKopfPeering")]
    assert (peering["apiVersion"], peering["kind"]) == ("kopf.dev/v1", "ClusterKopfPeering")
    assert "namespace" not in peering["metadata"]
    assert peering["metadata"]["name"] == env_of(operator_container(docs))["OPTIMODEL_PEERING"] == "optimodel"
    assert {"get", "list", "watch", "patch"} <= granted(operator_role(docs))[("kopf.dev", "clusterkopfpeerings")]


def test_peering_namespaced_creates_one_peering_per_watched_namespace(chart):
    docs = objects(render(chart, OVERRIDE))
    peerings = [d for d in docs if d["kind"] in ("KopfPeering", "ClusterKopfPeering")]
    assert {(p["kind"], p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings} == {
        ("KopfPeering", "team-a", "optimodel"), ("KopfPeering", "team-b", "optimodel")}


# ---- Argo CD health check ------------------------------------------------------------------

LUA_FILE = CHART / "files" / "argocd-health.lua"
ARGOCD_KEY = "resource.customizations.health.optimodel.io_OptimizedModel"


def test_argocd_health_lua_ships_in_a_config_map_and_notes_say_how_to_wire_it(chart):
    rendered = render(chart)
    config_map = one(objects(rendered), "ConfigMap")
    assert config_map["data"]["health.lua"].strip() == LUA_FILE.read_text().strip()
    assert "hs.status" in config_map["data"]["health.lua"]
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    assert ARGOCD_KEY in notes and "argocd-cm" in notes
    disabled = objects(render(chart, {"argocd": {"healthCheck": {"enabled": False}}}))
    assert not [d for d in disabled if d["kind"] == "ConfigMap"]


def model(generation=2, observed=2, ready=None, ready_generation=None):
    obj = {"apiVersion": "optimodel.io/v1alpha1", "kind": "OptimizedModel",
           "metadata": {"name": "digits", "namespace": "ml", "generation": generation}}
    if observed is None and ready is None:
        return obj
    status: dict = {"observedGeneration": observed, "conditions": []}
    if ready is not None:
        status_value, reason = ready
        cond = {"type": "Ready", "status": status_value, "reason": reason, "message": f"{reason} happened",
                "lastTransitionTime": "2026-11-01T00:00:00Z"}
        if ready_generation is not None:
            cond["observedGeneration"] = ready_generation
        status["conditions"] = [{"type": "Built", "status": "True", "reason": "Succeeded",
                                 "lastTransitionTime": "2026-11-01T00:00:00Z"}, cond]
    obj["status"] = status
    return obj


@pytest.fixture(scope="module")
def health():
    """Runs the chart's Lua the way Argo CD does: Lua 5.1 (gopher-lua), the object as global `obj`."""
    lua51 = pytest.importorskip("lupa.lua51", reason="lupa (pip install lupa) runs the Argo CD Lua; not installed")
    script = LUA_FILE.read_text()

    def run(obj: dict) -> tuple[str, str]:
        lua = lua51.LuaRuntime(unpack_returned_tuples=True)
        lua.globals().obj = lua.table_from(obj, recursive=True)
        result = lua.execute(script)
        return result["status"], result["message"]

    return run


@pytest.mark.parametrize(
    "obj, expected",
    [
        (model(ready=("True", "Serving"), ready_generation=2), "Healthy"),
        (model(ready=("False", "AccuracyGateFailed")), "Degraded"),
        (model(ready=("False", "BuildFailed")), "Degraded"),
        (model(ready=("False", "RolloutFailed")), "Degraded"),  # any *Failed reason
        (model(ready=("False", "Building")), "Progressing"),
        (model(ready=("Unknown", "Pending")), "Progressing"),
        (model(generation=3, observed=2, ready=("True", "Serving")), "Progressing"),  # spec changed, not seen yet
        (model(generation=3, observed=3, ready=("True", "Serving"), ready_generation=2), "Progressing"),
        (model(observed=2), "Progressing"),  # no Ready condition yet
        (model(observed=None), "Progressing"),  # no status at all
    ],
    ids=["ready", "gate-failed", "build-failed", "any-failed", "building", "unknown",
         "generation-ahead", "stale-ready", "no-ready", "no-status"],
)
def test_argocd_health_lua(health, obj, expected):
    status, message = health(obj)
    assert status == expected, message
    assert message


def test_argocd_health_lua_degrades_on_every_build_failure_reason(health):
    from optimodel.build import BuildReason

    failures = [r.value for r in BuildReason if r not in (BuildReason.SUCCEEDED, BuildReason.CACHE_HIT)]
    assert "AccuracyGateFailed" in failures
    wrong = {r: health(model(ready=("False", r)))[0] for r in failures}
    assert {r: s for r, s in wrong.items() if s != "Degraded"} == {}, "add the reason to degradedReasons in files/argocd-health.lua"
    status, message = health(model(ready=("False", "AccuracyGateFailed")))
    assert message == "AccuracyGateFailed: AccuracyGateFailed happened"


# ---- the documented install command --------------------------------------------------------


def test_readme_install_command_renders(chart):
    readme = (CHART / "README.md").read_text()
    command = readme.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    assert command.startswith("helm install optimodel charts/optimodel")
    values: dict = {}
    args = command.split()
    for flag, expression in zip(args, args[1:]):
        if flag == "--set":
            values = _deep_merge(values, helm.parse_set_string(expression))
    assert values["store"]["uri"].startswith("s3://")
    docs = objects(chart.render(values, name="optimodel", namespace="optimodel-system"))
    for doc in docs:
        if doc["kind"] != "PodMonitor":
            kubernetes_validate.validate(doc, KUBE, strict=True)
    assert one(docs, "Deployment")["metadata"]["name"] == "optimodel"
    assert one(docs, "PodMonitor")


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def test_packaged_chart_keeps_the_crd_and_the_lua(tmp_path):
    archive = helm.package(CHART, destination=tmp_path)
    assert Path(archive).name == "optimodel-0.1.0.tgz"
    with helm.Chart.load(archive) as packaged:
        crds = {c["filename"].rsplit("/", 1)[-1]: c["data"] for c in packaged.crds}
        assert sorted(crds) == ["kopf-peering.yaml", "optimizedmodel.yaml"]
        assert crds["optimizedmodel.yaml"].encode() == (ROOT / "crds" / "optimizedmodel.yaml").read_bytes()
        config_map = one(objects(render(packaged)), "ConfigMap")
    assert config_map["data"]["health.lua"].strip() == LUA_FILE.read_text().strip()
