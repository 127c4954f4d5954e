"""The local test bed: a real Kubernetes control plane, kwok GPU nodes, a process node and S3.

A test fixture only. It is never part of the distribution, the images or the chart.
"""
