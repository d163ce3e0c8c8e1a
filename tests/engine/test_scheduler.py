"""Scheduler + BlockManager driven by hand-made runner outputs: pure Python, no model.

Every test ends with `drain_and_check`: everything left is aborted, no request remains,
and every block is free again (`BlockManager.check()` holds throughout).

The property test at the end replaces the model with a fake runner whose "factor cache"
stores, per slot, the token prefix it was computed from; a request's reads must see exactly
its own prefix, so prefix-cache hits, forks and preemption are checked against what was
really written, and its tokens (a function of the prefix, like greedy decoding) must equal a
plain loop's whatever the batching.
"""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpaserve.config import SchedulerConfig
from tpaserve.engine.block_manager import BlockManager
from tpaserve.engine.contracts import PLACEHOLDER, RunnerOutput, SchedulerOutput
from tpaserve.engine.request import Request, RequestStatus
from tpaserve.engine.scheduler import QueueFull, RequestRejected, Scheduler
from tpaserve.sampling_params import SamplingParams

_clock = itertools.count(1)


def make(num_blocks=16, block_size=4, budget=64, max_seqs=8, max_len=128, prefix=True,
         max_queued=None, steps=1, policy="priority") -> tuple[Scheduler, BlockManager]:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                          max_queued_requests=max_queued, num_scheduler_steps=steps,
                          scheduling_policy=policy)
    return Scheduler(cfg, bm, max_len), bm


def req(rid, prompt, max_tokens=4, *, eos=None, priority=0, arrival=None, fork_of=None,
        **params) -> Request:
    """A request; arrival times come from a counter so that FCFS ties never happen."""
    p = SamplingParams(max_tokens=max_tokens, **params)
    return Request(rid, list(prompt), p, max_tokens, eos, priority,
                   float(next(_clock)) if arrival is None else arrival, fork_of=fork_of)


def step(s: Scheduler, tokens=None) -> tuple[SchedulerOutput, list[Request]]:
    """One step with a fake runner: every sampling request gets tokens[rid] (default 7)."""
    out = s.schedule()
    s.blocks.check()
    tokens = tokens or {}
    sampled = {r.request_id: [tokens(r) if callable(tokens) else tokens.get(r.request_id, 7)]
               for r in out.requests if r.sample}
    changed = s.update(out, RunnerOutput(sampled=sampled))
    s.blocks.check()
    return out, changed


def run_to_end(s: Scheduler, tokens=None, max_steps=500) -> list[SchedulerOutput]:
    outs = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            return outs
        outs.append(step(s, tokens)[0])
    raise AssertionError(f"no progress after {max_steps} steps: waiting "
                         f"{[r.request_id for r in s.waiting]}, running "
                         f"{[r.request_id for r in s.running]}")


def sizes(out: SchedulerOutput) -> dict[str, int]:
    return {r.request_id: r.num_tokens for r in out.requests}


def drain_and_check(s: Scheduler) -> None:
    """The leak check: abort whatever is left; then nothing may hold a block."""
    for rid in list(s.requests):
        s.finish(rid, RequestStatus.FINISHED_ABORTED)
    s.schedule()                                    # hands the finished ids to the runner
    bm = s.blocks
    bm.check()
    assert not s.requests and not s.waiting and not s.running
    assert not s.finished_ids
    assert bm.tables == {} and bm.num_free == bm.num_blocks and bm.num_used == 0


# ---- budget, chunked prefill, mixed batches -------------------------------------------------

def test_token_budget_respected_and_long_prompt_chunked():
    s, bm = make(num_blocks=32, budget=10)
    r = req("long", range(1, 26), max_tokens=3)
    s.add_request(r)
    outs = run_to_end(s)
    # 25 prompt tokens under a budget of 10: chunks 10, 10, 5, then 1 token per decode step
    assert [sizes(o)["long"] for o in outs] == [10, 10, 5, 1, 1]
    assert [o.requests[0].start_pos for o in outs] == [0, 10, 20, 25, 26]
    assert [o.requests[0].sample for o in outs] == [False, False, True, True, True]
    assert all(o.num_tokens <= 10 for o in outs)
    assert r.output_token_ids == [7, 7, 7] and r.status == RequestStatus.FINISHED_LENGTH
    drain_and_check(s)


