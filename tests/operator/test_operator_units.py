"""Unit tests of the pure parts: discovery, rendering, reconcile decisions, conditions, settings."""

from __future__ import annotations

import json

import pytest

from optimodel.target import Target
from optimodel_operator import discovery, render, reconcile
from optimodel_operator import status as cond
from optimodel_operator.reconcile import (Apply, CreateJob, DeleteJob, DeploymentView, JobView, Observed, PodView,
                                          Scale, decide)
from optimodel_operator.settings import Settings, SettingsError

from kube_emulator import selector_matches
from operator_helpers import A100, H100, L4, TOOLCHAIN, gpu_node, model

SETTINGS = Settings(store_uri="file:///store", toolchain=TOOLCHAIN, allow_file_uris=True)
REF = render.ModelRef(namespace="ml", name="digits", uid="uid-1")
SM80 = Target(arch="sm80", product="NVIDIA-A100-SXM4-80GB")
SM90 = Target(arch="sm90", product="NVIDIA-H100-80GB-HBM3")
NOW = "2026-01-01T00:00:00Z"


def run(spec=None, status=None, fleet=None, observed=None, published=(), secrets=(), generation=1):
    return decide(model=REF, raw_spec=spec if spec is not None else model()["spec"], generation=generation,
                  status=status, fleet={"sm80": SM80} if fleet is None else fleet,
                  observed=observed or Observed(), settings=SETTINGS,
                  published=lambda uri: any(uri.endswith(k) for k in published),
                  secret_exists=lambda name: name in secrets, now=NOW)


def of(decision, kind):
    return [a for a in decision.actions if isinstance(a, kind)]


# ---- discovery ------------------------------------------------------------------------------

def test_node_target_reads_gfd_labels():
    assert discovery.node_target(gpu_node(*A100)) == SM80


@pytest.mark.parametrize("node", [
    gpu_node(*A100, ready=False), gpu_node(*A100, cordoned=True), gpu_node(*A100, gpus=0),
    {**gpu_node(*A100), "metadata": {"name": "x", "labels": {"nvidia.com/gpu.family": "ampere"}}},
])
def test_unusable_nodes_offer_no_target(node):
    assert discovery.node_target(node) is None


def test_fleet_keeps_one_stable_product_per_arch():
    other = Target(arch="sm80", product="NVIDIA-A100-PCIE-40GB")
    assert discovery.fleet([SM80, other, None, SM90]) == {"sm80": other, "sm90": SM90}
    assert discovery.fleet([other, SM80]) == discovery.fleet([SM80, other])


def test_desired_targets_auto_explicit_and_cpu_fallback():
    fleet = {"sm80": SM80, "sm90": SM90}
    assert list(discovery.desired_targets("auto", False, fleet)[0]) == ["sm80", "sm90"]
    assert discovery.desired_targets(["sm90", "sm89"], False, fleet) == ({"sm90": SM90}, ["sm89"])
    assert list(discovery.desired_targets("auto", False, {})[0]) == ["cpu"]  # no GPU: CPU
    assert list(discovery.desired_targets(["sm90"], True, fleet)[0]) == ["sm90", "cpu"]


# ---- render -----------------------------------------------------------------------------------

def test_child_names_are_dns_labels_and_unique_when_cut():
    long = "m" * 60
    a, b = render.child_name(long, "build", "sm90", "aaaa"), render.child_name(long, "build", "sm90", "bbbb")
    assert len(a) <= 63 and len(b) <= 63 and a != b


def test_builder_job_is_restricted_and_pinned_to_its_arch():
    spec = reconcile.OptimizedModelSpec.model_validate(model()["spec"])
    job = render.builder_job(REF, spec, SM90, "k" * 32, "digits-build", SETTINGS, 3)
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"][-2:] == ["--request", "/etc/optimodel/request/request.json"]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.compute.major": "9", "nvidia.com/gpu.compute.minor": "0"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job["spec"]["backoffLimit"] == 1 and job["spec"]["activeDeadlineSeconds"] == 7200
    assert job["metadata"]["labels"]["optimodel.io/cache-key"] == "k" * 32
    assert job["metadata"]["ownerReferences"] == [REF.owner_reference()]
    assert {v["name"] for v in pod["volumes"]} >= {"request", "tmp"}


