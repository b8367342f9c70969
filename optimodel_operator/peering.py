"""kopf peering checked at start: a peering name without its object pauses every watch in silence.

kopf with a peering name whose KopfPeering / ClusterKopfPeering (or the kopf.dev CRDs
themselves) is missing waits for it and says so only at DEBUG: the operator runs and
nothing happens. So the start looks for the object first and refuses to run without it.
"""

from __future__ import annotations

from optimodel_operator.kube import Kube, KubeError, object_path

PEERING_API = "kopf.dev/v1"


def peering_problem(kube: Kube, name: str, namespaces: tuple[str, ...]) -> str | None:
    """None when every peering object the operator will use exists, else what is missing and how to fix it."""
    if not name:
        return None
    if namespaces:
        places = [(f"KopfPeering {ns}/{name}", "kopfpeerings.kopf.dev",
                   object_path(PEERING_API, "kopfpeerings", ns, name)) for ns in namespaces]
    else:
        places = [(f"ClusterKopfPeering {name}", "clusterkopfpeerings.kopf.dev",
                   object_path(PEERING_API, "clusterkopfpeerings", None, name))]
    for what, crd, path in places:
        try:
            found = kube.get(path)
        except KubeError as exc:
            return (f"OPTIMODEL_PEERING={name}: cannot read the {what} ({exc}); grant get on {crd} "
                    "or set OPTIMODEL_PEERING= (empty) to run standalone")
        if found is None:
            return (f"OPTIMODEL_PEERING={name}: the {what} does not exist (or its CRD {crd} is not installed), "
                    "and kopf would pause every watch until it does; apply the kopf.dev CRDs and the peering "
                    "object (the chart's operator.peering.enabled=true does both), or set OPTIMODEL_PEERING= "
                    "(empty, the default) to run standalone")
    return None
