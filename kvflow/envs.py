"""Environment variables read by kvflow: one module, one prefix, loud on bad values."""

from __future__ import annotations

import os


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number.") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be > 0.")
    return value


def cpu_kv_cache_space_gib() -> float:
    """GiB of host memory for the KV cache on CPU (KVFLOW_CPU_KVCACHE_SPACE, default 4)."""
    return _float("KVFLOW_CPU_KVCACHE_SPACE", 4.0)


def cache_root() -> str:
    """Folder for converted checkpoints (KVFLOW_CACHE_ROOT, default ~/.cache/kvflow)."""
    return os.environ.get("KVFLOW_CACHE_ROOT") or os.path.join(
        os.path.expanduser("~"), ".cache", "kvflow"
    )


def api_key() -> str | None:
    """Default for ``kvflow serve --api-key`` (KVFLOW_API_KEY)."""
    return os.environ.get("KVFLOW_API_KEY") or None


def logging_level() -> str:
    """Level of the "kvflow" logger (KVFLOW_LOGGING_LEVEL, default INFO)."""
    return os.environ.get("KVFLOW_LOGGING_LEVEL", "INFO").upper()


def torch_profiler_dir() -> str | None:
    """Folder for the traces of ``LLM.start_profile()`` / ``stop_profile()``
    (KVFLOW_TORCH_PROFILER_DIR; vLLM's VLLM_TORCH_PROFILER_DIR). Unset: profiling is off."""
    return os.environ.get("KVFLOW_TORCH_PROFILER_DIR") or None


def pdl_enabled() -> bool:
    """Whether kvflow's decode-path Triton kernels launch with programmatic dependent
    launch on Hopper GPUs (KVFLOW_PDL, default 1; 0 turns it off). See
    ``kvflow.kernels.pdl``."""
    raw = os.environ.get("KVFLOW_PDL", "").strip()
    if raw == "0":
        return False
    if raw in ("", "1"):
        return True
    raise ValueError(f"KVFLOW_PDL={raw!r} must be 0 or 1.")


AWQ_KERNELS = ("auto", "triton", "int4pack", "gemv", "rows")


def awq_kernel() -> str:
    """Kernel for AWQ int4 linears on CUDA (KVFLOW_AWQ_KERNEL, default auto).

    ``auto``: kvflow's K-packed int4 GEMV (``kvflow.kernels.awq_gemv``) for the
    smallest batches, PyTorch's tinygemm (``torch._weight_int4pack_mm``) where the
    measured table still prefers it, else the Triton GEMM; ``gemv``: the K-packed GEMV
    for every small batch (no tinygemm); ``rows``: the one-token GEMV over AutoAWQ's own
    layout (``kvflow.kernels.awq_gemv_rows``) for one token, the Triton kernels above
    (no repack of the codes); ``int4pack``: tinygemm for small batches, an
    unsupported layer is an error; ``triton``: neither repack (the Triton kernels over
    AutoAWQ's layout). See ``kvflow.quantization.awq``.
    """
    raw = os.environ.get("KVFLOW_AWQ_KERNEL", "").strip().lower() or "auto"
    if raw not in AWQ_KERNELS:
        raise ValueError(f"KVFLOW_AWQ_KERNEL={raw!r} is not one of {AWQ_KERNELS}.")
    return raw


def max_gemv_tokens(default: int) -> int:
    """Largest token count whose bf16/fp16 linears run the Triton GEMV instead of cuBLAS
    (KVFLOW_MAX_GEMV_TOKENS; default: ``kvflow.layers.linear``'s measured choice).
    A benchmark knob: it lets one run compare the two kernels at a batch size."""
    raw = os.environ.get("KVFLOW_MAX_GEMV_TOKENS", "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"KVFLOW_MAX_GEMV_TOKENS={raw!r} is not an integer.") from None
    if not 0 <= value <= 64:
        raise ValueError(f"KVFLOW_MAX_GEMV_TOKENS={raw!r} must be in 0..64 (the GEMV holds "
                         "at most 64 tokens).")
    return value


def step_trace_path() -> str | None:
    """File that receives one JSON line per engine step (KVFLOW_STEP_TRACE; unset: none).
    See ``kvflow.engine.step_trace``."""
    return os.environ.get("KVFLOW_STEP_TRACE") or None


def log_stats_interval() -> float:
    """Seconds between ``kvflow serve``'s load lines (KVFLOW_LOG_STATS_INTERVAL, default 10)."""
    return _float("KVFLOW_LOG_STATS_INTERVAL", 10.0)