def test_pvc_store_is_mounted_where_storage_resolves_it():
    spec = reconcile.OptimizedModelSpec.model_validate(model()["spec"])
    settings = Settings(store_uri="pvc://engines/artifacts", toolchain=TOOLCHAIN)
    dep = render.deployment(REF, spec, SM80, "pvc://engines/artifacts/ml/digits/k", "k", settings)
    mounts = dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "pvc-0", "mountPath": "/mnt/pvc/engines", "readOnly": True} in mounts


def test_deployment_runs_the_server_with_probes_and_config():
    spec = reconcile.OptimizedModelSpec.model_validate(model()["spec"])
    dep = render.deployment(REF, spec, SM80, "file:///store/ml/digits/k", "k", SETTINGS)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][:3] == ["python", "-m", "serving_image"]
    assert c["command"][c["command"].index("--config") + 1] == "/etc/optimodel/batching/batching.json"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["selector"]["matchLabels"]["optimodel.io/arch"] == "sm80"
    cpu = render.deployment(REF, spec, Target(arch="cpu"), "file:///x", "k", SETTINGS)
    assert "nodeSelector" not in cpu["spec"]["template"]["spec"]


def test_batching_keeps_the_tuned_window_only_with_autotune():
    spec = reconcile.OptimizedModelSpec.model_validate(model()["spec"])
    assert render.batching_config(spec, 9.0).max_wait_ms == 2.0
    tuned = model(serving={"batching": {"maxWaitMs": 2, "autotune": {"enabled": True, "p99LatencyMs": 20,
                                                                      "maxWaitMs": 8}}})["spec"]
    spec = reconcile.OptimizedModelSpec.model_validate(tuned)
    assert render.batching_config(spec, 5.0).max_wait_ms == 5.0
    assert render.batching_config(spec, 50.0).max_wait_ms == 8.0


# ---- reconcile decisions ------------------------------------------------------------------------

def test_fresh_model_creates_one_job_per_target():
    d = run(fleet={"sm80": SM80, "sm90": SM90})
    jobs = of(d, CreateJob)
    assert sorted(j.arch for j in jobs) == ["sm80", "sm90"]
    assert all(j.request["metadata"]["name"] == j.name for j in jobs)
    request = json.loads(jobs[0].request["data"]["request.json"])
    assert request["cacheKey"] == jobs[0].cache_key and request["artifactUri"].endswith(jobs[0].cache_key)
    assert {e["arch"]: e["state"] for e in d.patch["engines"]} == {"sm80": "Building", "sm90": "Building"}
    assert not of(d, Apply)  # nothing to serve yet


def test_cache_hit_creates_no_job_and_rolls_out():
    key = reconcile.target_keys(reconcile.OptimizedModelSpec.model_validate(model()["spec"]), {"sm80": SM80},
                                SETTINGS)["sm80"]
    d = run(published=[key])
    assert not of(d, CreateJob)
    assert {a.obj["kind"] for a in of(d, Apply)} == {"ConfigMap", "Service", "Deployment"}
    assert d.patch["engines"][0]["reason"] == "CacheHit"


def test_existing_job_is_not_created_again():
    first = of(run(), CreateJob)[0]
    d = run(observed=Observed(jobs={first.name: JobView(first.name, "sm80", first.cache_key, "Active")}))
    assert not of(d, CreateJob)


def test_toolchain_and_max_batch_size_change_the_key_but_replicas_do_not():
    spec = model()["spec"]
    base = of(run(spec), CreateJob)[0].cache_key
    spec["serving"]["replicas"] = 7
    assert of(run(spec), CreateJob)[0].cache_key == base
    spec["serving"]["maxBatchSize"] = 64
    assert of(run(spec), CreateJob)[0].cache_key != base


