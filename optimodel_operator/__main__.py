"""`python -m optimodel_operator`: run the operator against the current kubeconfig or in-cluster config.

Watches every namespace unless OPTIMODEL_NAMESPACES lists some. Standalone by
default; replicas coordinate through kopf peering when OPTIMODEL_PEERING names the
ClusterKopfPeering (or the KopfPeering in each watched namespace), and the start
refuses to run (exit 2, an ERROR naming the missing object and CRD) when it is absent,
because kopf would otherwise pause every watch in silence. kopf has no leader election: it
pauses every operator but the one of the highest priority, and pauses *all* of
them when priorities tie. So each process takes a random priority (or
OPTIMODEL_PEERING_PRIORITY): one replica acts, the others stand by and resume
when its peering entry expires.
See optimodel_operator.settings for every variable.

Exit codes: 2 a setting is invalid; 3 no Kubernetes credentials (neither in a cluster nor
a kubeconfig): kopf would otherwise retry its startup forever and the pod would look alive.
"""

from __future__ import annotations

import logging
import os
import random
import sys

import kopf

from optimodel_operator.settings import Settings, SettingsError


def missing_credentials(kubeconfig: str = "") -> str | None:
    """Why no cluster can be reached (in-cluster service account, then kubeconfig), or None."""
    import yaml
    from kubernetes import config

    try:
        config.load_incluster_config()
        return None
    except config.ConfigException as exc:
        in_cluster = str(exc)
    try:
        config.load_kube_config(config_file=kubeconfig or None)
        return None
    except (config.ConfigException, OSError, ValueError, yaml.YAMLError) as exc:
        return (f"no Kubernetes credentials: not in a cluster ({in_cluster}) "
                f"and no usable kubeconfig at {kubeconfig or '~/.kube/config'} ({exc})")


def main() -> int:
    try:
        cfg = Settings.from_env(os.environ)
    except SettingsError as exc:
        print(f"optimodel-operator: {exc}", file=sys.stderr)
        return 2
    problem = missing_credentials(cfg.kubeconfig)
    if problem:
        print(f"optimodel-operator: {problem}", file=sys.stderr)
        return 3
    kopf.configure(verbose=cfg.log_level == "DEBUG", log_format=kopf.LogFormat.PLAIN)
    logging.getLogger().setLevel(getattr(logging, cfg.log_level))
    log = logging.getLogger("optimodel_operator")
    if cfg.peering:
        from optimodel_operator.kube import Kube, load_configuration
        from optimodel_operator.peering import peering_problem

        kube = Kube(load_configuration(cfg.kubeconfig))
        try:
            problem = peering_problem(kube, cfg.peering, cfg.namespaces)
        finally:
            kube.close()
        if problem:
            print(f"optimodel-operator: ERROR: {problem}", file=sys.stderr)
            return 2
        log.info("kopf peering %s: this replica acts only while it has the highest priority", cfg.peering)
    else:
        log.warning("running standalone (OPTIMODEL_PEERING is empty): run one replica only")
    import optimodel_operator.handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        clusterwide=not cfg.namespaces,
        namespaces=list(cfg.namespaces),
        peering_name=cfg.peering or None,
        standalone=not cfg.peering,
        priority=cfg.peering_priority or random.randint(1, 2**31 - 1),
        liveness_endpoint=cfg.liveness or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
