"""Runners only schedule stages: in-process, as Ray CPU tasks, or on a pool of Ray GPU actors.

``map_shards`` runs ``fn(item, *args)`` for every item and yields (item, result, error) as each finishes; ``fn``
is a function or a picklable callable, such as a stage bound to its settings
(:class:`kmim.pipeline.stages.TokenizeStage`), shipped once to every Ray worker with ``args``.

- **local**: in-process, one item after the other (debugging, tests).
- **Ray CPU tasks** (pixel extractor, or a cluster without GPUs): one task per item, ``num_cpus=1``, at most
  ``max_in_flight`` (default 2 x the cluster's CPUs) submitted at a time.
- **Ray GPU actor pool** (a job that wants a GPU on a cluster that has GPUs): one actor per GPU
  (``num_gpus=1``), each fed at most ``max_in_flight / actors`` items (default 2: one running, one queued so
  the GPU does not wait for the driver). An actor is a long-lived process, so the model and the codebook,
  cached per process by the extractor and the stage, load once per actor.

In every case only the items (shard descriptions) and the per-shard stats pass through the object store;
images, pixels and features never do, so in-flight work is bounded by the counts above. Decode happens in
the GPU actor, in the same process as extraction and assignment: a batch never leaves the process between
the exact pixels it was decoded to and its token grid, and decoded pixels (an order of magnitude larger
than the compressed bytes) are never shipped between processes. Each GPU actor holds its node's share of
CPUs (CPUs / GPUs) and the stage decodes on that many threads (PIL releases the GIL), so the cores of a
GPU node decode for its GPUs.

Failures: an item whose worker, actor or node died (or whose result was lost), or whose stage raised an
error that looks transient (``OSError`` such as a storage hiccup, ``MemoryError``, CUDA out of memory), is
run again, up to ``retries`` more times; a dead actor is replaced first. A full disk, a read-only filesystem,
a missing file or a denied permission is never retried. Any other exception is
deterministic (bad input beyond what the stage skips per image, or a bug) and is not retried (the judgement
and the count are :class:`kmim.retry.RetryPolicy`'s; a retry runs at once, with no backoff). A failed
item yields a :class:`ShardFailed` that says what failed, why, and after how many attempts. Retrying is
safe because stages are idempotent: an output's name derives from its input shard and is written under a
temporary name, then renamed, so at-least-once execution leaves exactly one copy of every output.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from kmim.retry import RetryPolicy, is_cuda_error, is_transient

TASK_RETRIES = 2
ITEMS_PER_ACTOR = 2
LOOPBACK = "127.0.0.1"
log = logging.getLogger("kmim")


class ShardFailed(Exception):
    """An item that failed for good: the last error, the number of attempts, and whether it looked transient."""

    def __init__(self, cause: BaseException, attempts: int, transient: bool) -> None:
        super().__init__(cause, attempts, transient)
        self.cause, self.attempts, self.transient = cause, attempts, transient

    def __str__(self) -> str:
        lines = str(self.cause).strip().splitlines() or [""]
        # Ray's system errors (worker/actor death) run to many lines; the first one says what happened.
        what = lines[0] if type(self.cause).__module__.startswith("ray.") else "\n".join(lines)
        tries = f"{self.attempts} attempt{'s' if self.attempts > 1 else ''}"
        why = "" if self.transient else ", not retried: deterministic error"
        return f"{type(self.cause).__name__}: {what} (failed after {tries}{why})"


def ensure_ray(address: str | None) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS``, or start an embedded one bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        init_ray_on_loopback(logging_level=logging.WARNING)


def init_ray_on_loopback(**options: Any) -> None:
    """Start a new single-node Ray cluster whose node listens on 127.0.0.1 only (no dashboard), with
    ``ray.init``'s public ``options``.

    Adapter around a private Ray API: ``ray.init``'s ``_node_ip_address`` keyword, the only way to bind an
    embedded cluster to the loopback interface. This is the one place that passes it (tests start their
    local cluster through here too); ``tests/test_private_apis.py`` fails when Ray drops it.
    """
    import ray

    ray.init(_node_ip_address=LOOPBACK, include_dashboard=False, **options)


def _describe(item: Any) -> str:
    return item.describe() if hasattr(item, "describe") else repr(item)


def _attempt_local(fn: Callable[..., Any], item: Any, args: tuple, policy: RetryPolicy,
                   ) -> tuple[Any, ShardFailed | None]:
    """(result, None) or (None, failure) of ``fn(item, *args)`` in-process, retrying as ``policy`` says."""
    for attempt in itertools.count(1):
        try:
            return fn(item, *args), None
        except Exception as e:  # noqa: BLE001 - reported per item by the caller
            if not policy.should_retry(e, attempt):
                return None, ShardFailed(e, attempt, policy.transient(e))
            log.warning("%s: %s: %s; retrying (attempt %d of %d)", _describe(item), type(e).__name__, e,
                        attempt + 1, policy.attempts)


def _run_local(fn: Callable[..., Any], items: Sequence[Any], args: tuple, policy: RetryPolicy,
               ) -> Iterator[tuple[Any, Any, BaseException | None]]:
    for item in items:
        yield item, *_attempt_local(fn, item, args, policy)


class _StageActor:
    """A long-lived process running stage calls, so per-process caches (model, codebook) load once."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def run(self, item: Any) -> Any:
        return self.fn(item, *self.args)


