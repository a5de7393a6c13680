"""One worker: builds its model shard, sizes and allocates its KV cache, runs steps."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from kvflow.attention.backends.base import create_attention_backend
from kvflow.config import EngineConfig
from kvflow.core.scheduler import ModelRunnerOutput, SchedulerOutput
from kvflow.distributed.parallel_state import get_tp_rank, get_tp_size
from kvflow.models.base import ModelContext
from kvflow.models.loader import load_model
from kvflow.worker.model_runner import ModelRunner, StepResult

logger = logging.getLogger("kvflow")

_GIB = 1 << 30


def create_linear_method_factory(config: EngineConfig):
    """The quantization hook handed to the model: prefix -> LinearMethod or None."""
    quant = config.model_config.quantization
    if quant is None:
        return lambda prefix: None
    if quant == "awq":
        from kvflow.quantization.awq import awq_linear_method_factory

        return awq_linear_method_factory(config.model_config)
    raise ValueError(f"quantization={quant!r} is not supported (supported: 'awq').")


class Worker:
    def __init__(self, config: EngineConfig, device: Optional[torch.device] = None) -> None:
        """Builds this rank's model shard on ``device`` (default: the config's device).

        Tensor-parallel rank r runs on its own GPU (cuda:r), which the
        engine-wide config cannot name; its executor passes it here, after
        joining the TP group (the layers read their rank when built).
        """
        self.config = config
        self.device = device if device is not None else config.device_config.device
        mc = config.model_config
        backend = create_attention_backend(config.device_config.attention_backend)
        self.attn_backend = backend
        self.use_cuda_graphs = (self.device.type == "cuda" and not config.device_config.enforce_eager
                                and config.device_config.attention_backend == "triton")
        ctx = ModelContext(dtype=mc.dtype, attn_backend=backend,
                           linear_method=create_linear_method_factory(config))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model = load_model(mc, ctx, self.device)
        self.num_kv_heads = max(1, mc.num_kv_heads // get_tp_size())
        self.runner: Optional[ModelRunner] = None
        self._profiler: Optional[torch.profiler.profile] = None

    def start_profile(self, trace_dir: str) -> None:
        """Starts torch.profiler (CPU ops, CUDA kernels on a GPU); ``stop_profile`` writes
        ``rank{r}.*.pt.trace.json.gz`` (r: this tensor-parallel rank) into ``trace_dir``,
        for Perfetto or TensorBoard."""
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._profiler = profile(activities=activities, with_stack=True,
                                 on_trace_ready=tensorboard_trace_handler(
                                     trace_dir, worker_name=f"rank{get_tp_rank()}",
                                     use_gzip=True))
        self._profiler.start()

    def stop_profile(self) -> None:
        if self._profiler is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the last step's kernels in the trace
            profiler, self._profiler = self._profiler, None
            profiler.stop()

    @property
    def bytes_per_block(self) -> int:
        mc, cc = self.config.model_config, self.config.cache_config
        elem = torch.tensor([], dtype=mc.dtype).element_size()
        return 2 * cc.block_size * self.num_kv_heads * mc.head_dim * elem * mc.num_layers

    def determine_num_blocks(self) -> int:
        """Blocks that fit the memory budget (before the cap the engine applies)."""
        cc = self.config.cache_config
        if cc.num_gpu_blocks_override is not None:
            return cc.num_gpu_blocks_override
        if self.device.type != "cuda":
            return int(cc.cpu_kv_cache_space_gib * _GIB // self.bytes_per_block)
        from kvflow.worker.memory import profile_free_memory

        free = profile_free_memory(self.model, self.config, self.device)
        return max(0, int(free // self.bytes_per_block))

    def init_cache(self, num_blocks: int) -> None:
        mc, cc = self.config.model_config, self.config.cache_config
        shape = (2, num_blocks, cc.block_size, self.num_kv_heads, mc.head_dim)
        kv_caches = [torch.zeros(shape, dtype=mc.dtype, device=self.device)
                     for _ in range(mc.num_layers)]
        graphs = None
        if self.use_cuda_graphs:
            from kvflow.worker.cuda_graphs import CUDAGraphRunner

            sc = self.config.scheduler_config
            graphs = CUDAGraphRunner(self.model, kv_caches, max_num_seqs=sc.max_num_seqs,
                                     max_num_batched_tokens=sc.max_num_batched_tokens,
                                     max_model_len=sc.max_model_len, block_size=cc.block_size,
                                     device=self.device, attn_backend=self.attn_backend,
                                     num_kv_heads=self.num_kv_heads)
            graphs.capture()
        self.runner = ModelRunner(self.model, kv_caches, cc.block_size, self.device, mc.seed,
                                  graph_runner=graphs)
        if self.device.type == "cuda":  # first calls at start-up, not mid-serving
            if self.config.device_config.attention_backend == "triton":
                self.runner.warm_up_eager()  # padding slots (-1) need the Triton KV write
            self.runner.warm_up_sampling(self.config.scheduler_config.max_num_seqs)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        assert self.runner is not None, "init_cache must run before execute_model"
        return self.runner.execute_model(sched)

    def execute_model_async(self, sched: SchedulerOutput) -> StepResult:
        assert self.runner is not None, "init_cache must run before execute_model"
        return self.runner.execute_model_async(sched)