def test_key_follows_the_builder_image_and_the_cpu_class_and_never_the_operators_environment():
    spec = model(targets={"gpuArchitectures": [], "cpu": True})["spec"]

    def cpu_job(**settings):
        d = decide(model=REF, raw_spec=spec, generation=1, status=None, fleet={}, observed=Observed(),
                   settings=Settings(store_uri="file:///store", allow_file_uris=True, **settings),
                   published=lambda uri: False, secret_exists=lambda name: True, now=NOW)
        return of(d, CreateJob)[0]

    image1, image2 = cpu_job(builder_image="reg/b:1"), cpu_job(builder_image="reg/b:2")
    assert image1.cache_key != image2.cache_key
    request = json.loads(image1.request["data"]["request.json"])
    assert request["toolchain"] == {"builderImage": "reg/b:1"}
    assert request["target"]["cpuClass"] == "portable"
    # declared versions (the chart's builder.toolchain) are the key's toolchain, whatever the tag
    assert cpu_job(builder_image="reg/b:1", toolchain=TOOLCHAIN).cache_key == \
        cpu_job(builder_image="reg/b:2", toolchain=TOOLCHAIN).cache_key
    portable, vnni = cpu_job(), cpu_job(cpu_class="vnni")
    assert portable.cache_key != vnni.cache_key
    # a vnni engine is built and served only on VNNI nodes; a portable one anywhere
    assert "affinity" not in portable.job["spec"]["template"]["spec"]
    terms = vnni.job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {t["matchExpressions"][0]["key"] for t in terms} == {
        "feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI", "feature.node.kubernetes.io/cpu-cpuid.AVXVNNI"}
    vnni_settings = Settings(store_uri="file:///store", allow_file_uris=True, cpu_class="vnni")
    dep = render.deployment(REF, reconcile.OptimizedModelSpec.model_validate(spec), vnni_settings.cpu_target,
                            "file:///store/x", vnni.cache_key, vnni_settings)
    assert dep["spec"]["template"]["spec"]["affinity"] == vnni.job["spec"]["template"]["spec"]["affinity"]
    with pytest.raises(SettingsError, match="OPTIMODEL_CPU_CLASS"):
        Settings.from_env({"OPTIMODEL_CPU_CLASS": "avx9000"})


def test_gpu_builds_share_a_timing_cache_per_arch_and_tensorrt_version():
    request = json.loads(of(run(), CreateJob)[0].request["data"]["request.json"])
    assert request["timingCacheUri"] == f"file:///store/_timing-cache/sm80/tensorrt-{TOOLCHAIN['tensorrt']}.cache"
    cpu = of(run(spec=model(targets={"gpuArchitectures": [], "cpu": True})["spec"]), CreateJob)[0]
    assert "timingCacheUri" not in json.loads(cpu.request["data"]["request.json"])
    by_image = Settings(builder_image="reg/b:1").tensorrt_version()
    assert by_image.startswith("image-") and by_image != Settings(builder_image="reg/b:2").tensorrt_version()


def test_two_products_of_one_arch_share_key_job_and_deployment():
    other = Target(arch="sm80", product="NVIDIA-A100-PCIE-40GB")
    a, b = of(run(fleet={"sm80": SM80}), CreateJob)[0], of(run(fleet={"sm80": other}), CreateJob)[0]
    assert (a.name, a.cache_key) == (b.name, b.cache_key)
    # the Job's node selector, like the Deployment's, names the architecture, not the product
    assert a.job["spec"]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.compute.major": "8", "nvidia.com/gpu.compute.minor": "0"}


def _built_status(spec=None):
    """status and observed world of a model serving on sm80."""
    d = run(spec)
    job = of(d, CreateJob)[0]
    key, uri = job.cache_key, f"file:///store/ml/digits/{job.cache_key}"
    done = run(spec, status=d.status, published=[key],
               observed=Observed(jobs={job.name: JobView(job.name, "sm80", key, "Succeeded")}))
    dep = next(a.obj for a in of(done, Apply) if a.obj["kind"] == "Deployment")
    dep["status"] = {"observedGeneration": 0, "updatedReplicas": 2, "availableReplicas": 2}
    return done.status, DeploymentView.from_deployment(dep), uri