def _call(fn: Callable[..., Any], item: Any, *args: Any) -> Any:
    """``fn(item, *args)``: the function of every Ray task, which Ray requires to be a function, not a callable."""
    return fn(item, *args)


def _name(fn: Callable[..., Any]) -> str:
    """What Ray calls a task running ``fn`` (its workers are titled ``ray::<name>``): the function's or the
    callable's class name."""
    return getattr(fn, "__name__", type(fn).__name__)


class _TaskPool:
    """One Ray CPU task per item, at most ``limit`` in flight."""

    def __init__(self, fn: Callable[..., Any], args: list, limit: int) -> None:
        import ray

        # Retried by the driver, which counts attempts.
        self.remote = ray.remote(num_cpus=1, max_retries=0)(_call).options(name=_name(fn))
        self.fn, self.args, self.limit, self.running = ray.put(fn), args, limit, 0

    def has_room(self) -> bool:
        return self.running < self.limit

    def submit(self, item: Any) -> Any:
        self.running += 1
        return self.remote.remote(self.fn, item, *self.args)

    def finished(self, ref: Any, error: BaseException | None) -> None:
        self.running -= 1

    def close(self) -> None:
        """Nothing to release: tasks end by themselves."""


def cpus_per_gpu() -> float:
    """CPUs each GPU actor holds: the smallest CPU-to-GPU ratio among GPU nodes, whole when at least 1, else the
    fraction (a node with fewer CPUs than GPUs must still schedule one actor per GPU). Ray sets the actor's
    thread count from it, and the stage decodes on that many threads (at least one)."""
    import ray

    ratios = [n["Resources"].get("CPU", 0) / n["Resources"]["GPU"] for n in ray.nodes()
              if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1]
    ratio = min(ratios, default=1.0)
    return float(int(ratio)) if ratio >= 1 else ratio


class _ActorPool:
    """``n`` GPU actors, each with at most ``per_actor`` items in flight; a dead actor is replaced."""

    def __init__(self, fn: Callable[..., Any], args: list, n: int, per_actor: int) -> None:
        import ray

        self.cls = ray.remote(num_cpus=cpus_per_gpu(), num_gpus=1, max_restarts=0)(_StageActor)
        self.init_args = (fn, *args)
        self.actors = [self.cls.remote(*self.init_args) for _ in range(n)]
        self.load = [0] * n
        self.per_actor = per_actor
        self.placed: dict[Any, tuple[int, Any]] = {}  # ref -> (slot, the actor that got it)

    def has_room(self) -> bool:
        return min(self.load) < self.per_actor

    def submit(self, item: Any) -> Any:
        slot = min(range(len(self.load)), key=self.load.__getitem__)
        self.load[slot] += 1
        ref = self.actors[slot].run.remote(item)
        self.placed[ref] = (slot, self.actors[slot])
        return ref

    def finished(self, ref: Any, error: BaseException | None) -> None:
        import ray

        slot, actor = self.placed.pop(ref)
        self.load[slot] -= 1
        broken = isinstance(error, ray.exceptions.RayActorError) or (error is not None and is_cuda_error(error))
        if broken and self.actors[slot] is actor:
            what = "died" if isinstance(error, ray.exceptions.RayActorError) else "hit a CUDA error"
            log.warning("GPU actor %d %s (%s); starting a replacement", slot, what, str(error).splitlines()[0])
            ray.kill(actor, no_restart=True)
            self.actors[slot] = self.cls.remote(*self.init_args)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)


