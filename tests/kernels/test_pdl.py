"""Programmatic dependent launch (``kvflow.kernels.pdl``): the knob, and the invariant that
makes it safe -- a kernel compiled with USE_PDL touches no global memory before
``griddepcontrol.wait``.

The second check needs no GPU: each kernel is compiled for sm90 (Hopper) to PTX on this
machine and its instructions are read in order. Runs on the GPU compare results with PDL on
and off (``test_pdl_gpu_results_unchanged``).
"""

from __future__ import annotations

import re

import pytest
import torch

from kvflow import envs
from kvflow.kernels import pdl

ON_GPU = torch.cuda.is_available()


@pytest.mark.parametrize("raw, expected", [("", True), ("0", False), ("1", True)])
def test_knob(monkeypatch, raw, expected):
    monkeypatch.setenv("KVFLOW_PDL", raw)
    assert envs.pdl_enabled() is expected


def test_knob_rejects_other_values(monkeypatch):
    monkeypatch.setenv("KVFLOW_PDL", "yes")
    with pytest.raises(ValueError, match="KVFLOW_PDL='yes' must be 0 or 1"):
        envs.pdl_enabled()


def test_no_pdl_off_the_gpu(monkeypatch):
    monkeypatch.setenv("KVFLOW_PDL", "1")
    assert pdl.launch_options(torch.device("cpu")) == {}
    monkeypatch.setenv("KVFLOW_PDL", "0")
    assert pdl.launch_options(torch.device("cpu")) == {}


def _kernels():
    """(name, jit function, signature, constexprs) of every kernel launched with PDL."""
    from kvflow.kernels import activation, awq_gemv, gemv, paged_attention, reshape_and_cache
    from kvflow.kernels import rms_norm

    def sig(fn, types: dict[str, str], consts: dict) -> dict[str, str]:
        out = {}
        for name in fn.arg_names:
            if name in consts:
                out[name] = "constexpr"
            elif name in types:
                out[name] = types[name]
            else:
                out[name] = "*bf16" if name.endswith("_ptr") else "i32"
        return out

    cases = []

    def add(name, fn, types, consts):
        consts = dict(consts, USE_PDL=True)
        cases.append((name, fn, sig(fn, types, consts), consts))

    add("rms_norm", rms_norm._rms_norm_kernel, {"eps": "fp32"},
        {"HAS_RESIDUAL": True, "BLOCK": 4096})
    add("silu_and_mul", activation._silu_and_mul_kernel, {}, {"BLOCK": 1024})
    add("gemv", gemv._gemv_kernel, {"partial_ptr": "*fp32"},
        {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 1024, "USE_DOT": False, "HAS_BIAS": False,
         "IS_SPLIT": False, "DOT_IEEE": False, "NUM_STAGES": 3})
    add("sum_splits", gemv._sum_splits_kernel, {"partial_ptr": "*fp32"},
        {"HAS_BIAS": False, "BLOCK": 1024})
    add("awq_gemv", awq_gemv._awq_gemv_kernel,
        {"w_ptr": "*i32", "sz_ptr": "*fp16", "partial_ptr": "*fp32"},
        {"M": 1, "BLOCK_N": 16, "BLOCK_K": 512, "GROUP": 128, "HAS_BIAS": False,
         "IS_SPLIT": False, "NUM_STAGES": 3})
    add("write_kv_cache", reshape_and_cache._write_kv_cache_kernel,
        {"slot_mapping_ptr": "*i64", "positions_ptr": "*i64", "cos_sin_ptr": "*fp32"},
        {"BLOCK_SIZE": 16, "HEAD_SIZE": 128, "BLOCK_D": 128, "BLOCK_H": 8, "BLOCK_HQ": 16,
         "HAS_ROTARY": True, "IS_NEOX": True})
    int_ptrs = {"block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
                "query_start_loc_ptr": "*i32", "order_ptr": "*i32", "alibi_slopes_ptr": "*fp32",
                "part_acc_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32",
                "scale_log2": "fp32"}
    add("paged_attention", paged_attention._paged_attention_kernel, int_ptrs,
        {"NUM_QUERIES_PER_KV": 4, "BLOCK_M": 16, "BLOCK_Q": 1, "BLOCK_SIZE": 16,
         "HEAD_SIZE": 128, "TILE_N": 64, "HAS_ALIBI": False, "HAS_WINDOW": False,
         "HAS_ORDER": True, "IS_SPLIT": True, "IS_FP32": False, "UPCAST": False})
    add("reduce_kv_splits", paged_attention._reduce_kv_splits_kernel, int_ptrs,
        {"HEAD_SIZE": 128, "BLOCK_SPLITS": 8})
    return cases


