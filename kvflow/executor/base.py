"""The executor interface: how the engine reaches its worker(s)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from kvflow.config import EngineConfig
from kvflow.core.scheduler import ModelRunnerOutput, SchedulerOutput


class StepHandle(Protocol):
    """A launched step: ``result()`` waits for it and returns the workers' output."""

    def result(self) -> ModelRunnerOutput: ...


class DoneStep:
    """The handle of a step that has already finished."""

    def __init__(self, output: ModelRunnerOutput) -> None:
        self._output = output

    def result(self) -> ModelRunnerOutput:
        return self._output


class BaseExecutor(ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """Smallest block count that every worker can hold."""

    @abstractmethod
    def init_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput: ...

    def execute_model_async(self, sched: SchedulerOutput) -> StepHandle:
        """Launches a step and returns before it ends where the executor can (see uniproc)."""
        return DoneStep(self.execute_model(sched))

    @abstractmethod
    def start_profile(self, trace_dir: str) -> None:
        """Starts every worker's torch.profiler (``Worker.start_profile``)."""

    @abstractmethod
    def stop_profile(self) -> None:
        """Stops it; each worker writes its trace."""

    def shutdown(self) -> None:
        """Stops workers; safe to call twice."""


def create_executor(config: EngineConfig) -> BaseExecutor:
    backend = config.parallel_config.distributed_executor_backend
    tp = config.parallel_config.tensor_parallel_size
    if backend is None:
        backend = "uni" if tp == 1 else "mp"
    if backend == "uni":
        if tp > 1:
            raise ValueError(f"distributed_executor_backend='uni' runs one worker, but "
                             f"tensor_parallel_size={tp}. Use 'mp' or 'ray'.")
        from kvflow.executor.uniproc import UniProcExecutor

        return UniProcExecutor(config)
    if backend == "mp":
        from kvflow.executor.multiproc import MultiProcExecutor

        return MultiProcExecutor(config)
    if backend == "ray":
        from kvflow.executor.ray import RayExecutor

        return RayExecutor(config)
    raise ValueError(f"Unknown distributed_executor_backend {backend!r}: 'uni', 'mp' or 'ray'.")
