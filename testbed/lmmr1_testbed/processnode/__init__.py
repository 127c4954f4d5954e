"""The process node: a test-bed kubelet that runs a pod's containers as local processes.

It registers a Node (fake `nvidia.com/gpu` capacity, tainted so only pods that tolerate
`lmmr1.io/process-node` land there), and for every pod bound to it runs the containers
exactly as the pod spec says — command, args, env (Secret/ConfigMap keys, downward API),
native sidecars, ConfigMap/Secret/projected/emptyDir volumes bind-mounted at their
`mountPath` in a private mount namespace — with the pod's own loopback address as its pod
IP, and reports container states, exit codes and the pod phase back to the API server.
Container images are not pulled: every image maps to the local virtualenv.

A test fixture, never shipped: `python -m lmmr1_testbed.processnode --help`.
"""