def test_prefill_and_decode_share_a_step_within_budget():
    s, bm = make(num_blocks=32, budget=8)
    s.add_request(req("a", [1, 2, 3], max_tokens=10))
    out, _ = step(s)
    assert sizes(out) == {"a": 3}
    s.add_request(req("b", range(10, 30), max_tokens=2))
    out, _ = step(s)
    # a decodes (1 token), b's prompt takes the rest of the budget: 7 of 20 tokens
    assert sizes(out) == {"a": 1, "b": 7}
    assert [r.sample for r in out.requests] == [True, False]
    for _ in range(5):
        out, _ = step(s)
        assert out.num_tokens <= 8 and sizes(out)["a"] == 1
    drain_and_check(s)


def test_max_num_seqs_caps_running_requests():
    s, bm = make(num_blocks=64, budget=100, max_seqs=2)
    for i in range(5):
        s.add_request(req(f"r{i}", [i + 1] * 3, max_tokens=2))
    out, _ = step(s)
    assert list(sizes(out)) == ["r0", "r1"] and len(s.running) == 2
    seen_running = []
    while s.has_unfinished():
        out, _ = step(s)
        seen_running.append(len(s.running))
        assert len(out.requests) <= 2
    assert max(seen_running) <= 2
    drain_and_check(s)


def test_fcfs_order_within_a_priority():
    s, bm = make(budget=4, max_seqs=1)
    for rid in ["x", "y", "z"]:
        s.add_request(req(rid, [5, 6], max_tokens=1))
    order = [o.requests[0].request_id for o in run_to_end(s)]
    assert order == ["x", "y", "z"]
    drain_and_check(s)


def test_priority_runs_lower_value_first_then_arrival():
    s, bm = make(budget=4, max_seqs=1)
    s.add_request(req("late-lo", [1, 2], max_tokens=1, priority=1))
    s.add_request(req("hi", [1, 2], max_tokens=1, priority=-1))
    s.add_request(req("mid-a", [1, 2], max_tokens=1, priority=0))
    s.add_request(req("mid-b", [1, 2], max_tokens=1, priority=0))
    order = [o.requests[0].request_id for o in run_to_end(s)]
    assert order == ["hi", "mid-a", "mid-b", "late-lo"]
    drain_and_check(s)


def test_fcfs_refuses_a_priority_and_runs_in_arrival_order():
    s, bm = make(budget=4, max_seqs=1, policy="fcfs")
    with pytest.raises(RequestRejected, match="first come first served") as e:
        s.add_request(req("jump", [1, 2], max_tokens=1, priority=-1))
    assert e.value.param == "priority"
    for rid in ("a", "b", "c"):
        s.add_request(req(rid, [1, 2], max_tokens=1))
    assert [o.requests[0].request_id for o in run_to_end(s)] == ["a", "b", "c"]
    drain_and_check(s)


def test_priority_out_of_range_is_refused():
    s, bm = make(policy="priority")
    with pytest.raises(RequestRejected, match="priority must be in") as e:
        s.add_request(req("x", [1, 2], priority=2**40))
    assert e.value.param == "priority"
    drain_and_check(s)


# ---- preemption -------------------------------------------------------------------------------

