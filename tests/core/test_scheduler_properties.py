"""Property tests of the scheduler and KV cache manager (pure Python, no model).

A fake model samples random tokens; hypothesis draws arrivals, prompt lengths
(with shared prefixes), budgets, pool sizes and aborts. After every step:
blocks are conserved, reference counts equal the tables holding each block,
and any block two requests share holds the same tokens for both. At the end
every request has finished or been aborted and every block is free.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvflow.core.request import Request, RequestStatus
from kvflow.core.scheduler import ModelRunnerOutput, Scheduler
from kvflow.sampling_params import SamplingParams


def _check_shared_content(sched: Scheduler, seen: dict) -> None:
    """A block's K/V depend on every token up to its end, so holders must agree on all of them."""
    bs = sched.block_size
    owners: dict[int, list[tuple[Request, int]]] = {}
    for req_id, blocks in sched.kv_cache_manager.req_to_blocks.items():
        req = sched.requests[req_id]
        for i, block in enumerate(blocks):
            owners.setdefault(block.block_id, []).append((req, i))
            if block.block_hash is not None and (i + 1) * bs <= req.num_tokens:
                prefix = tuple(req.all_token_ids[:(i + 1) * bs])
                assert block.block_hash[1] == prefix[-bs:], \
                    "a cached block's key does not match its holder's tokens"
                first = seen.setdefault((block.block_id, block.block_hash), prefix)
                assert first == prefix, "a cached block was reused under a different prefix"
    for block_id, holders in owners.items():
        if len(holders) < 2:
            continue
        contents = {tuple(r.all_token_ids[:(i + 1) * bs]) for r, i in holders}
        assert len(contents) == 1, f"block {block_id} shared by requests with different prefixes"


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    max_model_len = draw(st.integers(8, 64))
    min_blocks = -(-max_model_len // block_size)
    num_blocks = draw(st.integers(min_blocks, min_blocks * 4))
    prefixes = [draw(st.lists(st.integers(0, 50), min_size=0, max_size=20)) for _ in range(3)]
    reqs = []
    for _ in range(draw(st.integers(1, 12))):
        prefix = draw(st.sampled_from(prefixes))
        tail = draw(st.lists(st.integers(0, 50), min_size=1, max_size=30))
        prompt = (prefix + tail)[: max_model_len]
        reqs.append(dict(prompt=prompt, max_tokens=draw(st.integers(1, 20)),
                         arrive_step=draw(st.integers(0, 10)),
                         abort_step=draw(st.one_of(st.none(), st.integers(0, 30))),
                         n=draw(st.sampled_from([1, 1, 1, 2, 3]))))
    return dict(block_size=block_size, max_model_len=max_model_len, num_blocks=num_blocks,
                max_num_seqs=draw(st.integers(1, 8)),
                max_num_batched_tokens=draw(st.integers(1, 64)),
                caching=draw(st.booleans()), reqs=reqs, seed=draw(st.integers(0, 1000)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_scheduler_never_leaks_and_always_finishes(w):
    rng = random.Random(w["seed"])
    sched = Scheduler(max_num_seqs=w["max_num_seqs"],
                      max_num_batched_tokens=w["max_num_batched_tokens"],
                      max_model_len=w["max_model_len"], num_blocks=w["num_blocks"],
                      block_size=w["block_size"], enable_prefix_caching=w["caching"])
    params = SamplingParams(max_tokens=None)
    params.update_from_tokenizer({7})  # token 7 is EOS
    added: dict[str, list[Request]] = {}
    ended: dict[str, str] = {}
    seen: dict = {}
    step = 0
    while step < 2000:
        for i, spec in enumerate(w["reqs"]):
            rid = f"r{i}"
            if spec["arrive_step"] == step and rid not in added:
                first = None
                group = []
                for k in range(spec["n"]):
                    req = Request(f"{rid}.{k}", spec["prompt"], params, max_tokens=spec["max_tokens"],
                                  block_size=w["block_size"], fork_parent=first)
                    first = first or req
                    sched.add_request(req)
                    group.append(req)
                added[rid] = group
            if spec["abort_step"] == step and rid in added:
                sched.finish_requests([r.request_id for r in added[rid]],
                                      RequestStatus.FINISHED_ABORTED)
        out = sched.schedule()
        assert out.total_num_scheduled_tokens <= w["max_num_batched_tokens"]
        assert len(out.num_scheduled_tokens) <= w["max_num_seqs"]
        sampled = {}
        for rid, num in out.num_scheduled_tokens.items():
            req = sched.requests[rid]
            if req.num_computed_tokens + num >= req.num_tokens:
                sampled[rid] = rng.randrange(0, 60)
        for o in sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled)):
            if o.finish_reason is not None:
                ended[o.req_id] = o.finish_reason
        sched.check_integrity()
        _check_shared_content(sched, seen)
        step += 1
        all_arrived = len(added) == len(w["reqs"])
        if all_arrived and not sched.has_unfinished_requests():
            break
    assert not sched.has_unfinished_requests(), "a request never finished"
    for group in added.values():
        for req in group:
            assert req.is_finished
            if req.status != RequestStatus.FINISHED_ABORTED:
                assert req.num_output_tokens <= req.max_tokens
                assert req.num_tokens <= w["max_model_len"] + 1
    pool = sched.kv_cache_manager.pool
    assert pool.num_free_blocks == w["num_blocks"], "blocks leaked"
    pool.check_integrity({})
