"""Paged factor-cache blocks: allocation, reference counts, prefix caching. Pure Python.

Invariants (checked by `check()` in tests):
  * every block is free xor referenced: ref_cnt == 0 <=> the block is in the free queue;
  * num_free + num_used == num_blocks;
  * a block with a hash is findable through `cached` until it is handed out again
    (evicted); freed hashed blocks keep their contents and are reused least recently
    used first, blocks without a hash before any hashed one;
  * a block gets a hash only once all its tokens are computed (`register`, called with what
    a finished step really computed), so a prefix hit never reads an unwritten slot, even
    with a step in flight or a request preempted before its step ran.

A request's block table only grows while it runs (append-only), so a kernel may read a
prefix of it while new blocks are appended. Prefix caching identifies *full* blocks by
sha256(parent hash, token ids), kept on the request (`Request.block_hashes`, extended by
`hash_blocks` as tokens append): a block's identity is the whole prefix up to its end. When
two requests compute the same block concurrently, the second copy is not registered and
not de-duplicated (vLLM does the same): swapping it in would rewrite a live block table.

KV-cache events (on when built with `events=[]`): every change of the set of hashes in
`cached` is appended to `events`, in order, as plain values - BlockStored when `register`
enters a run of blocks, BlockRemoved when `_take_free` evicts one, AllBlocksCleared on
`reset_prefix_cache` - so that replaying the list rebuilds exactly `cached`'s keys. The
core drains the list after each step and publishes it (core/kv_events.py).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

_ROOT = b"tpaserve-prefix-root"


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@dataclass(frozen=True)
class BlockStored:
    """Blocks entered into the prefix cache: consecutive blocks of one request, each the
    child of the one before; `parent_hash` is the hash of the block before the first (None
    for a prompt's first block); `token_ids` are the blocks' tokens, block_size each."""
    block_hashes: list[bytes]
    parent_hash: bytes | None
    token_ids: list[int]


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: list[bytes]


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    hash: bytes | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 events: list[KVCacheEvent] | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}            # hash -> block id
        self.tables: dict[str, list[int]] = {}        # request id -> block ids in order
        self.registered: dict[str, int] = {}          # request id -> leading blocks registered
        self.prefix_queries = 0                        # tokens looked up
        self.prefix_hits = 0                           # tokens found
        self.events = events                           # None: no events recorded (no cost)

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    # ---- prefix cache --------------------------------------------------------------------
    def hash_blocks(self, req) -> None:
        """Extend req.block_hashes over the full blocks of req.token_ids (no-op without
        prefix caching)."""
        if not self.enable_prefix_caching:
            return
        hashes, toks, bs = req.block_hashes, req.token_ids, self.block_size
        for i in range(len(hashes), len(toks) // bs):
            hashes.append(block_hash(hashes[-1] if hashes else _ROOT, toks[i * bs:(i + 1) * bs]))

    def find_cached(self, block_hashes: list[bytes], max_tokens: int) -> list[int]:
        """Longest run of cached blocks for the first max_tokens tokens (no refs taken)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in block_hashes[:max_tokens // self.block_size]:
            b = self.cached.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def record_prefix_lookup(self, queried: int, hit: int) -> None:
        """Count one admitted request's lookup (tokens). Called on admission, not on every
        look, so a queue head that waits for blocks is not counted again each step."""
        self.prefix_queries += queried
        self.prefix_hits += hit

    # ---- allocation ----------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int, shared: list[int] = ()) -> bool:
        """Make the request's table cover num_tokens positions, adopting `shared` first
        (prefix-cache hits or a sibling's prompt blocks, only when the table is empty).
        Returns False, changing nothing, if the free blocks do not suffice."""
        table = self.tables.setdefault(request_id, [])
        need = self.blocks_for(num_tokens) - len(table) - len(shared)
        # adopting a free cached block takes it off the free queue too
        reviving = sum(1 for b in shared if self.blocks[b].ref_cnt == 0)
        if need + reviving > len(self.free):
            if not table:
                del self.tables[request_id]
            return False
        for b in shared:
            self._ref(b)
            table.append(b)
        for _ in range(max(need, 0)):
            table.append(self._take_free())
        return True

    def register(self, request_id: str, block_hashes: list[bytes], num_computed: int,
                 token_ids: list[int] = ()) -> None:
        """Enter into the prefix cache the request's full blocks among its first num_computed
        positions, which a finished step has really written. `token_ids`: the request's
        tokens, read only for the events."""
        if not self.enable_prefix_caching or request_id not in self.tables:
            return
        table = self.tables[request_id]
        done = self.registered.get(request_id, 0)
        upto = min(num_computed // self.block_size, len(block_hashes), len(table))
        run: list[int] = []                    # indices of a run of newly cached blocks
        for i in range(done, upto):
            h, blk = block_hashes[i], self.blocks[table[i]]
            if blk.hash is None and h not in self.cached:
                blk.hash = h
                self.cached[h] = blk.block_id
                if self.events is not None:
                    if run and run[-1] != i - 1:
                        self._stored(block_hashes, run, token_ids)
                        run = []
                    run.append(i)
        if run:
            self._stored(block_hashes, run, token_ids)
        self.registered[request_id] = max(done, upto)

    def _stored(self, block_hashes: list[bytes], run: list[int], token_ids) -> None:
        bs, first, last = self.block_size, run[0], run[-1]
        assert len(token_ids) >= (last + 1) * bs, "register() needs token_ids for the events"
        self.events.append(BlockStored([block_hashes[i] for i in run],
                                       block_hashes[first - 1] if first else None,
                                       list(token_ids[first * bs:(last + 1) * bs])))

    def free_request(self, request_id: str) -> None:
        """Drop a request's references. Tail blocks are freed first so that, among equally
        old cached blocks, a prefix's tail is evicted before its head."""
        table = self.tables.pop(request_id, [])
        self.registered.pop(request_id, None)
        for b in reversed(table):
            blk = self.blocks[b]
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                self.free[b] = None
                if blk.hash is None:             # nothing to keep: reuse these first
                    self.free.move_to_end(b, last=False)

    def reset_prefix_cache(self) -> None:
        """Forget every hash (e.g. after a failed step left blocks half-written)."""
        for blk in self.blocks:
            blk.hash = None
        self.cached.clear()
        self.registered.clear()
        if self.events is not None:
            self.events.append(AllBlocksCleared())

    def _ref(self, b: int) -> None:
        blk = self.blocks[b]
        if blk.ref_cnt == 0:
            del self.free[b]
        blk.ref_cnt += 1

    def _take_free(self) -> int:
        b, _ = self.free.popitem(last=False)      # least recently freed first
        blk = self.blocks[b]
        if blk.hash is not None:                  # evict it from the prefix cache
            del self.cached[blk.hash]
            if self.events is not None:
                self.events.append(BlockRemoved([blk.hash]))
            blk.hash = None
        blk.ref_cnt = 1
        return b

    # ---- invariants ----------------------------------------------------------------------
    def check(self) -> None:
        refs = [0] * self.num_blocks
        for table in self.tables.values():
            for b in table:
                refs[b] += 1
        for blk in self.blocks:
            assert blk.ref_cnt == refs[blk.block_id], f"block {blk.block_id}: ref {blk.ref_cnt} != {refs[blk.block_id]}"
            assert (blk.ref_cnt == 0) == (blk.block_id in self.free), f"block {blk.block_id} free xor referenced"
            if blk.hash is not None:
                assert self.cached[blk.hash] == blk.block_id
        assert len(self.cached) == sum(b.hash is not None for b in self.blocks)
        assert self.num_free + self.num_used == self.num_blocks