def test_preemption_takes_newest_keeps_output_and_recomputes():
    # 4 blocks of 4 tokens. a and b each hold 2 blocks after their prompts; the first to need
    # a 3rd block makes the scheduler preempt the newest request (b).
    s, bm = make(num_blocks=4, block_size=4, budget=64, prefix=False)
    a = req("a", range(1, 7), max_tokens=8)
    b = req("b", range(11, 17), max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    step(s, {"a": 50, "b": 60})               # prompts: 6 tokens each, 2 blocks each
    step(s, {"a": 51, "b": 61})               # position 6: still within block 1
    assert bm.num_free == 0
    out, _ = step(s, {"a": 52, "b": 62})      # position 7 fills block 1; still fits
    out, _ = step(s, {"a": 53, "b": 63})      # position 8 needs a third block for both
    assert out.preempted_ids == ["b"] and sizes(out) == {"a": 1}
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.output_token_ids == [60, 61, 62] and b.num_preemptions == 1
    assert s.waiting[0] is b and s.num_preemptions == 1
    assert bm.table("b") == [] and len(bm.table("a")) == 3
    # a runs to the end; then b is recomputed from scratch (prompt + kept output) in one chunk
    while a.status == RequestStatus.RUNNING:
        out, _ = step(s, {"a": 54, "b": 64})
    out, _ = step(s, {"b": 64})
    assert sizes(out) == {"b": 9} and out.requests[0].start_pos == 0
    assert out.requests[0].token_ids == list(range(11, 17)) + [60, 61, 62]
    assert out.requests[0].sample
    run_to_end(s, {"b": 65})
    assert b.output_token_ids == [60, 61, 62, 64, 65, 65, 65, 65]
    drain_and_check(s)


def test_preempted_request_goes_to_head_of_waiting_queue():
    s, bm = make(num_blocks=4, block_size=4, prefix=False)
    s.add_request(req("a", range(1, 7), max_tokens=8))
    s.add_request(req("b", range(11, 17), max_tokens=8))
    for _ in range(3):
        step(s)
    s.add_request(req("c", [1], max_tokens=1))          # arrived after b
    out, _ = step(s)
    assert out.preempted_ids == ["b"]
    assert [r.request_id for r in s.waiting] == ["b", "c"]
    drain_and_check(s)


def test_preemption_victim_is_lowest_priority_even_if_older():
    s, bm = make(num_blocks=4, block_size=4, prefix=False)
    s.add_request(req("old-lo", range(1, 7), max_tokens=8, priority=5))
    s.add_request(req("new-hi", range(11, 17), max_tokens=8, priority=0))
    for _ in range(3):
        step(s)
    out, _ = step(s)
    assert out.preempted_ids == ["old-lo"] and sizes(out) == {"new-hi": 1}
    drain_and_check(s)


# ---- abort ---------------------------------------------------------------------------------------

def test_abort_running_frees_blocks_at_once():
    s, bm = make(num_blocks=8)
    s.add_request(req("a", range(1, 10), max_tokens=5))
    s.add_request(req("b", range(1, 4), max_tokens=5))
    step(s)
    assert bm.table("a")
    s.finish("a", RequestStatus.FINISHED_ABORTED)
    bm.check()
    assert bm.table("a") == [] and "a" not in s.requests and bm.num_used == len(bm.table("b"))
    out, _ = step(s)
    assert "a" in out.finished_ids and list(sizes(out)) == ["b"]
    s.finish("a", RequestStatus.FINISHED_ABORTED)      # twice: a no-op
    drain_and_check(s)


def test_abort_waiting_request_and_abort_during_step():
    s, bm = make(num_blocks=8, max_seqs=1)
    s.add_request(req("a", [1, 2, 3], max_tokens=3))
    s.add_request(req("w", [4, 5, 6], max_tokens=3))
    out = s.schedule()
    s.finish("w", RequestStatus.FINISHED_ABORTED)      # waiting: removed from the queue
    assert [r.request_id for r in s.waiting] == []
    s.finish("a", RequestStatus.FINISHED_ABORTED)      # aborted while its step "ran"
    assert bm.num_free == bm.num_blocks
    assert s.update(out, RunnerOutput(sampled={"a": 9})) == []
    drain_and_check(s)


# ---- admission -----------------------------------------------------------------------------------

def test_rejects_prompt_plus_max_tokens_over_context_naming_both_numbers():
    s, bm = make(max_len=20)
    with pytest.raises(RequestRejected) as e:
        s.add_request(req("x", range(15), max_tokens=9))
    msg = str(e.value)
    assert "20" in msg and "15" in msg and "9" in msg and "24" in msg
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestRejected) as e:
        s.add_request(req("y", range(21), max_tokens=0))
    assert e.value.param == "prompt"
    assert not s.requests
    drain_and_check(s)


