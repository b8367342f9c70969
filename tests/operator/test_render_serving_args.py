"""The serving command line the operator renders: the p99 SLO becomes the admission deadline."""

from __future__ import annotations

from optimodel.target import Target
from optimodel_operator import reconcile, render
from optimodel_operator.settings import Settings

from operator_helpers import TOOLCHAIN, model

REF = render.ModelRef(namespace="ml", name="digits", uid="u1")


def _command(spec_dict: dict) -> list[str]:
    spec = reconcile.OptimizedModelSpec.model_validate(spec_dict)
    dep = render.deployment(REF, spec, Target(arch="cpu"), "file:///x", "k", Settings(store_uri="file:///store", toolchain=TOOLCHAIN))
    return dep["spec"]["template"]["spec"]["containers"][0]["command"]


def test_slo_is_the_deadline_and_absent_without_one():
    spec = model()["spec"]
    assert "--deadline-ms" not in _command(spec)
    spec["serving"]["batching"]["autotune"] = {"enabled": True, "p99LatencyMs": 25, "minWaitMs": 0, "maxWaitMs": 20}
    cmd = _command(spec)
    assert cmd[cmd.index("--deadline-ms") + 1] == "25"
