"""Peering that cannot pause silently (issue 9 item 3)."""

from __future__ import annotations

import asyncio
import os
import sys

import kmock as kmock_lib

from kube_emulator import VERBS
from optimodel_operator.kube import Kube, load_configuration
from optimodel_operator.peering import peering_problem
from optimodel_operator.settings import Settings

PEERING = "kopf.dev/v1/clusterkopfpeerings"


def test_standalone_is_the_default_when_run_by_hand():
    assert Settings.from_env({}).peering == ""


async def test_missing_peering_object_names_the_crd_and_the_setting(kmock, operator_env):
    kube = await asyncio.to_thread(lambda: Kube(load_configuration(os.environ["KUBECONFIG"])))
    try:
        assert await asyncio.to_thread(peering_problem, kube, "", ()) is None
        problem = await asyncio.to_thread(peering_problem, kube, "optimodel", ())
        assert "OPTIMODEL_PEERING=optimodel" in problem and "clusterkopfpeerings.kopf.dev" in problem
        problem = await asyncio.to_thread(peering_problem, kube, "optimodel", ("ml",))
        assert "KopfPeering ml/optimodel" in problem and "kopfpeerings.kopf.dev" in problem
        # the chart's crds/kopf-peering.yaml applied, and its operator.peering.enabled object
        kmock.resources[PEERING] = kmock_lib.ResourceInfo(kind="ClusterKopfPeering", namespaced=False, verbs=VERBS)
        await kmock.put(PEERING, {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                  "metadata": {"name": "optimodel"}})
        assert await asyncio.to_thread(peering_problem, kube, "optimodel", ()) is None
    finally:
        kube.close()


async def test_operator_refuses_to_start_with_a_peering_that_does_not_exist(kmock, operator_env):
    env = {**os.environ, "OPTIMODEL_PEERING": "optimodel", "OPTIMODEL_LIVENESS": ""}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "optimodel_operator", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 2, text
    assert "ERROR" in text and "ClusterKopfPeering optimodel does not exist" in text
    assert "OPTIMODEL_PEERING=" in text
