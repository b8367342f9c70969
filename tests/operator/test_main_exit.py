"""`python -m optimodel_operator` refuses to start, with one clear line, when it cannot work."""

from __future__ import annotations

import os
import subprocess
import sys


def run_operator(tmp_path, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "OPTIMODEL_"))}
    return subprocess.run([sys.executable, "-m", "optimodel_operator"], capture_output=True, text=True, timeout=120,
                          env={**base, "HOME": str(tmp_path), "OPTIMODEL_LIVENESS": "", **env})


def test_no_cluster_and_no_kubeconfig_exits_3_naming_both(tmp_path):
    proc = run_operator(tmp_path)
    assert proc.returncode == 3
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("optimodel-operator: no Kubernetes credentials: not in a cluster")
    assert "~/.kube/config" in line


def test_unreadable_kubeconfig_is_named(tmp_path):
    broken = tmp_path / "kubeconfig"
    broken.write_text("clusters: [\n")
    proc = run_operator(tmp_path, KUBECONFIG=str(broken))
    assert proc.returncode == 3 and str(broken) in proc.stderr


def test_an_invalid_setting_exits_2_before_looking_for_a_cluster(tmp_path):
    proc = run_operator(tmp_path, OPTIMODEL_WORKERS="many")
    assert proc.returncode == 2
    assert "OPTIMODEL_WORKERS='many'" in proc.stderr and "integer" in proc.stderr