def test_failed_rebuild_keeps_serving_previous_engine_and_stops():
    status, dep, old_uri = _built_status()
    spec = model(optimization={"precision": "int8", "calibration": {"datasetUri": "file:///c.npz"},
                               "accuracyGate": {"datasetUri": "file:///g.npz"}})["spec"]
    d = run(spec, status=status, observed=Observed(deployments={"sm80": dep}), generation=2)
    new = of(d, CreateJob)[0]
    assert not [a for a in of(d, Apply) if a.obj["kind"] == "Deployment"]  # old engine, no change
    line = json.dumps({"state": "Failed", "reason": "AccuracyGateFailed", "cacheKey": new.cache_key,
                       "message": "drop 0.05 > 0.005"})
    observed = Observed(jobs={new.name: JobView(new.name, "sm80", new.cache_key, "Failed", "BackoffLimitExceeded")},
                        pods={new.name: [PodView("p", new.name, terminated_message=line, exit_code=1)]},
                        deployments={"sm80": dep})
    failed = run(spec, status=d.status, observed=observed, generation=2)
    eng = failed.patch["engines"][0]
    assert (eng["state"], eng["reason"]) == ("Failed", "AccuracyGateFailed")
    gate = cond.get(failed.patch["conditions"], "AccuracyGatePassed")
    assert gate["status"] == "False"
    assert cond.get(failed.patch["conditions"], "Serving")["status"] == "True"
    assert cond.get(failed.patch["conditions"], "Ready")["reason"] == "AccuracyGateFailed"
    assert not of(failed, Apply) or all(a.obj["kind"] != "Deployment" for a in of(failed, Apply))
    # once the Job is gone (ttl), the failed key still is not rebuilt
    later = run(spec, status=failed.status, observed=Observed(deployments={"sm80": dep}), generation=2)
    assert not of(later, CreateJob)


def test_departed_arch_scales_to_zero_and_stops_its_build():
    status, dep, _ = _built_status()
    building = JobView("digits-build-sm80-x", "sm80", "x", "Active")
    d = run(status=status, fleet={}, observed=Observed(deployments={"sm80": dep}, jobs={building.name: building}))
    assert of(d, Scale) == [Scale(dep.name, 0)]
    assert of(d, DeleteJob)[0].name == building.name
    assert next(e for e in d.patch["engines"] if e["arch"] == "sm80")["state"] == "Removed"


def test_serving_change_reapplies_deployment_only():
    status, dep, uri = _built_status()
    spec = model()["spec"]
    spec["serving"]["replicas"] = 4
    d = run(spec, status=status, observed=Observed(deployments={"sm80": dep}), generation=2)
    assert not of(d, CreateJob)
    (apply,) = [a for a in of(d, Apply) if a.obj["kind"] == "Deployment"]
    assert apply.obj["spec"]["replicas"] == 4
    cmd = apply.obj["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--artifact") + 1] == uri


def test_invalid_spec_names_the_field_and_acts_on_nothing():
    spec = model()["spec"]
    spec["optimization"]["precision"] = "int4"
    d = run(spec)
    assert not d.actions and not d.valid
    ready = cond.get(d.patch["conditions"], "Ready")
    assert ready["reason"] == "InvalidSpecOptimizationPrecision" and "spec.optimization.precision" in ready["message"]


def test_missing_secret_blocks_the_job():
    spec = model()["spec"]
    spec["model"]["credentialsSecret"] = "creds"
    d = run(spec)
    assert not of(d, CreateJob)
    assert cond.get(d.patch["conditions"], "Built")["reason"] == "SecretMissing"
    assert of(run(spec, secrets=["creds"]), CreateJob)


def test_vanished_job_is_recreated_with_a_warning():
    d = run()
    again = run(status=d.status)
    assert of(again, CreateJob) and [e.reason for e in again.all_events()] == ["BuildJobMissing"]


def test_image_pull_failure_is_its_own_reason():
    job = of(run(), CreateJob)[0]
    pod = PodView("p", job.name, waiting_reason="ImagePullBackOff", waiting_message="not found")
    d = run(observed=Observed(jobs={job.name: JobView(job.name, "sm80", job.cache_key, "Active")},
                              pods={job.name: [pod]}))
    assert cond.get(d.patch["conditions"], "Built")["reason"] == "BuilderImagePullFailed"


