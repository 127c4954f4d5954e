"""The operator's entry point for kopf.

    kopf run --module=lmmr1_operator.main --all-namespaces --liveness=http://$POD_IP:8080/healthz

(the chart's Deployment runs exactly this; settings come from the environment, see
`lmmr1_operator.settings`).
"""

from lmmr1_operator import handlers

__all__ = ["handlers"]
