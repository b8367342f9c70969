"""The serving command line the operator renders: the p99 SLO becomes the admission deadline."""

from __future__ import annotations

from optimodel.target import Target
from optimodel_operator import reconcile, render
from optimodel_operator.settings import Settings

from operator_helpers import TOOLCHAIN, model

REF = render.ModelRef(namespace="ml", name="digits", uid="u1")


def _command(spec_dict: dict) -> list[str]:
    spec = reconcile.OptimizedModelSpec.model_validate(spec_dict)
    dep = render.deployment(REF, spec, Target(arch="cpu"), "file:///x", "k", Settings(store_uri="pvc://store/artifacts", toolchain=TOOLCHAIN))
    return dep["spec"]["template"]["spec"]["containers"][0]["command"]


def test_slo_is_the_deadline_and_absent_without_one():
    spec = model()["spec"]
    assert "--deadline-ms" not in _command(spec)
    spec["serving"]["batching"]["autotune"] = {"enabled": True, "p99LatencyMs": 25, "minWaitMs": 0, "maxWaitMs": 20}
    cmd = _command(spec)
    assert cmd[cmd.index("--deadline-ms") + 1] == "25"


def test_grpc_port_is_served_and_exposed():
    cmd = _command(model()["spec"])
    assert cmd[cmd.index("--grpc-port") + 1] == str(render.GRPC_PORT)
    spec = reconcile.OptimizedModelSpec.model_validate(model()["spec"])
    dep = render.deployment(REF, spec, Target(arch="cpu"), "file:///x", "k", Settings(store_uri="pvc://store/artifacts",
                                                                                     toolchain=TOOLCHAIN))
    ports = {p["name"]: p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"http": render.PORT, "grpc": render.GRPC_PORT}
    svc = {p["name"]: p for p in render.service(REF)["spec"]["ports"]}
    assert svc["grpc"]["port"] == render.GRPC_PORT and svc["grpc"]["targetPort"] == "grpc"
