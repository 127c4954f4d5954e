"""The operator's entry point for kopf.

    LMMR1_WATCH_NAMESPACES=team-a,team-b kopf run --module=lmmr1_operator.main \
        --namespace=team-a --namespace=team-b --liveness=http://$POD_IP:8080/healthz

(the chart's Deployment runs exactly this, `--all-namespaces` with
LMMR1_WATCH_ALL_NAMESPACES=true in cluster-wide mode; the operator refuses to start when the
flags and the variable name different namespaces. Settings come from the environment, see
`lmmr1_operator.settings`).
"""

from lmmr1_operator import handlers

__all__ = ["handlers"]
