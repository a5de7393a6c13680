"""Asynchronous scheduling corner cases, step by step (the property test draws them rarely).

Steps are scheduled one ahead: ``schedule()`` for step N+1 runs before step
N's tokens reach ``update_from_output``.
"""

from __future__ import annotations

from kvflow.core.request import Request, RequestStatus
from kvflow.core.scheduler import ModelRunnerOutput, Scheduler
from kvflow.sampling_params import SamplingParams

EOS = 7


def _scheduler(num_blocks: int, block_size: int = 2) -> Scheduler:
    return Scheduler(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32,
                     num_blocks=num_blocks, block_size=block_size, enable_prefix_caching=True)


def _request(rid: str, prompt: list[int], max_tokens: int) -> Request:
    params = SamplingParams(max_tokens=max_tokens)
    params.update_from_tokenizer({EOS})
    return Request(rid, prompt, params, max_tokens=max_tokens, block_size=2)


def test_decode_is_scheduled_before_its_input_token_is_known():
    sched = _scheduler(num_blocks=16)
    a = _request("a", [1, 2, 3], max_tokens=4)
    sched.add_request(a)
    first = sched.schedule()
    assert first.num_scheduled_tokens == {"a": 3}
    assert (a.num_computed_tokens, a.num_pending) == (3, 1)
    second = sched.schedule()  # step 1 has not returned yet
    assert second.num_scheduled_tokens == {"a": 1}
    assert second.scheduled_cached_reqs[0].num_computed_tokens == 3
    assert (a.num_computed_tokens, a.num_pending) == (4, 2)
    sched.update_from_output(first, ModelRunnerOutput({"a": 11}))
    assert a.output_token_ids == [11] and a.num_pending == 1
    sched.update_from_output(second, ModelRunnerOutput({"a": 12}))
    assert a.all_token_ids == [1, 2, 3, 11, 12] and a.num_pending == 0


def test_pending_tokens_that_reach_max_tokens_are_not_scheduled_again():
    sched = _scheduler(num_blocks=16)
    a = _request("a", [1, 2, 3], max_tokens=2)
    sched.add_request(a)
    s1 = sched.schedule()
    s2 = sched.schedule()
    assert s2.num_scheduled_tokens == {"a": 1}
    s3 = sched.schedule()  # two tokens pending = max_tokens: nothing left to compute
    assert s3.is_empty
    sched.update_from_output(s1, ModelRunnerOutput({"a": 11}))
    outs = sched.update_from_output(s2, ModelRunnerOutput({"a": 12}))
    assert outs[0].finish_reason == "length"
    assert sched.kv_cache_manager.num_free_blocks == 16
    sched.check_integrity()


def test_stop_token_while_next_step_runs_drops_that_steps_token():
    sched = _scheduler(num_blocks=16)
    a = _request("a", [1, 2, 3], max_tokens=10)
    sched.add_request(a)
    s1 = sched.schedule()
    s2 = sched.schedule()
    outs = sched.update_from_output(s1, ModelRunnerOutput({"a": EOS}))
    assert outs[0].finish_reason == "stop"
    assert sched.kv_cache_manager.num_free_blocks == 16  # freed though step 2 still runs
    assert sched.update_from_output(s2, ModelRunnerOutput({"a": 5})) == []
    s3 = sched.schedule()
    assert s3.finished_req_ids == {"a"}  # workers drop its state
    assert a.output_token_ids == [EOS]


def _preempt_b_with_a_pending_token(a_max_tokens: int, b_max_tokens: int):
    """4 blocks of 2: two 4-token prompts fill the pool; a's next token needs a fifth block,
    so b (newest) is preempted while its first token is still being sampled."""
    sched = _scheduler(num_blocks=4)
    a = _request("a", [1, 2, 3, 4], max_tokens=a_max_tokens)
    b = _request("b", [5, 6, 8, 9], max_tokens=b_max_tokens)
    sched.add_request(a)
    sched.add_request(b)
    s1 = sched.schedule()
    assert s1.num_scheduled_tokens == {"a": 4, "b": 4}
    s2 = sched.schedule()
    assert s2.preempted_req_ids == {"b"} and s2.num_scheduled_tokens == {"a": 1}
    assert b.status == RequestStatus.PREEMPTED and b.num_pending == 1
    return sched, b, s1, s2


def test_request_preempted_with_a_pending_token_keeps_it_and_can_finish_from_waiting():
    sched, b, s1, _ = _preempt_b_with_a_pending_token(5, 1)
    outs = sched.update_from_output(s1, ModelRunnerOutput({"a": 11, "b": 12}))
    assert {o.req_id: o.finish_reason for o in outs} == {"a": None, "b": "length"}
    assert b.output_token_ids == [12] and b.is_finished
    assert list(sched.waiting) == []
    sched.check_integrity()


def test_preempted_request_resumes_with_its_pending_token_known():
    sched, b, s1, s2 = _preempt_b_with_a_pending_token(2, 3)
    sched.update_from_output(s1, ModelRunnerOutput({"a": 11, "b": 12}))
    sched.update_from_output(s2, ModelRunnerOutput({"a": 13}))  # a ends by length
    s3 = sched.schedule()
    (new,) = s3.scheduled_new_reqs
    assert new.req_id == "b" and new.all_token_ids == [5, 6, 8, 9, 12]
    assert s3.num_scheduled_tokens["b"] == 5 - new.num_computed_tokens
    sched.check_integrity()


def test_long_prefill_token_threshold_spreads_a_prompt_beside_running_decodes():
    sched = Scheduler(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32,
                      num_blocks=16, block_size=2, enable_prefix_caching=False,
                      long_prefill_token_threshold=4)
    a = _request("a", [1, 2, 3], max_tokens=10)
    sched.add_request(a)
    assert sched.schedule().num_scheduled_tokens == {"a": 3}
    b = _request("b", list(range(20, 30)), max_tokens=2)
    sched.add_request(b)
    chunks = [sched.schedule().num_scheduled_tokens for _ in range(3)]
    assert chunks == [{"a": 1, "b": 4}, {"a": 1, "b": 4}, {"a": 1, "b": 2}]