@dataclass
class _Work:
    item: Any
    attempts: int = 0


def _outcome(ref: Any) -> tuple[Any, BaseException | None, bool]:
    """(result, error, transient) of a finished Ray task or actor call."""
    import ray

    try:
        return ray.get(ref), None, False
    except ray.exceptions.RayTaskError as e:  # the stage raised: judge its own exception
        cause = e.cause if isinstance(e.cause, BaseException) else e
        return None, cause, is_transient(cause)
    except ray.exceptions.TaskCancelledError as e:
        return None, e, False
    except ray.exceptions.RayError as e:  # worker / actor / node death, lost object: the system, not the input
        return None, e, True


def _run_ray(pool: _TaskPool | _ActorPool, items: Sequence[Any], policy: RetryPolicy,
             ) -> Iterator[tuple[Any, Any, BaseException | None]]:
    import ray

    todo = deque(_Work(item) for item in items)
    running: dict[Any, _Work] = {}
    while todo or running:
        while todo and pool.has_room():
            work = todo.popleft()
            work.attempts += 1
            running[pool.submit(work.item)] = work
        [ref], _ = ray.wait(list(running), num_returns=1)
        work = running.pop(ref)
        result, error, transient = _outcome(ref)
        pool.finished(ref, error)
        if error is None:
            yield work.item, result, None
        elif transient and policy.has_attempts_left(work.attempts):
            log.warning("%s: %s: %s; retrying (attempt %d of %d)", _describe(work.item), type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "", work.attempts + 1, policy.attempts)
            todo.appendleft(work)
        else:
            yield work.item, None, ShardFailed(error, work.attempts, transient)


def map_shards(fn: Callable[..., Any], items: Sequence[Any], *args: Any, runner: str, desc: str,
               address: str | None = None, max_in_flight: int | None = None, gpus: int = 0,
               retries: int = TASK_RETRIES) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Run ``fn(item, *args)`` for each item; yield (item, result, error) as each finishes.

    ``error`` is None or a :class:`ShardFailed`; a failing item never stops the others. With ``gpus`` > 0 (on
    Ray), items run on a pool of that many GPU actors, one whole GPU each; otherwise as CPU tasks (see the
    module docstring for bounds and retries). Progress (items, rate, ETA) goes to stderr.
    """
    policy = RetryPolicy(attempts=retries + 1, transient=is_transient)
    bar = tqdm(total=len(items), desc=desc, unit="shard", dynamic_ncols=True)
    pool: _TaskPool | _ActorPool | None = None
    try:
        if runner == "local":
            outcomes = _run_local(fn, items, args, policy)
        else:
            import ray

            ensure_ray(address)
            resources = ray.cluster_resources()
            shared = [ray.put(a) for a in args]
            if gpus:
                per_actor = -(-max_in_flight // gpus) if max_in_flight else ITEMS_PER_ACTOR
                pool = _ActorPool(fn, shared, gpus, per_actor)
            else:
                pool = _TaskPool(fn, shared, max_in_flight or max(1, 2 * int(resources.get("CPU", 1))))
            outcomes = _run_ray(pool, items, policy)
        for outcome in outcomes:
            bar.update()
            yield outcome
    finally:
        if pool is not None:
            pool.close()
        bar.close()