_MEMORY = re.compile(r"^\s*(@!?%p\d+\s+)?(ld|st|cp\.async|atom|red)\.(global|shared)?")


def _ptx_report() -> dict:
    """name -> (wait line, release line, memory instructions before the wait) of each kernel
    compiled for sm90, plus "off": whether USE_PDL=False left any grid control in the PTX.
    Runs in a child process (``__main__`` below): the tests run Triton's interpreter, whose
    kernels cannot be compiled."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def ptx(fn, signature, constexprs) -> list[str]:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4, "launch_pdl": True})
        text = compiled.asm["ptx"]
        return text[text.index(".entry"):].splitlines()

    report = {}
    cases = _kernels()
    for name, fn, signature, constexprs in cases:
        body = ptx(fn, signature, constexprs)
        wait = next((i for i, line in enumerate(body) if "griddepcontrol.wait" in line), -1)
        release = next((i for i, line in enumerate(body)
                        if "griddepcontrol.launch_dependents" in line), -1)
        early = [line.strip() for line in body[:max(wait, 0)]
                 if _MEMORY.match(line) and "param" not in line]
        report[name] = (wait, release, early)
    name, fn, signature, constexprs = cases[0]
    report["off"] = any("griddepcontrol" in line
                        for line in ptx(fn, signature, dict(constexprs, USE_PDL=False)))
    return report


@pytest.fixture(scope="module")
def ptx_report() -> dict:
    import json
    import os
    import subprocess
    import sys

    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend to compile for sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c[0] for c in _kernels()])
def test_wait_comes_before_any_global_access(ptx_report, name):
    wait, release, early = ptx_report[name]
    assert 0 <= wait < release, f"{name}: griddepcontrol.wait at {wait}, release at {release}"
    assert not early, f"{name} touches memory before griddepcontrol.wait: {early[:3]}"


def test_use_pdl_false_compiles_no_grid_control(ptx_report):
    assert ptx_report["off"] is False


@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability() < (9, 0),
                    reason="PDL launches need a Hopper GPU")
def test_pdl_gpu_results_unchanged(monkeypatch):
    """A decode-shaped chain of kvflow kernels in a CUDA graph: PDL on = PDL off, bit for bit."""
    from kvflow.kernels.activation import silu_and_mul
    from kvflow.kernels.gemv import gemv
    from kvflow.kernels.rms_norm import fused_add_rms_norm

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 4096, device="cuda", generator=gen).bfloat16()
    res = torch.randn(1, 4096, device="cuda", generator=gen).bfloat16()
    w_norm = torch.rand(4096, device="cuda", generator=gen).bfloat16()
    w_up = (torch.randn(2 * 1024, 4096, device="cuda", generator=gen) * 0.02).bfloat16()
    w_down = (torch.randn(4096, 1024, device="cuda", generator=gen) * 0.02).bfloat16()

    def chain():
        h, r = fused_add_rms_norm(x, res, w_norm, 1e-6)
        return gemv(silu_and_mul(gemv(h, w_up)), w_down) + r

    outs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("KVFLOW_PDL", flag)
        chain()  # compile
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        outs.append(out.clone())
    assert torch.equal(outs[0], outs[1])


if __name__ == "__main__":
    import json

    print(json.dumps(_ptx_report()))
