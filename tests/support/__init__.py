"""Test support: the local cluster, Kubernetes object factories, and waiting with deadlines."""
