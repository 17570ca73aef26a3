"""The launch benchmark on the kubernetes backend: :mod:`.run` measures, beside the floor, on the
sides of :mod:`.sides`."""

from scripts.benchmarks.kube.run import bench_launch_kubernetes

__all__ = ["bench_launch_kubernetes"]
