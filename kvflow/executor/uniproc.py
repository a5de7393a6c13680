"""One worker in the engine's own process."""

from __future__ import annotations

from kvflow.config import EngineConfig
from kvflow.core.scheduler import ModelRunnerOutput, SchedulerOutput
from kvflow.executor.base import BaseExecutor, StepHandle
from kvflow.worker.worker import Worker


class UniProcExecutor(BaseExecutor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.worker = Worker(config)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def init_cache(self, num_blocks: int) -> None:
        self.worker.init_cache(num_blocks)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(sched)

    def execute_model_async(self, sched: SchedulerOutput) -> StepHandle:
        return self.worker.execute_model_async(sched)

    def start_profile(self, trace_dir: str) -> None:
        self.worker.start_profile(trace_dir)

    def stop_profile(self) -> None:
        self.worker.stop_profile()
