"""Property tests of the scheduler and KV cache manager (pure Python, no model).

A fake worker mirrors what the model runner keeps (each request's tokens, with
placeholders for the ones it is sampling) and samples random tokens;
hypothesis draws arrivals, prompt lengths (with shared prefixes), budgets,
pool sizes, aborts and whether steps are scheduled synchronously or one ahead
(asynchronous scheduling: step N+1 is scheduled before step N's tokens are
known). After every step: blocks are conserved, reference counts equal the
tables holding each block, any block two requests share holds the same tokens
for both, and the worker's view of every request agrees with the scheduler's.
At the end every request has finished or been aborted and every block is free.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvflow.core.request import Request, RequestStatus
from kvflow.core.scheduler import ModelRunnerOutput, Scheduler, SchedulerOutput
from kvflow.sampling_params import SamplingParams

PENDING = None


class FakeWorker:
    """What the model runner tracks per request, with tokens drawn when a step is read."""

    def __init__(self, rng: random.Random, sched: Scheduler) -> None:
        self.rng = rng
        self.sched = sched
        self.tokens: dict[str, list] = {}
        self.computed: dict[str, int] = {}

    def execute(self, out: SchedulerOutput):
        for rid in out.preempted_req_ids | out.finished_req_ids:
            self.tokens.pop(rid, None)
            self.computed.pop(rid, None)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.tokens, "a known request was sent again as new"
            self.tokens[new.req_id] = list(new.all_token_ids)
            self.computed[new.req_id] = new.num_computed_tokens
        for cached in out.scheduled_cached_reqs:
            assert cached.num_computed_tokens == self.computed[cached.req_id], \
                "scheduler and worker disagree on what was computed"
        sampled = []
        for rid, num in out.num_scheduled_tokens.items():
            tokens, start = self.tokens[rid], self.computed[rid]
            end = start + num
            assert end <= len(tokens), "scheduled past the tokens the worker has"
            assert PENDING not in tokens[start:end - 1], "only a last token may be pending"
            if tokens[end - 1] is PENDING:
                assert end == len(tokens)
            known = self.sched.requests[rid].all_token_ids
            assert all(t is PENDING or t == known[i] for i, t in enumerate(tokens)), \
                "the worker's tokens differ from the scheduler's"
            self.computed[rid] = end
            if end == len(tokens):
                sampled.append((tokens, len(tokens), rid))
                tokens.append(PENDING)
        return lambda: self._read(sampled)

    def _read(self, sampled) -> ModelRunnerOutput:
        out = {}
        for tokens, pos, rid in sampled:
            tokens[pos] = self.rng.randrange(0, 60)
            out[rid] = tokens[pos]
        return ModelRunnerOutput(sampled_token_ids=out)


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
                caching=draw(st.booleans()), reqs=reqs, seed=draw(st.integers(0, 1000)),
                async_scheduling=draw(st.booleans()),
                long_prefill=draw(st.sampled_from([0, 0, 3, 8])))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_scheduler_never_leaks_and_always_finishes(w):
    rng = random.Random(w["seed"])
    sched = Scheduler(max_num_seqs=w["max_num_seqs"],
                      max_num_batched_tokens=w["max_num_batched_tokens"],
                      max_model_len=w["max_model_len"], num_blocks=w["num_blocks"],
                      block_size=w["block_size"], enable_prefix_caching=w["caching"],
                      long_prefill_token_threshold=w["long_prefill"])
    params = SamplingParams(max_tokens=None)
    params.update_from_tokenizer({7})  # token 7 is EOS
    added: dict[str, list[Request]] = {}
    ended: dict[str, str] = {}
    seen: dict = {}
    worker = FakeWorker(rng, sched)
    in_flight = None
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
        read = worker.execute(out)
        launched = None if out.is_empty else (out, read)
        if w["async_scheduling"]:
            launched, in_flight = in_flight, launched
        if launched is not None:
            for o in sched.update_from_output(launched[0], launched[1]()):
                if o.finish_reason is not None:
                    ended[o.req_id] = o.finish_reason
        sched.check_integrity()
        _check_shared_content(sched, seen)
        step += 1
        all_arrived = len(added) == len(w["reqs"])
        if all_arrived and not sched.has_unfinished_requests() and in_flight is None:
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
