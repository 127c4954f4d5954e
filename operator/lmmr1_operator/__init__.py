"""The LMM-R1 Kubernetes operator: turns LMMR1Run resources into per-stage training pods."""
