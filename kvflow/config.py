"""Engine configuration: one definition of every option, frozen per-area configs.

``EngineArgs`` is the single place where engine options are declared, with
vLLM's names and defaults. ``LLM(**kwargs)`` and the ``kvflow serve`` flags are
both generated from it. ``EngineArgs.create_engine_config()`` validates the
values, reads the model's ``config.json`` once, and returns a frozen
``EngineConfig`` made of one dataclass per area; each component takes only the
part it needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

from kvflow import envs
from kvflow.generation_defaults import read_generation_defaults
from kvflow.vllm_compat import drop_inert_options

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
_LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy", "gguf")
_QUANTIZATIONS = ("awq",)
_DEVICES = ("auto", "cpu", "cuda")
_ATTENTION_BACKENDS = ("auto", "torch", "triton")
_EXECUTORS = ("uni", "mp", "ray")


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field_name}={value!r} is not allowed: {allowed}.")


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to know of the model, read once from config.json."""

    model: str
    """Local folder (or GGUF file converted to one) that holds the checkpoint."""
    tokenizer: Optional[str]
    """Folder of the tokenizer; None when ``skip_tokenizer_init``."""
    hf_config: Any = field(compare=False, repr=False)
    """The transformers ``PretrainedConfig``; only ``models/`` converts it."""
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    seed: int
    load_format: str
    quantization: Optional[str]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    trust_remote_code: bool = False
    revision: Optional[str] = None
    served_model_name: Optional[str] = None
    max_logprobs: int = 20
    generation_defaults: tuple[tuple[str, Any], ...] = ()
    """(SamplingParams field, default) pairs from generation_config.json (see
    ``kvflow.generation_defaults``): what a request that leaves them unset samples with."""

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        return dict(self.generation_defaults)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16
    """Tokens per KV block."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory the engine may use (weights + activations + KV)."""
    num_gpu_blocks_override: Optional[int] = None
    """Fixes the number of KV blocks on any device, skipping the profiling."""
    enable_prefix_caching: bool = True
    """Share full blocks between requests with the same token prefix."""
    cpu_kv_cache_space_gib: float = 4.0
    """On CPU, GiB of memory given to the KV cache (``KVFLOW_CPU_KVCACHE_SPACE``)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Token budget and batch limits of one engine step."""

    max_num_seqs: int = 256
    """Most requests running at once."""
    max_num_batched_tokens: int = 8192
    """Token budget of one step (decodes count one each, prefill chunks their length)."""
    max_model_len: int = 2048
    long_prefill_token_threshold: int = 0
    """Most prompt tokens one request computes in a step (0: no cap beyond the budget).
    A small cap spreads an arriving prompt over several steps, so the decodes running
    beside it keep a steady inter-token latency (S1 in benchmarks/RESULTS.md)."""
    async_scheduling: bool = False
    """Schedule step N+1 while the GPU runs step N (sampled ids one step late); see
    engine/llm_engine.py. On by default with one worker in the engine's process."""


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None
    """None picks "uni" for one worker and "mp" for several; "ray" places workers with Ray."""


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device
    attention_backend: str
    """"torch" (reference, everywhere) or "triton" (CUDA)."""
    enforce_eager: bool = False
    """True turns CUDA graphs off."""


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    device_config: DeviceConfig
    skip_tokenizer_init: bool = False


