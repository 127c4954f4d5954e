"""Pure builders: an LMMR1Run (as a dict) plus what the operator observed -> child manifests.

Nothing here imports kopf or a Kubernetes client, so every builder is unit-tested without a
cluster. The handlers create what these return through `lmmr1_operator.kube`.
"""
