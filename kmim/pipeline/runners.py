"""Runners only schedule stage functions: in-process, or as Ray tasks with bounded in-flight work."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm import tqdm

TASK_RETRIES = 2


def ensure_ray(address: str | None) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS``, or start an embedded one bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING)


def map_shards(fn: Callable[..., Any], items: Sequence[Any], *args: Any, runner: str, desc: str,
               address: str | None = None, max_in_flight: int | None = None, gpu: bool = False,
               ) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Run ``fn(item, *args)`` for each item; yield (item, result, error) as each finishes.

    With ``gpu=True`` and GPUs in the Ray cluster, each task holds one GPU, so decode, feature
    extraction and assignment of a batch happen in the same GPU worker; Ray reuses worker processes,
    so a model cached per process is loaded once per worker.

    A failing item yields its exception instead of stopping the others (Ray retries it first).
    Progress (items, rate, ETA) goes to stderr.
    """
    bar = tqdm(total=len(items), desc=desc, unit="shard", dynamic_ncols=True)
    try:
        if runner == "local":
            for item in items:
                try:
                    result, error = fn(item, *args), None
                except Exception as e:  # noqa: BLE001 - reported per item by the caller
                    result, error = None, e
                bar.update()
                yield item, result, error
            return
        import ray

        ensure_ray(address)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if gpu else 0
        remote = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=TASK_RETRIES,
                            retry_exceptions=False)(fn)
        shared = [ray.put(a) for a in args]
        limit = max_in_flight or max(1, 2 * (gpus or int(resources.get("CPU", 1))))
        todo = list(items)[::-1]
        running: dict[Any, Any] = {}
        while todo or running:
            while todo and len(running) < limit:
                item = todo.pop()
                running[remote.remote(item, *shared)] = item
            done, _ = ray.wait(list(running), num_returns=1)
            item = running.pop(done[0])
            try:
                result, error = ray.get(done[0]), None
            except Exception as e:  # noqa: BLE001 - task errors are reported per item
                result, error = None, getattr(e, "cause", None) or e
            bar.update()
            yield item, result, error
    finally:
        bar.close()
