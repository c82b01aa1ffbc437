"""Joining a Ray cluster for the work that spreads over machines (embedding, KV encoding).

Ray is an optional extra: `pip install 'memstore[ray]'`. Every node must have memstore and
the models installed, and see the files to ingest and the store's KV directory at the same
paths (a shared filesystem), as Ray Data's own file readers expect.
"""
from __future__ import annotations

import logging
import socket

from memstore.errors import ClusterUnreachableError, MissingExtraError

LOCAL = "local"  # start a Ray instance on this machine (or join $RAY_ADDRESS)


def ray_module():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingExtraError("--ray needs Ray Data; install it with `pip install 'memstore[ray]'`") from None
    return ray


def connect(address: str | bool | None = LOCAL):
    """Join the cluster at `address` (a Ray address, or LOCAL/True for a Ray started here) unless this process
    already has; returns the ray module. Ray Data's own progress bars are turned off: the caller shows one."""
    ray = ray_module()
    here = address in (True, None, LOCAL)
    if not here:
        check_reachable(str(address))
    if not ray.is_initialized():
        if here:
            ray.init(include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
        else:
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # per-run notices; failures still raise
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once where nothing listens at a host:port address (Ray itself retries for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterUnreachableError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one with "
                                      "`ray start --head` there, or pass --ray without an address to start one here") from None


def cluster_cpus() -> int:
    """Whole CPUs in the cluster: one encoding actor each."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def node_share() -> tuple[int, int]:
    """(actors, CPUs each): one actor per smallest node's worth of CPUs, so that on a node each actor
    runs a torch thread per CPU (one process with 2 threads embedded faster than 2 with one: bench/results/scale.json)."""
    import ray

    sizes = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    per_actor = max(1, min((s for s in sizes if s > 0), default=1))
    return max(1, cluster_cpus() // per_actor), per_actor
