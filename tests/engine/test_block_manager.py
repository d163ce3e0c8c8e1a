"""BlockManager: allocation, reference counts, prefix caching, eviction order. Pure Python.

Every test ends with `free_all_and_check`: `check()` holds and, once every request is
freed, every block is free (hashed blocks included)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpaserve.engine.block_manager import (
    _ROOT,
    AllBlocksCleared,
    BlockManager,
    BlockRemoved,
    BlockStored,
    block_hash,
)


class _Req:
    def __init__(self, ids):
        self.token_ids, self.block_hashes = list(ids), []


def hashes_of(bm: BlockManager, ids: list[int]) -> list[bytes]:
    r = _Req(ids)
    bm.hash_blocks(r)
    return r.block_hashes


def alloc(bm: BlockManager, rid: str, ids: list[int], num_computed: int, n: int,
          shared=()) -> bool:
    """Make room for ids[num_computed:num_computed + n] and compute them at once: the table
    grows, then the full blocks of those tokens are registered (what a finished step does)."""
    if not bm.allocate(rid, num_computed + n, list(shared)):
        return False
    upto = ids[:num_computed + n]
    bm.register(rid, hashes_of(bm, upto), len(upto), upto)
    return True


def find(bm: BlockManager, ids: list[int], max_tokens: int) -> list[int]:
    return bm.find_cached(hashes_of(bm, ids), max_tokens)


def free_all_and_check(bm: BlockManager) -> None:
    bm.check()
    for rid in list(bm.tables):
        bm.free_request(rid)
        bm.check()
    assert bm.tables == {} and bm.registered == {}
    assert bm.num_free == bm.num_blocks and bm.num_used == 0
    assert all(b.ref_cnt == 0 for b in bm.blocks)


def snapshot(bm: BlockManager):
    return (list(bm.free), {k: list(v) for k, v in bm.tables.items()}, dict(bm.cached),
            [(b.ref_cnt, b.hash) for b in bm.blocks], dict(bm.registered))


def toks(n: int, start: int = 1) -> list[int]:
    return list(range(start, start + n))


# ---- allocate / append / free ---------------------------------------------------------------

def test_allocate_rounds_up_to_blocks_and_takes_lowest_free_first():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert alloc(bm, "a", toks(9), 0, 9)
    assert bm.table("a") == [0, 1, 2] and bm.num_free == 5 and bm.num_used == 3
    assert [bm.blocks[b].ref_cnt for b in range(4)] == [1, 1, 1, 0]
    assert bm.usage == pytest.approx(3 / 8)
    assert alloc(bm, "b", toks(1), 0, 1)
    assert bm.table("b") == [3]
    free_all_and_check(bm)


def test_append_grows_table_only_at_block_boundaries():
    bm = BlockManager(num_blocks=8, block_size=4)
    ids = toks(12)
    assert alloc(bm, "a", ids, 0, 5)
    assert len(bm.table("a")) == 2
    assert alloc(bm, "a", ids, 5, 3)                 # tokens 5..7 fit in block 1
    assert len(bm.table("a")) == 2
    first = list(bm.table("a"))
    assert alloc(bm, "a", ids, 8, 1)                 # token 8 opens block 2
    assert bm.table("a")[:2] == first and len(bm.table("a")) == 3   # append-only
    assert alloc(bm, "a", ids, 9, 0)                 # nothing new: nothing changes
    assert len(bm.table("a")) == 3
    free_all_and_check(bm)


def test_free_returns_blocks_and_unknown_free_is_noop():
    bm = BlockManager(num_blocks=4, block_size=2)
    alloc(bm, "a", toks(5), 0, 5)
    bm.free_request("a")
    bm.free_request("a")
    bm.free_request("never-seen")
    assert bm.num_free == 4 and bm.table("a") == []
    free_all_and_check(bm)


def test_failed_allocate_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert alloc(bm, "a", toks(10), 0, 10)           # 3 blocks
    before = snapshot(bm)
    assert not alloc(bm, "b", toks(8, 50), 0, 8)     # needs 2, 1 free
    assert snapshot(bm) == before and "b" not in bm.tables
    assert not alloc(bm, "a", toks(20), 10, 10)      # append needs 2 more
    assert snapshot(bm) == before
    # adopting a free cached block counts against the free blocks too
    bm.free_request("a")
    hits = find(bm, toks(10), 9)
    assert len(hits) == 2
    before = snapshot(bm)
    assert not alloc(bm, "c", toks(10) + toks(10, 90), 8, 12, shared=hits)  # 2 + 3 > 4
    assert snapshot(bm) == before
    assert alloc(bm, "c", toks(10) + toks(6, 90), 8, 8, shared=hits)        # 2 + 2 == 4
    assert bm.num_free == 0
    free_all_and_check(bm)


def test_fork_shares_blocks_with_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    ids = toks(10)
    alloc(bm, "p", ids, 0, 10)
    shared = bm.table("p")[:2]
    assert alloc(bm, "f", ids + [77], 8, 3, shared=shared)
    assert bm.table("f")[:2] == shared and bm.table("f")[2] not in bm.table("p")
    assert [bm.blocks[b].ref_cnt for b in shared] == [2, 2]
    assert bm.num_used == 4
    bm.free_request("p")                               # the fork keeps the shared blocks
    bm.check()
    assert [bm.blocks[b].ref_cnt for b in shared] == [1, 1]
    assert all(b not in bm.free for b in shared) and bm.num_used == 3
    free_all_and_check(bm)


# ---- prefix caching -----------------------------------------------------------------------------

def test_full_blocks_are_hashed_as_a_chain_of_parent_and_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    ids = toks(10)
    alloc(bm, "a", ids, 0, 10)
    h0 = block_hash(_ROOT, ids[0:4])
    h1 = block_hash(h0, ids[4:8])
    assert bm.registered["a"] == 2                     # the partial third block: no hash
    assert bm.cached == {h0: bm.table("a")[0], h1: bm.table("a")[1]}
    assert bm.blocks[bm.table("a")[2]].hash is None
    alloc(bm, "a", ids + [11, 12], 10, 2)            # the third block fills up
    assert len(bm.cached) == 3
    free_all_and_check(bm)


def test_hits_only_for_full_blocks_of_the_same_prefix():
    bm = BlockManager(num_blocks=16, block_size=4)
    ids = toks(10)
    alloc(bm, "a", ids, 0, 10)
    a = bm.table("a")
    assert find(bm, ids, 9) == a[:2]        # block 2 is partial: never a hit
    assert find(bm, ids, 7) == a[:1]        # max_tokens limits to full blocks
    assert find(bm, ids, 3) == []
    assert find(bm, ids[:4] + [0, 0, 0, 0], 8) == a[:1]
    # the same tokens after a different first block are another prefix: no hit
    assert find(bm, [0, 0, 0, 0] + ids[4:8], 8) == []
    # find_cached only looks; the scheduler counts one lookup per admitted request
    assert bm.prefix_queries == 0 and bm.prefix_hits == 0
    bm.record_prefix_lookup(10, 8)
    assert (bm.prefix_queries, bm.prefix_hits) == (10, 8)
    free_all_and_check(bm)


def test_hit_adopts_live_and_revives_free_cached_blocks():
    bm = BlockManager(num_blocks=6, block_size=2)
    ids = toks(6)
    alloc(bm, "a", ids, 0, 6)
    hits = find(bm, ids, 5)
    assert hits == bm.table("a")[:2]
    alloc(bm, "b", ids, 4, 2, shared=hits)
    assert [bm.blocks[b].ref_cnt for b in hits] == [2, 2]
    bm.free_request("a")
    bm.free_request("b")
    assert bm.num_free == 6 and len(bm.cached) == 3    # freed, still findable
    hits = find(bm, ids, 5)
    assert len(hits) == 2
    alloc(bm, "c", ids, 4, 2, shared=hits)
    assert all(b not in bm.free for b in hits) and bm.num_free == 3
    free_all_and_check(bm)


def test_unhashed_freed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=6, block_size=4)
    alloc(bm, "a", toks(8), 0, 8)          # 2 full (hashed) blocks
    alloc(bm, "b", toks(2, 50), 0, 2)      # 1 partial (unhashed) block
    a, b = bm.table("a"), bm.table("b")
    bm.free_request("a")
    bm.free_request("b")
    # b's unhashed block and the never-used ones go first; a's cached blocks come last
    assert list(bm.free)[:4] == [b[0], 3, 4, 5]
    assert alloc(bm, "c", toks(16, 100), 0, 16)
    assert bm.table("c") == [b[0], 3, 4, 5]
    assert len(bm.cached) == 2 + 4
    assert find(bm, toks(8), 8) == a       # a's blocks survived
    free_all_and_check(bm)


def test_freed_cached_blocks_evicted_least_recently_used_first_tail_before_head():
    bm = BlockManager(num_blocks=4, block_size=2)
    ids_a, ids_b = toks(4), toks(4, 20)
    alloc(bm, "a", ids_a, 0, 4)
    alloc(bm, "b", ids_b, 0, 4)
    a, b = list(bm.table("a")), list(bm.table("b"))
    bm.free_request("a")                               # a freed first: older
    bm.free_request("b")
    assert list(bm.free) == [a[1], a[0], b[1], b[0]]
    alloc(bm, "x", toks(2, 60), 0, 2)                # evicts a's tail block only
    assert bm.table("x") == [a[1]]
    assert find(bm, ids_a, 4) == [a[0]]     # a's head still hits
    alloc(bm, "y", toks(2, 70), 0, 2)                # then a's head
    assert bm.table("y") == [a[0]]
    assert find(bm, ids_a, 4) == [] and find(bm, ids_b, 4) == b
    # adopting b's head takes it off the free queue; the one block left to take is b's tail
    hits = find(bm, ids_b, 2)
    alloc(bm, "z", ids_b[:2] + [9], 2, 1, shared=hits)
    assert bm.table("z") == [b[0], b[1]]
    assert find(bm, ids_b, 4) == [b[0]]     # b's tail was evicted
    free_all_and_check(bm)


def test_recently_freed_cached_block_outlives_older_ones():
    bm = BlockManager(num_blocks=3, block_size=2)
    alloc(bm, "a", toks(2), 0, 2)
    alloc(bm, "b", toks(2, 10), 0, 2)
    a, b = bm.table("a")[0], bm.table("b")[0]
    bm.free_request("a")
    bm.free_request("b")
    hit = find(bm, toks(2) + [5], 2)        # a's block used again...
    alloc(bm, "a2", toks(2) + [5], 2, 1, shared=hit)
    bm.free_request("a2")                               # ...and freed last: now newest
    alloc(bm, "n", toks(4, 40), 0, 4)                 # two blocks: the unhashed one, then b
    assert b in bm.table("n") and a not in bm.table("n")
    assert find(bm, toks(2), 2) == [a]
    free_all_and_check(bm)


def test_concurrently_computed_duplicate_block_is_not_registered():
    bm = BlockManager(num_blocks=8, block_size=4)
    ids = toks(8)
    alloc(bm, "a", ids, 0, 8)
    alloc(bm, "b", ids, 0, 8)                        # same tokens, computed separately
    assert len(bm.cached) == 2
    assert all(bm.blocks[x].hash is None for x in bm.table("b"))
    assert find(bm, ids, 8) == bm.table("a")
    free_all_and_check(bm)


def test_only_computed_blocks_are_registered():
    """A step allocates slots for tokens it has not computed yet (a multi-step round, a
    step in flight); only what a finished step computed enters the prefix cache, so a
    request freed before computing them leaves them unhashed."""
    bm = BlockManager(num_blocks=8, block_size=4)
    ids = toks(12)
    assert bm.allocate("a", 12)                        # room for 12 positions
    bm.register("a", hashes_of(bm, ids), 7)           # a step computed 7: block 0 only
    assert len(bm.cached) == 1 and bm.registered["a"] == 1
    a = list(bm.table("a"))
    bm.free_request("a")                               # preempted before computing more
    bm.check()
    assert bm.cached == {bm.blocks[a[0]].hash: a[0]}
    assert find(bm, ids, 12) == [a[0]]
    assert list(bm.free)[:2] == [a[1], a[2]]           # unhashed now: reused first
    free_all_and_check(bm)


def test_prefix_caching_disabled_never_hashes_or_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    alloc(bm, "a", toks(12), 0, 12)
    assert not bm.cached and all(b.hash is None for b in bm.blocks)
    bm.free_request("a")
    assert find(bm, toks(12), 11) == [] and bm.prefix_hits == 0
    free_all_and_check(bm)


def test_reset_prefix_cache_forgets_every_hash():
    bm = BlockManager(num_blocks=8, block_size=2)
    alloc(bm, "a", toks(6), 0, 6)
    alloc(bm, "b", toks(4, 20), 0, 4)
    bm.free_request("b")
    bm.reset_prefix_cache()
    bm.check()
    assert not bm.cached and find(bm, toks(6), 6) == []
    assert find(bm, toks(4, 20), 4) == []
    alloc(bm, "a", toks(8), 6, 2)                    # hashing restarts from the first block
    assert len(bm.cached) == 4
    free_all_and_check(bm)


def replay(events) -> set[bytes]:
    """The set of cached hashes a subscriber rebuilds from the events alone."""
    held: set[bytes] = set()
    for e in events:
        if isinstance(e, BlockStored):
            held.update(e.block_hashes)
        elif isinstance(e, BlockRemoved):
            held.difference_update(e.block_hashes)
        else:
            held.clear()
    return held


def test_events_record_every_change_of_the_cached_hashes():
    ev: list = []
    bm = BlockManager(num_blocks=4, block_size=2, events=ev)
    ids = toks(6)
    h = hashes_of(bm, ids)
    alloc(bm, "a", ids, 0, 4)                         # two blocks, one run, no parent
    assert ev == [BlockStored(h[:2], None, ids[:4])]
    alloc(bm, "a", ids, 4, 2)                         # the third: the second is its parent
    assert ev[-1] == BlockStored(h[2:], h[1], ids[4:])
    bm.free_request("a")                              # free, still cached: no event
    assert len(ev) == 2 and replay(ev) == set(bm.cached)
    alloc(bm, "b", toks(4, 20), 0, 4)                 # takes the unhashed block, evicts h[2]
    assert ev[2] == BlockRemoved([h[2]]) and isinstance(ev[3], BlockStored)
    assert replay(ev) == set(bm.cached) and len(bm.cached) == 4
    bm.reset_prefix_cache()
    assert ev[-1] == AllBlocksCleared() and replay(ev) == set() == set(bm.cached)
    free_all_and_check(bm)


# ---- property: random allocate / append / fork / free --------------------------------------------

op_st = st.tuples(st.sampled_from(["alloc", "append", "fork", "free", "hit"]),
                  st.integers(0, 7), st.integers(1, 9),
                  st.lists(st.integers(0, 2), min_size=1, max_size=12))


@settings(max_examples=250, deadline=None)
@given(ops=st.lists(op_st, max_size=40), num_blocks=st.integers(1, 12),
       block_size=st.sampled_from([1, 2, 3, 4]), prefix=st.booleans())
def test_random_operations_keep_invariants_and_free_everything(ops, num_blocks, block_size,
                                                               prefix):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix, events=[])
    live: dict[str, list[int]] = {}                    # request -> tokens it holds blocks for
    n = 0
    for kind, pick, count, tokens in ops:
        rids = sorted(live)
        before = snapshot(bm)
        if kind in ("alloc", "hit") or not rids:
            rid, n = f"r{n}", n + 1
            ids = tokens[:count] if kind == "alloc" else tokens
            shared = find(bm, ids, len(ids) - 1) if kind == "hit" else []
            done = len(shared) * block_size
            ok = alloc(bm, rid, ids, done, len(ids) - done, shared=shared)
            if ok:
                live[rid] = ids
                assert bm.table(rid)[:len(shared)] == shared
        elif kind == "append":
            rid = rids[pick % len(rids)]
            ids = live[rid] + tokens[:count]
            ok = alloc(bm, rid, ids, len(live[rid]), len(ids) - len(live[rid]))
            if ok:
                live[rid] = ids
        elif kind == "fork":
            src = rids[pick % len(rids)]
            k = (len(live[src]) // block_size) and pick % (len(live[src]) // block_size + 1)
            shared = bm.table(src)[:k]
            rid, n = f"r{n}", n + 1
            ids = live[src][:k * block_size] + tokens[:count]
            ok = alloc(bm, rid, ids, k * block_size, len(ids) - k * block_size, shared=shared)
            if ok:
                live[rid] = ids
                assert all(bm.blocks[b].ref_cnt >= 2 for b in shared)
        else:
            rid = rids[pick % len(rids)]
            bm.free_request(rid)
            del live[rid]
            ok = True
        if not ok:
            assert snapshot(bm) == before                # a failed allocate changes nothing
        bm.check()
        assert replay(bm.events) == set(bm.cached)       # the KV events tell every change
        for rid, ids in live.items():
            assert len(bm.table(rid)) == bm.blocks_for(len(ids))
        assert bm.num_used == len({b for rid in live for b in bm.table(rid)})
    free_all_and_check(bm)