def test_rejects_request_bigger_than_whole_cache():
    s, bm = make(num_blocks=3, block_size=4, max_len=100)
    s.add_request(req("fits", range(10), max_tokens=2))       # 12 tokens = 3 blocks
    with pytest.raises(RequestRejected, match="3 blocks") as e:
        s.add_request(req("big", range(10), max_tokens=3))    # 13 tokens = 4 blocks
    assert "4 cache blocks" in str(e.value)
    assert list(s.requests) == ["fits"]
    run_to_end(s)
    drain_and_check(s)


def test_rejects_empty_prompt_and_full_queue():
    s, bm = make(max_queued=2)
    with pytest.raises(RequestRejected, match="empty"):
        s.add_request(req("e", []))
    s.add_request(req("a", [1]))
    s.add_request(req("b", [1]))
    with pytest.raises(QueueFull, match="2 sequences waiting"):
        s.add_request(req("c", [1]))
    assert list(s.requests) == ["a", "b"]
    step(s)                                    # a and b leave the queue: room again
    s.add_request(req("c", [1]))
    run_to_end(s)
    drain_and_check(s)


# ---- finishing ----------------------------------------------------------------------------------

def test_max_tokens_zero_finishes_after_prompt_without_sampling():
    s, bm = make(budget=4)
    r = req("echo", range(1, 11), max_tokens=0)
    s.add_request(r)
    outs = run_to_end(s)
    assert [sizes(o)["echo"] for o in outs] == [4, 4, 2]
    assert not any(x.sample for o in outs for x in o.requests)
    assert r.status == RequestStatus.FINISHED_LENGTH and r.output_token_ids == []
    drain_and_check(s)


@pytest.mark.parametrize("eos, ignore_eos, stop_ids, min_tokens, want_len, want_status, reason", [
    (9, False, (), 0, 3, RequestStatus.FINISHED_STOPPED, None),       # eos at token 3
    (9, True, (), 0, 6, RequestStatus.FINISHED_LENGTH, None),         # ignored: runs to max
    (None, False, (9,), 0, 3, RequestStatus.FINISHED_STOPPED, 9),     # stop token id
    (None, False, (8, 9), 4, 5, RequestStatus.FINISHED_STOPPED, 8),   # not before min_tokens
    (9, False, (), 5, 6, RequestStatus.FINISHED_STOPPED, None),       # 1st eos too early
    (9, False, (), 6, 6, RequestStatus.FINISHED_STOPPED, None),       # n_out == min_tokens
    (7, False, (), 0, 6, RequestStatus.FINISHED_LENGTH, None),        # no stop: max_tokens
])
def test_token_stop_rules(eos, ignore_eos, stop_ids, min_tokens, want_len, want_status, reason):
    script = [1, 2, 9, 3, 8, 9]                 # tokens the fake model emits, in order
    s, bm = make()
    r = req("r", [4, 4, 4], max_tokens=6, eos=eos, ignore_eos=ignore_eos,
            stop_token_ids=stop_ids, min_tokens=min_tokens)
    s.add_request(r)
    run_to_end(s, lambda x: script[r.num_output_tokens])
    assert r.output_token_ids == script[:want_len]          # the stop token is kept
    assert r.status == want_status and r.stop_reason == reason
    drain_and_check(s)


def test_context_length_ends_request():
    s, bm = make(max_len=8)
    r = req("r", range(1, 6), max_tokens=3)
    s.add_request(r)
    run_to_end(s)
    assert r.num_tokens == 8 and r.status == RequestStatus.FINISHED_LENGTH
    drain_and_check(s)