@dataclass
class EngineArgs:
    """Every engine option, with vLLM's names and defaults.

    ``LLM(**kwargs)`` and the CLI flags of ``kvflow serve`` are generated from
    these fields; add an option here and it appears in both.
    """

    model: str = ""
    tokenizer: Optional[str] = None
    tokenizer_mode: str = "auto"
    trust_remote_code: bool = False
    download_dir: Optional[str] = None
    load_format: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    revision: Optional[str] = None
    tokenizer_revision: Optional[str] = None
    max_model_len: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    num_gpu_blocks_override: Optional[int] = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    long_prefill_token_threshold: int = 0
    """Most prompt tokens a request computes in one step (0: no cap). Lower it to keep
    the inter-token latency of running requests steady while new prompts arrive."""
    enforce_eager: bool = False
    skip_tokenizer_init: bool = False
    tensor_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None
    quantization: Optional[str] = None
    served_model_name: Optional[str] = None
    max_logprobs: int = 20
    device: str = "auto"
    attention_backend: str = "auto"
    cpu_kv_cache_space: Optional[float] = None
    async_scheduling: Optional[bool] = None
    """None: on for the in-process worker (tensor_parallel_size 1), off otherwise."""
    generation_config: str = "auto"
    """Sampling defaults of requests that leave them unset: "auto" (the model's
    generation_config.json, as vLLM), "vllm" (none: temperature 1, top_p 1, ...), or a
    folder holding a generation_config.json."""
    override_generation_config: Optional[dict[str, Any]] = None
    """Sampling defaults set on top of ``generation_config``'s, in generation_config.json
    names (``{"temperature": 0.5}``), as vLLM's option of that name."""
    kv_cache_dtype: str = "auto"
    """Element type of the KV cache: "auto" (the model's dtype) or that dtype's name;
    kvflow has no fp8 cache."""
    pipeline_parallel_size: int = 1
    """Only 1: kvflow splits a model over GPUs by tensor parallelism."""
    disable_log_stats: bool = True
    """No periodic load line (throughput, running/waiting, KV cache): the offline ``LLM``
    never logs one; ``kvflow serve`` does unless given ``--disable-log-stats``."""
    # Accepted for compatibility with vLLM scripts; they change nothing here.
    swap_space: float = 4
    enable_chunked_prefill: Optional[bool] = None
    disable_custom_all_reduce: bool = False
    cpu_offload_gb: float = 0

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineArgs":
        """Builds the args, rejecting unknown names with the list of known ones.

        vLLM options with nothing to do here are dropped at values that change nothing
        and refused otherwise (``kvflow.vllm_compat``)."""
        kwargs = drop_inert_options(kwargs)
        known = set(cls.field_names())
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"Unknown engine option(s) {unknown}. Known options: {sorted(known)}."
            )
        return cls(**kwargs)

    # ------------------------------------------------------------------ validation
    def _check_ranges(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            _fail("gpu_memory_utilization", self.gpu_memory_utilization, "must be in (0, 1]")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            _fail("block_size", self.block_size, "one of 1, 2, 4, 8, 16, 32, 64, 128")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            _fail("num_gpu_blocks_override", self.num_gpu_blocks_override, "must be >= 1 or None")
        if self.max_num_seqs < 1:
            _fail("max_num_seqs", self.max_num_seqs, "must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            _fail("max_num_batched_tokens", self.max_num_batched_tokens, "must be >= 1")
        if self.long_prefill_token_threshold < 0:
            _fail("long_prefill_token_threshold", self.long_prefill_token_threshold,
                  "must be >= 0 (0 = no cap)")
        if self.max_model_len is not None and self.max_model_len < 1:
            _fail("max_model_len", self.max_model_len, "must be >= 1")
        if self.tensor_parallel_size < 1:
            _fail("tensor_parallel_size", self.tensor_parallel_size, "must be >= 1")
        if self.pipeline_parallel_size != 1:
            _fail("pipeline_parallel_size", self.pipeline_parallel_size,
                  "only 1 (no pipeline parallelism); split the model with tensor_parallel_size")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in _DTYPES:
            _fail("kv_cache_dtype", self.kv_cache_dtype,
                  f"'auto' or one of {sorted(_DTYPES)} (no fp8 KV cache: the cache holds the "
                  "model's dtype)")
        if self.load_format not in _LOAD_FORMATS:
            _fail("load_format", self.load_format, f"one of {_LOAD_FORMATS}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            _fail("dtype", self.dtype, f"'auto' or one of {sorted(_DTYPES)}")
        if self.quantization is not None and self.quantization not in _QUANTIZATIONS:
            _fail("quantization", self.quantization, f"None or one of {_QUANTIZATIONS}")
        if self.device not in _DEVICES:
            _fail("device", self.device, f"one of {_DEVICES}")
        if self.attention_backend not in _ATTENTION_BACKENDS:
            _fail("attention_backend", self.attention_backend, f"one of {_ATTENTION_BACKENDS}")
        if (
            self.distributed_executor_backend is not None
            and self.distributed_executor_backend not in _EXECUTORS
        ):
            _fail("distributed_executor_backend", self.distributed_executor_backend,
                  f"None or one of {_EXECUTORS}")
        if self.max_logprobs < 0:
            _fail("max_logprobs", self.max_logprobs, "must be >= 0")
        if self.cpu_kv_cache_space is not None and self.cpu_kv_cache_space <= 0:
            _fail("cpu_kv_cache_space", self.cpu_kv_cache_space, "must be > 0 GiB")

    def _resolve_device(self) -> torch.device:
        if self.device == "cpu":
            return torch.device("cpu")
        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device='cuda' was asked for but torch sees no CUDA GPU. "
                                 "Use device='auto' or 'cpu'.")
            return torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _resolve_dtype(self, hf_config: Any, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if device.type == "cpu":
            # Half-precision matmuls on CPU are slow and inexact; compute in float32.
            return torch.float32
        cfg_dtype = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
        if isinstance(cfg_dtype, str):
            cfg_dtype = _DTYPES.get(cfg_dtype, torch.float16)
        if cfg_dtype == torch.bfloat16:
            return torch.bfloat16
        # vLLM's rule: float32 and float16 checkpoints run in float16 on GPU.
        return torch.float16

    def create_engine_config(self) -> EngineConfig:
        """Validates every option, reads the model config and freezes the result."""
        from kvflow.models.registry import resolve_architecture
        from kvflow.models.source import resolve_model

        self._check_ranges()
        if not self.model:
            raise ValueError("model is empty: name a local folder, a .gguf file or a hub id.")
        source = resolve_model(
            self.model,
            revision=self.revision,
            download_dir=self.download_dir,
            load_format=self.load_format,
            tokenizer=self.tokenizer,
            skip_tokenizer_init=self.skip_tokenizer_init,
        )
        hf_config = source.hf_config
        architecture = resolve_architecture(hf_config)
        from kvflow.models.registry import describe_model

        desc = describe_model(architecture, hf_config)
        device = self._resolve_device()
        dtype = self._resolve_dtype(hf_config, device)
        if self.kv_cache_dtype != "auto" and _DTYPES[self.kv_cache_dtype] != dtype:
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} differs from the model's dtype {dtype}: "
                "kvflow keeps the KV cache in the model's dtype. Use kv_cache_dtype='auto' (or "
                "set dtype to match).")

        derived_len = desc.max_position_embeddings
        if self.max_model_len is not None:
            if derived_len is not None and self.max_model_len > derived_len:
                raise ValueError(
                    f"max_model_len={self.max_model_len} is larger than the model's "
                    f"maximum context of {derived_len} tokens (from config.json). "
                    f"Lower max_model_len to at most {derived_len}."
                )
            max_model_len = self.max_model_len
        else:
            max_model_len = derived_len or 2048

        quantization = _resolve_quantization(self.quantization, hf_config, source.model_dir)

        model_config = ModelConfig(
            model=source.model_dir,
            tokenizer=source.tokenizer_dir,
            hf_config=hf_config,
            architecture=architecture,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=self.seed,
            load_format="gguf" if source.is_gguf else self.load_format,
            quantization=quantization,
            num_layers=desc.num_layers,
            num_kv_heads=desc.num_kv_heads,
            head_dim=desc.head_dim,
            vocab_size=desc.vocab_size,
            trust_remote_code=self.trust_remote_code,
            revision=self.revision,
            served_model_name=self.served_model_name or self.model,
            max_logprobs=self.max_logprobs,
            generation_defaults=tuple(sorted(read_generation_defaults(
                source.model_dir, self.generation_config,
                self.override_generation_config).items())),
        )
        cpu_space = self.cpu_kv_cache_space
        if cpu_space is None:
            cpu_space = envs.cpu_kv_cache_space_gib()
        cache_config = CacheConfig(
            block_size=self.block_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            enable_prefix_caching=self.enable_prefix_caching,
            cpu_kv_cache_space_gib=cpu_space,
        )
        max_batched = self.max_num_batched_tokens
        if max_batched is None:
            max_batched = 8192 if device.type == "cuda" else 2048
        tp = self.tensor_parallel_size
        async_scheduling = self.async_scheduling
        if async_scheduling is None:
            async_scheduling = tp == 1 and self.distributed_executor_backend in (None, "uni")
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max_batched,
            max_model_len=max_model_len,
            long_prefill_token_threshold=self.long_prefill_token_threshold,
            async_scheduling=async_scheduling,
        )
        if tp > 1:
            if desc.num_heads % tp != 0:
                raise ValueError(
                    f"tensor_parallel_size={tp} does not divide the model's "
                    f"{desc.num_heads} attention heads. Choose a divisor of {desc.num_heads}."
                )
            # Ray places ranks on other machines too; only local placement is bounded here.
            if (device.type == "cuda" and tp > torch.cuda.device_count()
                    and self.distributed_executor_backend != "ray"):
                raise ValueError(
                    f"tensor_parallel_size={tp} exceeds the {torch.cuda.device_count()} "
                    "visible GPUs. Lower tensor_parallel_size or expose more GPUs."
                )
        parallel_config = ParallelConfig(
            tensor_parallel_size=tp,
            distributed_executor_backend=self.distributed_executor_backend,
        )
        backend = self.attention_backend
        head_ok = desc.head_dim >= 16 and desc.head_dim & (desc.head_dim - 1) == 0
        if backend == "auto":
            # The Triton kernels tile the head dimension by powers of two; others use torch.
            backend = ("triton" if device.type == "cuda" and _triton_available() and head_ok
                       else "torch")
        if backend == "triton" and device.type != "cuda":
            raise ValueError("attention_backend='triton' needs a CUDA device; use 'torch' on CPU.")
        if backend == "triton" and not head_ok:
            raise ValueError(f"attention_backend='triton' needs a power-of-two head size >= 16; "
                             f"this model's is {desc.head_dim}. Use attention_backend='torch'.")
        device_config = DeviceConfig(
            device=device, attention_backend=backend, enforce_eager=self.enforce_eager
        )
        return EngineConfig(
            model_config=model_config,
            cache_config=cache_config,
            scheduler_config=scheduler_config,
            parallel_config=parallel_config,
            device_config=device_config,
            skip_tokenizer_init=self.skip_tokenizer_init,
        )


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_quantization(requested: Optional[str], hf_config: Any,
                          model_dir: Optional[str]) -> Optional[str]:
    """Checks the requested method against what the checkpoint says it holds.

    The checkpoint's settings come from config.json's ``quantization_config``,
    else from a ``quant_config.json`` / ``quantize_config.json`` beside it
    (older AutoAWQ/AutoGPTQ exports). A side file that names no method is read
    as the requested one, as vLLM does. AWQ settings are validated here, so a
    GEMV-layout or 8-bit checkpoint fails before any weight is read.
    """
    from kvflow.quantization.detect import find_quant_config

    found_cfg = find_quant_config(hf_config, model_dir)
    found = found_cfg.method if found_cfg is not None else None
    if requested is None:
        if found_cfg is not None and found is None:
            raise ValueError(
                f"The checkpoint has quantization settings in {found_cfg.source} "
                f"(keys {sorted(found_cfg.values)}) that do not name their method. Pass "
                f"quantization= one of {_QUANTIZATIONS} if it is such a checkpoint."
            )
        if found_cfg is not None and found is not None and found not in _QUANTIZATIONS:
            raise ValueError(
                f"The checkpoint is quantized with {found!r} (from {found_cfg.source}), which "
                f"kvflow does not support (supported: {_QUANTIZATIONS})."
            )
        resolved = found
    elif found_cfg is None:
        raise ValueError(
            f"quantization={requested!r} was asked for, but the checkpoint holds unquantized "
            "weights (no quantization_config in config.json, no quant_config.json or "
            "quantize_config.json beside it). Drop the quantization option."
        )
    elif found is not None and found != requested:
        raise ValueError(
            f"quantization={requested!r} conflicts with the checkpoint, which is quantized "
            f"with {found!r} (from {found_cfg.source}). Use quantization={found!r} or leave "
            "it unset."
        )
    else:
        resolved = requested
    if resolved == "awq":
        from kvflow.quantization.awq import AWQConfig

        assert found_cfg is not None
        AWQConfig.from_checkpoint_config(found_cfg)
    return resolved


def replace(cfg: Any, **changes: Any) -> Any:
    """Returns a copy of a frozen config with some fields changed."""
    return dataclasses.replace(cfg, **changes)


__all__ = [
    "CacheConfig",
    "DeviceConfig",
    "EngineArgs",
    "EngineConfig",
    "ModelConfig",
    "ParallelConfig",
    "SchedulerConfig",
]