def test_job_view_states():
    assert JobView.from_job({"metadata": {"name": "j"}, "status": {"succeeded": 1}}).state == "Succeeded"
    failed = JobView.from_job({"metadata": {"name": "j"}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}})
    assert (failed.state, failed.reason) == ("Failed", "DeadlineExceeded")


# ---- conditions ---------------------------------------------------------------------------------

def test_transition_time_moves_only_on_flip():
    first = cond.merge_conditions([], [cond.condition("Built", False, "Building")], 1, "t1")
    same = cond.merge_conditions(first, [cond.condition("Built", False, "BuildFailed", "x")], 2, "t2")
    flip = cond.merge_conditions(same, [cond.condition("Built", True, "Built")], 2, "t3")
    assert [c["lastTransitionTime"] for c in (first[0], same[0], flip[0])] == ["t1", "t1", "t3"]
    assert same[0]["observedGeneration"] == 2


def test_foreign_conditions_survive():
    tuned = {"type": "Tuned", "status": "True", "reason": "Tuned", "lastTransitionTime": "t0"}
    merged = cond.merge_conditions([tuned], [cond.condition("Ready", True, "Ready")], 1, "t1")
    assert tuned in merged


def test_status_write_skipped_when_nothing_but_time_changed():
    d = run()
    again = run(status=d.status, observed=Observed(jobs={a.name: JobView(a.name, a.arch, a.cache_key, "Active")
                                                         for a in of(d, CreateJob)}))
    assert not reconcile.status_changed(d.patch, again.patch)


# ---- settings and the emulator's selectors ------------------------------------------------------

def test_settings_from_env():
    s = Settings.from_env({"OPTIMODEL_NAMESPACES": "a, b,", "OPTIMODEL_BUILDER_TOOLCHAIN": '{"onnx": "1"}',
                           "OPTIMODEL_STORE_URI": "s3://bucket/engines", "OPTIMODEL_RESYNC_SECONDS": "2.5"})
    assert s.namespaces == ("a", "b") and s.toolchain_for(SM80) == {"onnx": "1"} and s.resync_seconds == 2.5
    with pytest.raises(SettingsError, match="OPTIMODEL_STORE_URI"):
        Settings.from_env({"OPTIMODEL_STORE_URI": "ftp://x"})
    with pytest.raises(SettingsError, match="OPTIMODEL_BUILDER_TOLERATIONS"):
        Settings.from_env({"OPTIMODEL_BUILDER_TOLERATIONS": "{}"})


def test_label_selectors():
    labels = {"a": "1", "b": "2"}
    assert selector_matches("a=1,b", labels) and selector_matches("a in (1,3),!c", labels)
    assert not selector_matches("a!=1", labels) and not selector_matches("b notin (2)", labels)


# ---- issue 13: statuses as a cluster writes them ------------------------------------------------

def _deployment(replicas=1, generation=2, **status):
    return {"metadata": {"name": "digits-sm80", "generation": generation, "labels": {render.L_ARCH: "sm80"}},
            "spec": {"replicas": replicas}, "status": {"observedGeneration": generation, **status}}