# ---- prefix caching and forks -----------------------------------------------------------------

def test_prefix_cache_hit_skips_computed_blocks_and_counts_cached_tokens():
    s, bm = make(num_blocks=16, block_size=4)
    shared = list(range(1, 11))                               # 2 full blocks + 2 tokens
    s.add_request(req("a", shared + [50], max_tokens=1))
    run_to_end(s)
    b = req("b", shared + [60, 61], max_tokens=1)
    s.add_request(b)
    out, _ = step(s)
    assert out.requests[0].start_pos == 8 and out.requests[0].num_tokens == 4
    assert b.num_cached_tokens == 8
    run_to_end(s)
    assert bm.prefix_hits == 8
    drain_and_check(s)


def test_prefix_cache_always_computes_last_prompt_token():
    s, bm = make(num_blocks=16, block_size=4)
    s.add_request(req("a", range(1, 9), max_tokens=1))       # exactly 2 blocks
    run_to_end(s)
    b = req("b", range(1, 9), max_tokens=1)
    s.add_request(b)
    out, _ = step(s)
    # the second block is cached too, but its last token must be recomputed for logits
    assert out.requests[0].start_pos == 4 and out.requests[0].sample
    assert b.num_cached_tokens == 4
    drain_and_check(s)


def test_prompt_logprobs_request_bypasses_prefix_cache():
    s, bm = make(num_blocks=16, block_size=4)
    s.add_request(req("a", range(1, 10), max_tokens=1))
    run_to_end(s)
    s.add_request(req("b", range(1, 10), max_tokens=0, prompt_logprobs=1))
    out, _ = step(s)
    assert out.requests[0].start_pos == 0 and out.requests[0].prompt_logprobs_from == 1
    drain_and_check(s)


def test_prefix_caching_disabled_never_hits():
    s, bm = make(num_blocks=16, block_size=4, prefix=False)
    s.add_request(req("a", range(1, 11), max_tokens=1))
    run_to_end(s)
    s.add_request(req("b", range(1, 11), max_tokens=1))
    out, _ = step(s)
    assert out.requests[0].start_pos == 0 and bm.prefix_hits == 0 and not bm.cached
    drain_and_check(s)


def test_forked_siblings_share_first_siblings_prompt_blocks():
    s, bm = make(num_blocks=16, block_size=4, budget=6)
    prompt = list(range(1, 12))                                 # 11 tokens: 2 full blocks
    group = [req(f"g#{i}", prompt, max_tokens=3, arrival=1.0, fork_of="g#0" if i else None)
             for i in range(3)]
    for r in group:
        s.add_request(r)
    out, _ = step(s)                                # g#0's first chunk; forks wait for it
    assert sizes(out) == {"g#0": 6}
    out, _ = step(s)
    assert sizes(out) == {"g#0": 5}                 # prompt done, budget spent
    out, _ = step(s)                                # forks adopt 2 computed blocks each
    starts = {r.request_id: r.start_pos for r in out.requests}
    assert starts["g#1"] == 8 and starts.get("g#2", 8) == 8
    t0, t1 = bm.table("g#0"), bm.table("g#1")
    assert t1[:2] == t0[:2] and t1[2:] != t0[2:3]
    assert all(bm.blocks[b].ref_cnt >= 2 for b in t0[:2])
    run_to_end(s)
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in group)
    drain_and_check(s)


def test_preempted_forks_do_not_stall_the_queue():
    """Both siblings preempted: the fork lands ahead of the first sibling in the queue.
    It must not wait for a sibling that waits behind it (that stalled the engine forever)."""
    s, bm = make(num_blocks=9, block_size=4, budget=64)
    p = list(range(10, 18))
    for i in range(2):
        s.add_request(req(f"a#{i}", p, max_tokens=20, arrival=1.0, fork_of="a#0" if i else None))
    for _ in range(3):
        step(s)
    s.add_request(req("c", [40, 41, 42, 43], max_tokens=20, priority=-1, arrival=2.0))
    outs = run_to_end(s, max_steps=200)
    assert sum(len(o.preempted_ids) for o in outs) >= 2
    drain_and_check(s)


