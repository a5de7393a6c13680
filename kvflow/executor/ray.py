"""Tensor-parallel ranks as Ray actors, placed by Ray on one machine or across a cluster.

Ray is optional (``pip install 'kvflow[ray]'``); nothing here imports it
until the executor is created. ``ray.init()`` joins the cluster named by
``RAY_ADDRESS`` (``ray start --head`` on one node, ``ray start --address``
on the others) or, when none is named, starts a local one that this executor
also stops at shutdown.

    driver                                    Ray cluster
    ──────                                    ───────────
    placement group: N bundles of             one _RankActor per bundle
      {GPU: 1} (or {CPU: 1}), PACK              (rank r = bundle r)
    rank 0's node + free port ─► init_method  tcp://<rank 0 ip>:<port>
    ray.put(SchedulerOutput) once ─► every actor's execute_model(ref)
    wait on all N replies (any error ─► RuntimeError naming the rank)

The step protocol is the multiprocess executor's: every rank runs the same
step, rank 0's ``ModelRunnerOutput`` is returned. Unlike ``mp``, the driver
waits for every rank's (empty) reply each step, because Ray reports a dead
or failing actor only through the replies it owes.

Multi-node notes: every node must see the checkpoint at the same path (a
shared file system, or the same download on each), and NCCL must reach
rank 0's address. On each node, the ranks see all of that node's GPUs that
the placement group gave them (CUDA_VISIBLE_DEVICES is set to their union),
so NCCL can use peer-to-peer copies between them.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections import Counter
from typing import Any, Optional

import torch

from kvflow.config import EngineConfig
from kvflow.core.scheduler import ModelRunnerOutput, SchedulerOutput
from kvflow.distributed.utils import (available_cpus, get_host_ip, get_open_port,
                                      init_rank_environment, verify_tensor_parallel_layout)
from kvflow.executor.base import BaseExecutor
from kvflow.executor.multiproc import OUTPUT_RANK, format_failure

logger = logging.getLogger("kvflow")

_PLACEMENT_TIMEOUT_S = 120.0
"""How long Ray may take to find room for every rank before we give up."""
_GRACE_S = 1.0
"""How long, after a first failure, the driver keeps listening to the other ranks."""


def import_ray() -> Any:
    """Imports Ray, or says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "distributed_executor_backend='ray' needs Ray, which is not installed. Install it "
            "with `pip install 'kvflow[ray]'` (or `pip install ray`), or use "
            "distributed_executor_backend='mp' for tensor parallelism on one machine."
        ) from exc
    return ray


class _RankActor:
    """One tensor-parallel rank inside a Ray actor (made remote by ``ray.remote`` at runtime)."""

    def __init__(self) -> None:
        self.worker: Any = None

    def placement(self) -> tuple[str, list[str], int, int]:
        """(node ip, GPU ids Ray assigned to this actor, pid, CPUs of the node)."""
        import ray

        return (get_host_ip(), [str(g) for g in ray.get_gpu_ids()], os.getpid(),
                available_cpus())

    def free_port(self) -> int:
        return get_open_port("0.0.0.0")

    def start(self, config: EngineConfig, rank: int, world_size: int, init_method: str,
              visible_gpus: Optional[str], local_index: int, num_threads: Optional[int]
              ) -> None:
        """Joins the TP group, then builds this rank's shard (the layers read the rank)."""
        from kvflow.worker.worker import Worker

        if visible_gpus is not None:
            # Before anything touches CUDA in this process.
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpus
            device = torch.device("cuda", local_index)
        else:
            device = config.device_config.device
        init_rank_environment(rank, world_size, device, init_method, num_threads)
        self.worker = Worker(config, device=device)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def init_cache(self, num_blocks: int) -> None:
        self.worker.init_cache(num_blocks)

    def execute_model(self, sched: SchedulerOutput, reply: bool) -> Optional[ModelRunnerOutput]:
        out = self.worker.execute_model(sched)
        return out if reply else None

    def start_profile(self, trace_dir: str) -> None:
        self.worker.start_profile(trace_dir)  # on this actor's node

    def stop_profile(self) -> None:
        self.worker.stop_profile()


def _stop_actors(ray: Any, actors: list[Any], pg: Any, owns_ray: bool) -> None:
    """Kills the rank actors, frees their placement group, stops a cluster we started.

    Runs from ``shutdown()``, garbage collection and interpreter exit
    (``weakref.finalize``), so it holds no reference to the executor.
    """
    if not ray.is_initialized():
        return
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already dead
            pass
    if pg is not None:
        try:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)
        except Exception:  # noqa: BLE001
            pass
    if owns_ray:
        ray.shutdown()


