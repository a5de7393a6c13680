"""GPU memory profiling: how many bytes are left for the KV cache."""

from __future__ import annotations

import torch

from kvflow.attention.metadata import AttentionMetadata
from kvflow.config import EngineConfig


@torch.inference_mode()
def profile_free_memory(model, config: EngineConfig, device: torch.device) -> int:
    """Runs one forward at the step's largest token count and returns the bytes left.

    budget = total * gpu_memory_utilization; left = budget - (weights + peak
    activations of a ``max_num_batched_tokens`` step + the logits of
    ``max_num_seqs`` sampled rows).
    """
    sc, cc, mc = config.scheduler_config, config.cache_config, config.model_config
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    num_tokens = sc.max_num_batched_tokens
    num_seqs = min(sc.max_num_seqs, num_tokens)
    # A dummy cache of a few blocks; every request's slots point into it.
    bs = cc.block_size
    from kvflow.distributed.parallel_state import get_tp_size

    kv_heads = max(1, mc.num_kv_heads // get_tp_size())
    per_seq = -(-num_tokens // num_seqs)
    num_blocks = num_seqs * (-(-per_seq // bs))
    caches = [torch.zeros(2, num_blocks, bs, kv_heads, mc.head_dim, dtype=mc.dtype, device=device)
              for _ in range(mc.num_layers)]
    lens = [per_seq] * (num_tokens // per_seq) + ([num_tokens % per_seq] if num_tokens % per_seq else [])
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    blocks_per = -(-per_seq // bs)
    tables = torch.arange(len(lens) * blocks_per, dtype=torch.int32, device=device).view(len(lens), -1)
    slots = torch.cat([tables[i].long().repeat_interleave(bs)[:n] * bs
                       + torch.arange(n, device=device) % bs for i, n in enumerate(lens)])
    metadata = AttentionMetadata(
        num_tokens=num_tokens, max_query_len=max(lens), max_seq_len=max(lens),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=tables, slot_mapping=slots, query_start_loc_cpu=starts, seq_lens_cpu=lens)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    pos = torch.cat([torch.arange(n, device=device) for n in lens])
    hidden = model(ids, pos, caches, metadata)
    model.compute_logits(hidden[:num_seqs]).float().softmax(-1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    cache_bytes = sum(c.numel() * c.element_size() for c in caches)
    del caches, hidden
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    budget = total * cc.gpu_memory_utilization - used_by_others
    return int(budget - (peak - cache_bytes))