def test_victim_preempted_in_the_step_that_scheduled_it_leaves_no_hashed_unwritten_block():
    """X's decode token fills a block; then Y (later in the running list, higher priority)
    cannot grow and preempts X and, still short, itself. X's block was never written: a
    follow-up prompt continuing X's tokens must not hit it (blocks are hashed only once a
    finished step computed them)."""
    s, bm = make(num_blocks=10, block_size=4, budget=16, max_len=64)
    runner = CacheModel(s)

    def fake_step():
        out = s.schedule()
        s.update(out, runner.execute(out))
        bm.check()
        return out
    s.add_request(req("Z", range(1, 13), 12, priority=0))
    x = req("X", range(5, 12), 12, priority=2)
    s.add_request(x)
    fake_step()
    s.add_request(req("Y", range(30, 58), 4, priority=1))
    fake_step()
    out = fake_step()                              # X schedules position 7, then is preempted
    assert out.preempted_ids == ["X", "Y"] and x.num_tokens == 8
    w = req("W", x.token_ids + [1, 2, 3], 2, priority=-1)
    s.add_request(w)
    out = fake_step()                              # the runner checks every slot W reads
    assert {r.request_id: r.start_pos for r in out.requests}["W"] == 4   # block 0 only
    while s.has_unfinished():
        fake_step()
    for r in (x, w):
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.max_tokens)
    drain_and_check(s)


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_block_is_cached_only_once_its_tokens_are_computed(pipelined):
    """7 prompt tokens + 1 sampled fill two blocks of 4, but position 7 is computed only by
    the next step. Aborted before that, only block 0 may be cached: a request continuing
    those 8 tokens must recompute block 1, not read an unwritten slot."""
    s, bm = make(num_blocks=16, block_size=4, budget=64)
    runner, pending = CacheModel(s), []
    a = req("a", range(1, 8), max_tokens=5)
    s.add_request(a)
    drive(s, runner, pipelined, pending)
    if pending:                                   # the async core updates one step later
        s.update(*pending.pop())
    assert a.num_tokens == 8 and len(a.block_hashes) == 2
    s.finish("a", RequestStatus.FINISHED_ABORTED)
    assert len(bm.cached) == 1
    b = req("b", a.token_ids + [9, 9], max_tokens=1)
    s.add_request(b)
    out = drive(s, runner, pipelined, pending)
    assert out.requests[0].start_pos == 4 and b.num_cached_tokens == 4
    while s.has_unfinished() or pending:
        drive(s, runner, pipelined, pending)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 1)
    drain_and_check(s)


def test_an_id_reused_while_its_old_step_is_in_flight_gets_none_of_its_tokens():
    """Abort "x" and add another "x" before the step that scheduled the old one is updated
    (async scheduling): the old step's samples must not land on the new request."""
    s, bm = make(num_blocks=32, block_size=4)
    runner, pending = CacheModel(s), []
    s.add_request(req("x", [1, 2, 3], max_tokens=6))
    drive(s, runner, True, pending)                  # the old x's first step is in flight
    s.finish("x", RequestStatus.FINISHED_ABORTED)
    new = req("x", [9, 8, 7, 6, 5], max_tokens=4)
    s.add_request(new)
    while s.has_unfinished() or pending:
        drive(s, runner, True, pending)
    assert new.output_token_ids == reference_output([9, 8, 7, 6, 5], 4)
    drain_and_check(s)


# ---- property test: a fake runner with a checkable cache -----------------------------------------

V = 23


def next_token(ids) -> int:
    """The fake model: a deterministic function of the whole prefix (like greedy)."""
    h = 0
    for t in ids:
        h = (h * 31 + t + 1) % 1_000_003
    return h % V


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(next_token(ids))
    return ids[len(prompt):]