class RayExecutor(BaseExecutor):
    """One Ray actor per tensor-parallel rank; the calling process only schedules."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        from kvflow.models.registry import describe_model

        ray = import_ray()
        from ray.util.placement_group import placement_group

        mc = config.model_config
        self.world_size = ws = config.parallel_config.tensor_parallel_size
        desc = describe_model(mc.architecture, mc.hf_config)
        verify_tensor_parallel_layout(ws, desc.num_heads, desc.num_kv_heads)
        self._ray = ray
        self._failure: Optional[str] = None
        self._pids: dict[int, Optional[int]] = {}
        owns_ray = not ray.is_initialized()
        if owns_ray:
            ray.init(include_dashboard=False)
        use_gpu = config.device_config.device.type == "cuda"
        bundle = {"GPU": 1.0, "CPU": 1.0} if use_gpu else {"CPU": 1.0}
        self._actors: list[Any] = []
        pg = placement_group([dict(bundle) for _ in range(ws)], strategy="PACK")
        self._finalizer = weakref.finalize(self, _stop_actors, ray, self._actors, pg, owns_ray)
        try:
            self._start_actors(config, pg, bundle, use_gpu)
        except BaseException:  # a failed rank (already stopped), no room, or Ctrl-C
            self.shutdown()
            raise
        logger.info("Started %d tensor-parallel Ray workers (pids %s)", ws, self.worker_pids)

    def _start_actors(self, config: EngineConfig, pg: Any, bundle: dict[str, float],
                      use_gpu: bool) -> None:
        """Waits for the placement group, starts one actor per bundle, joins them in a group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray, ws = self._ray, self.world_size
        ready, _ = ray.wait([pg.ready()], timeout=_PLACEMENT_TIMEOUT_S)
        if not ready:
            have = ray.cluster_resources()
            raise ValueError(
                f"Ray could not place tensor_parallel_size={ws} workers of {bundle} each within "
                f"{_PLACEMENT_TIMEOUT_S:.0f}s; the cluster has {have}. Add nodes or GPUs to the "
                "cluster, or lower tensor_parallel_size.")
        actor_cls = ray.remote(_RankActor)
        for rank in range(ws):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=rank)
            self._actors.append(actor_cls.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=strategy).remote())
        placements = self._gather("startup", [a.placement.remote() for a in self._actors])
        self._pids = {r: placements[r][2] for r in range(ws)}
        ip0 = placements[0][0]
        port = self._gather("startup", [self._actors[0].free_port.remote()], ranks=[0])[0]
        init_method = f"tcp://{ip0}:{port}"
        per_node = Counter(p[0] for p in placements)
        starts = []
        for rank, actor in enumerate(self._actors):
            ip, gpus, _, cpus = placements[rank]
            visible, local = None, 0
            if use_gpu:
                node_gpus = sorted({g for p in placements if p[0] == ip for g in p[1]},
                                   key=lambda g: (len(g), g))
                visible, local = ",".join(node_gpus), node_gpus.index(gpus[0])
            # On CPU, the ranks of a node share its cores (Ray does not pin threads).
            threads = None if use_gpu else max(1, cpus // per_node[ip])
            starts.append(actor.start.remote(config, rank, ws, init_method, visible, local,
                                             threads))
        self._gather("startup", starts)

    @property
    def worker_pids(self) -> list[Optional[int]]:
        return [self._pids.get(r) for r in range(self.world_size)]

    # ------------------------------------------------------------------ calls
    def _gather(self, what: str, refs: list[Any], ranks: Optional[list[int]] = None
                ) -> list[Any]:
        """Waits for one reply per rank; any failure stops every rank and raises RuntimeError."""
        ray = self._ray
        ranks = list(range(len(refs))) if ranks is None else ranks
        rank_of = {ref: r for ref, r in zip(refs, ranks)}
        results: dict[int, Any] = {}
        dead: dict[int, str] = {}
        errors: dict[int, str] = {}
        pending = list(refs)
        deadline: Optional[float] = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not ready:
                break  # grace period over: the rest are stuck behind the failure
            for ref in ready:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    dead[rank] = f"died ({type(exc).__name__}: {str(exc).splitlines()[0]})"
                except ray.exceptions.RayTaskError as exc:
                    errors[rank] = str(exc)
                if (dead or errors) and deadline is None:
                    # Listen a moment longer: a dead rank makes its peers fail too.
                    deadline = time.monotonic() + _GRACE_S
        if dead or errors:
            self._failure = format_failure(what, dead, errors, self._pids)
            self.shutdown()
            raise RuntimeError(self._failure)
        return [results[r] for r in ranks]

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        if self._failure is not None:
            raise RuntimeError(self._failure)
        return self._gather(method, [getattr(a, method).remote(*args) for a in self._actors])

    # ------------------------------------------------------------------ interface
    def determine_num_blocks(self) -> int:
        return min(self._call_all("determine_num_blocks"))

    def init_cache(self, num_blocks: int) -> None:
        self._call_all("init_cache", num_blocks)

    def start_profile(self, trace_dir: str) -> None:
        self._call_all("start_profile", trace_dir)  # each node writes its ranks' traces

    def stop_profile(self) -> None:
        self._call_all("stop_profile")

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if self._failure is not None:
            raise RuntimeError(self._failure)
        sched_ref = self._ray.put(sched)  # one copy, read by every rank
        refs = [a.execute_model.remote(sched_ref, rank == OUTPUT_RANK)
                for rank, a in enumerate(self._actors)]
        return self._gather("execute_model", refs)[OUTPUT_RANK]

    def shutdown(self) -> None:
        if self._failure is None:
            self._failure = "The engine was shut down; create a new LLM to continue."
        self._finalizer()