@pytest.mark.parametrize("status, rolled_out", [
    # mid-surge: the one available pod is the old one
    ({"replicas": 2, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}, False),
    ({"replicas": 1, "updatedReplicas": 1, "readyReplicas": 0, "availableReplicas": 0}, False),
    ({"replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}, True),
])
def test_deployment_rolled_out_by_the_kubectl_rule(status, rolled_out):
    assert DeploymentView.from_deployment(_deployment(**status)).available is rolled_out
    stale = _deployment(**status)
    stale["metadata"]["generation"] = 3  # the controller has not seen the latest spec
    assert not DeploymentView.from_deployment(stale).available


def test_progress_deadline_exceeded_is_read_with_its_message():
    dep = _deployment(replicas=1, updatedReplicas=1, conditions=[
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
         "message": 'ReplicaSet "digits-sm80-1" has timed out progressing.'}])
    assert DeploymentView.from_deployment(dep).stuck == 'ReplicaSet "digits-sm80-1" has timed out progressing.'


@pytest.mark.parametrize("conditions, state", [
    ([{"type": "SuccessCriteriaMet", "status": "True"}], "Succeeded"),
    ([{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"}], "Failed"),
    ([{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"},
      {"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}], "Failed"),
])
def test_job_outcome_is_decided_by_the_interim_conditions(conditions, state):
    job = {"metadata": {"name": "j", "labels": {}}, "status": {"conditions": conditions}}
    assert JobView.from_job(job).state == state


def test_builder_job_fails_at_once_on_deterministic_exit_codes():
    spec = reconcile.OptimizedModelSpec.model_validate(model()["spec"])
    job = render.builder_job(REF, spec, SM80, "k" * 32, "digits-build", SETTINGS)
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "builder", "operator": "In",
                                                            "values": [2, 3]}}
    assert rules[1]["action"] == "Ignore"


def test_accuracy_is_read_when_the_artifact_shows_before_the_job_completes():
    d = run(model(optimization={"precision": "fp16", "accuracyGate": {"datasetUri": "file:///g.npz"}})["spec"])
    job = of(d, CreateJob)[0]
    line = json.dumps({"state": "Succeeded", "reason": "Succeeded", "cacheKey": job.cache_key,
                       "accuracy": {"metric": "top1-agreement", "original": 1.0, "optimized": 0.998,
                                    "drop": 0.002}})
    observed = Observed(jobs={job.name: JobView(job.name, "sm80", job.cache_key, "Active")},
                        pods={job.name: [PodView("p", job.name, terminated_message=line, exit_code=0)]})
    ready = run(model(optimization={"precision": "fp16", "accuracyGate": {"datasetUri": "file:///g.npz"}})["spec"],
                status=d.status, observed=observed, published=[job.cache_key])
    eng = ready.patch["engines"][0]
    assert eng["state"] == "Ready" and eng["accuracy"]["optimized"] == 0.998


def test_cluster_refuses_code_beside_a_manifest_and_file_uris():
    spec = model()["spec"]
    spec["model"].update(uri="s3://b/digits.pt", format="pytorch", entrypoint="digits_cnn:build_model")
    d = run(spec)
    assert not d.valid and not d.actions
    ready = cond.get(d.patch["conditions"], "Ready")
    assert ready["reason"] == "InvalidSpecModelCode" and ready["message"].startswith("spec.model.code:")

    strict = Settings(store_uri="s3://b/engines", toolchain=TOOLCHAIN)
    gated = model(optimization={"precision": "int8", "calibration": {"datasetUri": "s3://b/c.npz"},
                                "accuracyGate": {"datasetUri": "file:///g.npz"}})["spec"]
    gated["model"]["uri"] = "s3://b/digits.onnx"
    d = decide(model=REF, raw_spec=gated, generation=1, status=None, fleet={"sm80": SM80}, observed=Observed(),
               settings=strict, published=lambda uri: False, secret_exists=lambda name: True, now=NOW)
    ready = cond.get(d.patch["conditions"], "Ready")
    assert ready["reason"] == "InvalidSpecOptimizationAccuracyGateDatasetUri" and not d.actions
    assert ready["message"].startswith("spec.optimization.accuracyGate.datasetUri: file:///g.npz")


def test_file_store_is_refused_unless_every_pod_sees_the_operators_files():
    with pytest.raises(SettingsError, match="OPTIMODEL_STORE_URI=file:///store.*pvc://"):
        Settings.from_env({"OPTIMODEL_STORE_URI": "file:///store"})
    allowed = Settings.from_env({"OPTIMODEL_STORE_URI": "file:///store", "OPTIMODEL_ALLOW_FILE_URIS": "true"})
    assert allowed.allow_file_uris and allowed.store_uri == "file:///store"
    with pytest.raises(SettingsError, match="OPTIMODEL_ALLOW_FILE_URIS"):
        Settings.from_env({"OPTIMODEL_ALLOW_FILE_URIS": "yes"})