class CacheModel:
    """A fake runner with a checkable cache: slot -> the token prefix whose last token's
    factors it holds. Like the real runner it keeps its own block tables (from the
    SchedulerOutput's diffs) and each request's tokens (prompt + its own samples), and it
    takes a PLACEHOLDER input from the previous step's samples. Executing at launch, in
    launch order, is the device's stream order: an async engine's update comes later."""

    def __init__(self, s: Scheduler):
        self.s, self.slots = s, {}
        self.tables: dict[str, list[int]] = {}
        self.seqs: dict[str, list[int]] = {}          # prompt + every sample, by position
        self.written: dict[str, int] = {}             # positions this request has stored
        self.last: dict[str, int] = {}                # samples of the previous step

    def finished_req(self, rid: str) -> Request:
        raise AssertionError(f"{rid} is scheduled but not live")

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        bs = self.s.blocks.block_size
        for rid in out.finished_ids:
            self.tables.pop(rid, None), self.seqs.pop(rid, None), self.written.pop(rid, None)
        for rid in out.preempted_ids:
            self.tables.pop(rid, None)
            self.written[rid] = 0
        for new in out.new_requests:
            self.seqs[new.request_id] = list(new.prompt_token_ids)
        for r in out.requests:
            if r.reset_blocks:
                self.tables[r.request_id] = []
                self.written[r.request_id] = 0
            self.tables[r.request_id] += r.new_block_ids
        holders: dict[int, list[tuple[str, int]]] = {}     # block -> (request, table index)
        for rid, table in self.tables.items():
            for i, b in enumerate(table):
                holders.setdefault(b, []).append((rid, i))
        last, self.last = self.last, {}
        sampled = {}
        for r in out.requests:
            rid, seq, table = r.request_id, self.seqs[r.request_id], self.tables[r.request_id]
            for i, tok in enumerate(r.token_ids):           # the inputs are the tokens known
                p = r.start_pos + i
                if tok == PLACEHOLDER:
                    assert i == r.num_tokens - 1 and rid in last, (rid, p)
                    tok = last[rid]
                assert p < len(seq) and seq[p] == tok, (rid, p, tok, seq)
            end = r.start_pos + r.num_tokens
            req = self.s.requests.get(rid) or self.finished_req(rid)
            # never past the context, never more samples in flight than max_tokens allows
            assert end + r.num_steps - 1 <= self.s.max_model_len, (rid, end, r.num_steps)
            if r.sample:
                assert end + r.num_steps - len(req.prompt_token_ids) <= req.max_tokens, rid
            got = []
            for step in range(r.num_steps):                 # a round: one position a step
                lo = r.start_pos if step == 0 else end - 1
                assert len(table) * bs >= end, (rid, table, end)
                for p in range(lo, end):                    # store this step's factors
                    b, content = table[p // bs], tuple(seq[:p + 1])
                    # never overwrite a slot another request stored with other content
                    for other, j in holders[b]:
                        q = j * bs + p % bs
                        if other != rid and self.written.get(other, 0) > q:
                            assert tuple(self.seqs[other][:q + 1]) == content, (rid, other, q)
                    self.slots[b * bs + p % bs] = content
                self.written[rid] = max(self.written.get(rid, 0), end)
                for p in range(end):                        # attend: read every earlier slot
                    slot = table[p // bs] * bs + p % bs
                    assert self.slots.get(slot) == tuple(seq[:p + 1]), (rid, p)
                if not r.sample:
                    break
                tok = next_token(seq[:end])
                got.append(tok)
                if len(seq) == end:
                    seq.append(tok)
                else:                       # recomputing after preemption: the same token
                    assert seq[end] == tok
                end += 1
            if r.sample:
                sampled[rid] = got
                self.last[rid] = got[-1]
        return RunnerOutput(sampled=sampled)


def drive(s: Scheduler, runner: CacheModel, pipelined: bool, pending: list):
    """One step: sync (schedule, execute, update) or pipelined (schedule and execute step
    N+1, then update step N: the async engine core's order)."""
    out = s.schedule()
    s.blocks.check()
    res = runner.execute(out)
    if not pipelined:
        s.update(out, res)
        return out
    if pending:
        s.update(*pending.pop())
    if out.requests:
        pending.append((out, res))
    return out


request_st = st.fixed_dictionaries({
    # "follow": continue an earlier request's tokens, outputs included (a chat's next turn)
    "prefix": st.sampled_from([(), (1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 9, 9, 9, 9, 9), "follow"]),
    "suffix": st.lists(st.integers(0, 4), min_size=0, max_size=10),
    "max_tokens": st.integers(0, 10),
    "n": st.integers(1, 3),
    "priority": st.integers(0, 2),
    "arrive": st.integers(0, 12),
    "abort": st.one_of(st.none(), st.integers(0, 40)),
})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(request_st, min_size=1, max_size=8),
       num_blocks=st.integers(3, 24), block_size=st.sampled_from([1, 2, 4]),
       budget=st.integers(1, 24), max_seqs=st.integers(1, 6), prefix=st.booleans(),
       pipelined=st.booleans(), round_steps=st.sampled_from([1, 1, 3]))
def test_random_workloads_read_what_was_written(reqs, num_blocks, block_size, budget,
                                                max_seqs, prefix, pipelined, round_steps):
    """Every read sees what was written, every output equals the plain loop's, with
    prefix caching, forks, preemption, aborts, multi-step rounds, and async scheduling."""
    s, bm = make(num_blocks=num_blocks, block_size=block_size, budget=budget,
                 max_seqs=max_seqs, max_len=96, prefix=prefix, steps=round_steps)
    runner = CacheModel(s)
    pending: list = []
    live: dict[str, Request] = {}
    done: dict[str, Request] = {}
    for t in range(600):
        for gi, spec in enumerate(reqs):
            if spec["arrive"] == t:
                if spec["prefix"] == "follow":
                    earlier = sorted({**done, **live}.items())
                    prefix = earlier[gi % len(earlier)][1].token_ids if earlier else []
                else:
                    prefix = list(spec["prefix"])
                prompt = prefix + spec["suffix"] or [0]
                group = [req(f"g{gi}#{i}", prompt, spec["max_tokens"], priority=spec["priority"],
                             arrival=float(t), fork_of=f"g{gi}#0" if i else None)
                         for i in range(spec["n"])]
                try:
                    for r in group:
                        s.add_request(r)
                except RequestRejected:
                    need = len(prompt) + spec["max_tokens"]
                    assert bm.blocks_for(need) > num_blocks or need > 96
                    for r in group:
                        s.finish(r.request_id, RequestStatus.FINISHED_ABORTED)
                    continue
                live.update((r.request_id, r) for r in group)
            if spec["abort"] == t:
                for rid in [k for k in live if k.startswith(f"g{gi}#")]:
                    s.finish(rid, RequestStatus.FINISHED_ABORTED)
        bm.check()
        out = drive(s, runner, pipelined, pending)
        bm.check()
        # the budget bounds the positions of step 0; a round adds one a step per request
        assert sum(r.num_tokens for r in out.requests) <= budget
        assert len(s.running) <= max_seqs
        for rid in [k for k, r in live.items() if r.is_finished]:
            done[rid] = live.pop(rid)
        if not live and t > 12 and not pending:
            break
    assert not live, f"stalled: waiting {[r.request_id for r in s.waiting]}"
    for r in done.values():
        if r.status == RequestStatus.FINISHED_LENGTH:
            assert r.output_token_ids == reference_output(r.prompt_token_ids, r.max_tokens)
        else:
            assert r.status == RequestStatus.FINISHED_ABORTED
            assert r.output_token_ids == reference_output(r.prompt_token_ids, r.max_tokens)[
                :r.num_output_tokens]
    drain_and_check(s)
