"""LLMEngine: validate and queue requests, step the scheduler and workers, emit outputs.

    add_request ─► validate (before anything is queued) ─► Scheduler.add_request
    step():  Scheduler.schedule ─► Executor.execute_model ─► Scheduler.update_from_output
             ─► OutputProcessor (text, stop strings) ─► RequestOutputs

With asynchronous scheduling (default with one in-process worker) a step
launches step N+1 before it reads step N's tokens, so the host's work for
one step (scheduling, batch building, outputs) runs while the GPU computes
the other::

    host:  schedule N+1 | launch N+1 | wait N, update, outputs N | schedule N+2 | ...
    GPU:   ...  step N  ...........  | step N+1 .................................

Bad input raises ``ValueError`` in ``add_request`` and leaves the engine
untouched, so every other request goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from kvflow import envs
from kvflow.config import EngineArgs, EngineConfig
from kvflow.core.request import Request, RequestStatus
from kvflow.core.scheduler import Scheduler, SchedulerOutput
from kvflow.engine.output_processor import OutputProcessor, RequestOutputKind, child_request_id
from kvflow.engine.step_trace import StepTrace
from kvflow.executor.base import StepHandle, create_executor
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams
from kvflow.logger import init_logger
from kvflow.tokenizer import eos_token_ids, load_tokenizer

logger = init_logger("kvflow.engine")

PromptType = Union[str, dict, list[int]]


@dataclass
class EngineStats:
    """Counters read by the server's /metrics."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class LLMEngine:
    """The synchronous engine the offline ``LLM`` and the async server are built on."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc, cc, sc = config.model_config, config.cache_config, config.scheduler_config
        self._profiling = False
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(mc.tokenizer, trust_remote_code=mc.trust_remote_code)
        self.eos_token_ids = eos_token_ids(self.tokenizer, mc.model, mc.hf_config)
        t0 = time.perf_counter()
        self.executor = create_executor(config)
        t1 = time.perf_counter()
        available = self.executor.determine_num_blocks()
        t2 = time.perf_counter()
        # No request can ever need more than max_model_len tokens' worth of blocks each.
        useful = sc.max_num_seqs * -(-sc.max_model_len // cc.block_size)
        num_blocks = min(available, useful) if cc.num_gpu_blocks_override is None else available
        if num_blocks * cc.block_size < sc.max_model_len:
            raise ValueError(
                f"The KV cache holds {num_blocks} blocks x {cc.block_size} tokens = "
                f"{num_blocks * cc.block_size} tokens, fewer than max_model_len={sc.max_model_len}. "
                "Lower max_model_len, or raise gpu_memory_utilization / num_gpu_blocks_override "
                "(KVFLOW_CPU_KVCACHE_SPACE on CPU).")
        self.executor.init_cache(num_blocks)
        t3 = time.perf_counter()
        self.startup_seconds = {"load": t1 - t0, "profile": t2 - t1, "cache_and_graphs": t3 - t2}
        logger.info("start-up: model load %.2f s, memory profile %.2f s, KV cache + CUDA graphs "
                    "%.2f s", t1 - t0, t2 - t1, t3 - t2)
        self.num_blocks = num_blocks
        logger.info("KV cache: %d blocks of %d tokens (%d tokens) on %s", num_blocks,
                    cc.block_size, num_blocks * cc.block_size, config.device_config.device)
        self.scheduler = Scheduler(
            max_num_seqs=sc.max_num_seqs, max_num_batched_tokens=sc.max_num_batched_tokens,
            max_model_len=sc.max_model_len, num_blocks=num_blocks, block_size=cc.block_size,
            enable_prefix_caching=cc.enable_prefix_caching,
            long_prefill_token_threshold=sc.long_prefill_token_threshold)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.async_scheduling = sc.async_scheduling
        self._in_flight: Optional[tuple[SchedulerOutput, StepHandle]] = None
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.step_trace = StepTrace.from_env()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    # ------------------------------------------------------------------ intake
    def tokenize_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        """(text or None, token ids) of a prompt in any accepted form, as ``add_request``
        reads it (a ValueError names what is wrong with it)."""
        return self._tokenize(prompt)

    def _tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], None
            else:
                raise ValueError("A prompt dict needs a 'prompt' or a 'prompt_token_ids' key, "
                                 f"got keys {sorted(prompt)}.")
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            text, ids = None, list(prompt)
        else:
            raise ValueError(f"Unsupported prompt type {type(prompt).__name__}: pass a str, "
                             "{'prompt': str}, {'prompt_token_ids': [int, ...]} or a list of ints.")
        if ids is None:
            if not isinstance(text, str):
                raise ValueError(f"prompt must be a string, got {type(text).__name__}.")
            if self.tokenizer is None:
                raise ValueError("skip_tokenizer_init=True: pass prompts as "
                                 "{'prompt_token_ids': [...]}, not text.")
            ids = self.tokenizer.encode(text)
        return text, ids

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        mc = self.config.model_config
        if not ids:
            raise ValueError("The prompt is empty: it must hold at least one token.")
        vocab = mc.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or t < 0 or t >= vocab]
        if bad:
            raise ValueError(f"Prompt token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {vocab}) of the model.")
        max_len = self.config.scheduler_config.max_model_len
        if len(ids) > max_len:
            raise ValueError(f"The prompt has {len(ids)} tokens, more than max_model_len="
                             f"{max_len}. Shorten the prompt or raise max_model_len.")
        if params.logprobs is not None and params.logprobs > mc.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} exceeds max_logprobs={mc.max_logprobs}; "
                             "raise the engine option max_logprobs.")
        if params.prompt_logprobs is not None and params.prompt_logprobs > mc.max_logprobs:
            raise ValueError(f"prompt_logprobs={params.prompt_logprobs} exceeds max_logprobs="
                             f"{mc.max_logprobs}; raise the engine option max_logprobs.")
        if params.best_of is not None and params.best_of > params.n:
            raise ValueError(f"best_of={params.best_of} > n is not supported; use n alone.")
        if params.bad_words:
            raise ValueError("bad_words is not supported by kvflow yet; use logit_bias instead.")
        for field_name, tokens in (("allowed_token_ids", params.allowed_token_ids),
                                   ("stop_token_ids", params.stop_token_ids),
                                   ("logit_bias", list(params.logit_bias or {}))):
            out = [t for t in tokens or [] if not 0 <= int(t) < vocab]
            if out:
                raise ValueError(f"{field_name} holds token ids {out[:5]} outside [0, {vocab}).")

    def add_request(self, request_id: str, prompt: PromptType,
                    params: Optional[SamplingParams] = None, *,
                    arrival_time: Optional[float] = None,
                    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> None:
        """Validates and queues a request; raises ValueError (queuing nothing) on bad input."""
        params = (params or SamplingParams()).clone()
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use.")
        text, ids = self._tokenize(prompt)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]
        self._validate(ids, params)
        params.update_from_tokenizer(self.eos_token_ids)
        max_model_len = self.config.scheduler_config.max_model_len
        max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len - len(ids)
        max_tokens = max(1, max_tokens)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        kind = params.output_kind if isinstance(params.output_kind, RequestOutputKind) else output_kind
        child_ids = self.output_processor.add_request(request_id, text, ids, params, kind, arrival)
        block_size = self.config.cache_config.block_size
        first: Optional[Request] = None
        for i, cid in enumerate(child_ids):
            child_params = params
            if i > 0 and params.seed is not None:
                child_params = params.clone()
                child_params.seed = params.seed + i
                child_params.update_from_tokenizer(self.eos_token_ids)
            req = Request(cid, ids, child_params, max_tokens=max_tokens, block_size=block_size,
                          arrival_time=arrival, fork_parent=first)
            first = first or req
            self.scheduler.add_request(req)
        self.prompt_tokens_total += len(ids)

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> list[RequestOutput]:
        """Ends requests at once and frees their blocks; returns their final outputs."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        results = []
        for rid in request_ids:
            parent = self.output_processor.parents.get(rid)
            if parent is None:
                continue
            cids = [child_request_id(rid, s.index) for s in parent.seqs]
            self.scheduler.finish_requests(cids, RequestStatus.FINISHED_ABORTED)
            out = self.output_processor.abort_request(rid)
            if out is not None:
                results.append(out)
        return results

    # ------------------------------------------------------------------ loop
    def has_unfinished_requests(self) -> bool:
        # A step still in flight matters only while one of its requests is unfinished, and
        # then the scheduler holds that request; a step whose requests were all aborted is
        # simply read (and its tokens dropped) by the next step().
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.num_unfinished()

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled batch; returns outputs of the requests it advanced.

        Asynchronously scheduled, the outputs are those of the step launched by
        the previous call (the module docstring has the picture).
        """
        scheduled_at = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.scheduled_new_reqs:  # queue time ends here (preempted ones come back: kept)
            self.output_processor.mark_scheduled(
                [r.req_id for r in sched.scheduled_new_reqs], time.monotonic())
        if sched.is_empty:
            if sched.finished_req_ids or sched.preempted_req_ids:
                self.executor.execute_model(sched)  # let workers drop finished state
            handle = None
        else:
            handle = self.executor.execute_model_async(sched)
            self.step_trace.launched(sched, scheduled_at)
        if not self.async_scheduling:
            return [] if handle is None else self._process(sched, handle)
        previous, self._in_flight = self._in_flight, (
            None if handle is None else (sched, handle))
        return [] if previous is None else self._process(*previous)

    def _process(self, sched: SchedulerOutput, handle: StepHandle) -> list[RequestOutput]:
        core_outputs = self.scheduler.update_from_output(sched, handle.result())
        self.step_trace.done(sched)
        self.generation_tokens_total += sum(len(o.new_token_ids) for o in core_outputs)
        outputs, to_abort = self.output_processor.process_outputs(core_outputs)
        if to_abort:
            self.scheduler.finish_requests(to_abort, RequestStatus.FINISHED_STOPPED)
        return outputs

    def start_profile(self) -> None:
        """Starts torch.profiler in every worker (vLLM's ``start_profile``); the traces go
        to $KVFLOW_TORCH_PROFILER_DIR when ``stop_profile`` is called."""
        trace_dir = envs.torch_profiler_dir()
        if trace_dir is None:
            raise RuntimeError("Profiling is off: set KVFLOW_TORCH_PROFILER_DIR to the folder "
                               "for the traces (vLLM's VLLM_TORCH_PROFILER_DIR), then call "
                               "start_profile().")
        if self._profiling:
            raise RuntimeError("The profiler is already running; call stop_profile() first.")
        self.executor.start_profile(trace_dir)
        self._profiling = True

    def stop_profile(self) -> None:
        """Stops the profiler; each worker writes rank{r}.*.pt.trace.json.gz there."""
        if not self._profiling:
            raise RuntimeError("The profiler is not running; call start_profile() first.")
        self._profiling = False
        self.executor.stop_profile()

    def reset_prefix_cache(self) -> bool:
        """Drops every cached block hash; False (nothing changed) while blocks are in use."""
        return self.scheduler.kv_cache_manager.pool.reset_prefix_cache()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_stats(self) -> EngineStats:
        pool = self.scheduler.kv_cache_manager.pool
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=pool.usage, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=pool.num_queries, prefix_cache_hits=pool.num_hits)

    def shutdown(self) -> None:
        self.step_trace.close()
        self.executor.shutdown()
