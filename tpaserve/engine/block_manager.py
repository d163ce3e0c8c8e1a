"""Paged factor-cache blocks: allocation, reference counts, prefix caching. Pure Python.

Invariants (checked by `check()` in tests):
  * every block is free xor referenced: ref_cnt == 0 <=> the block is in the free queue;
  * num_free + num_used == num_blocks;
  * a block with a hash is findable through `cached` until it is handed out again
    (evicted); freed hashed blocks keep their contents and are reused least recently
    used first, blocks without a hash before any hashed one.

A request's block table only grows while it runs (append-only), so a kernel may read a
prefix of it while new blocks are appended. Prefix caching hashes *full* blocks as
sha256(parent hash, token ids): a block's identity is the whole prefix up to its end. When
two requests compute the same block concurrently, the second copy is not registered and
not de-duplicated (vLLM does the same): swapping it in would rewrite a live block table.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

_ROOT = b"tpaserve-prefix-root"


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    hash: bytes | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}            # hash -> block id
        self.tables: dict[str, list[int]] = {}        # request id -> block ids in order
        self.hashes: dict[str, list[bytes]] = {}      # request id -> hashes of its full blocks
        self.prefix_queries = 0                        # tokens looked up
        self.prefix_hits = 0                           # tokens found

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
    def find_cached(self, request_id: str, token_ids: list[int], max_tokens: int) -> list[int]:
        """Longest run of cached full blocks for token_ids[:max_tokens] (no refs taken)."""
        if not self.enable_prefix_caching:
            return []
        bs, parent, hits = self.block_size, _ROOT, []
        for i in range(max_tokens // bs):
            h = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
            b = self.cached.get(h)
            if b is None:
                break
            hits.append(b)
            parent = h
        return hits

    def record_prefix_lookup(self, queried: int, hit: int) -> None:
        """Count one admitted request's lookup (tokens). Called on admission, not on every
        look, so a queue head that waits for blocks is not counted again each step."""
        self.prefix_queries += queried
        self.prefix_hits += hit

    def _register_full_blocks(self, request_id: str, token_ids: list[int], num_tokens: int) -> None:
        """Hash the request's blocks that num_tokens fills completely, as far as their
        tokens are known (a multi-step decode allocates slots for tokens not sampled yet;
        `register` hashes those blocks once the tokens exist)."""
        hashes, table, bs = self.hashes.setdefault(request_id, []), self.tables[request_id], self.block_size
        for i in range(len(hashes), min(num_tokens, len(token_ids)) // bs):
            parent = hashes[-1] if hashes else _ROOT
            h = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
            hashes.append(h)
            blk = self.blocks[table[i]]
            if blk.hash is None and h not in self.cached:
                blk.hash = h
                self.cached[h] = blk.block_id

    # ---- allocation ----------------------------------------------------------------------
    def allocate(self, request_id: str, token_ids: list[int], num_computed: int,
                 num_new: int, shared: list[int] = ()) -> bool:
        """Make room for tokens [num_computed, num_computed + num_new) of a request.

        `shared` are blocks to adopt first (prefix-cache hits or a sibling's prompt blocks);
        num_computed already counts their tokens. Returns False, changing nothing, if the
        free blocks do not suffice.
        """
        table = self.tables.setdefault(request_id, [])
        need = self.blocks_for(num_computed + num_new) - len(table) - len(shared)
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
        if self.enable_prefix_caching:
            self._register_full_blocks(request_id, token_ids, num_computed + num_new)
        return True

    def register(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """Hash the full blocks of tokens [0, num_computed) that are not hashed yet."""
        if self.enable_prefix_caching and request_id in self.tables:
            self._register_full_blocks(request_id, token_ids, num_computed)

    def free_request(self, request_id: str, num_computed: int | None = None) -> None:
        """Drop a request's references. Tail blocks are freed first so that, among equally
        old cached blocks, a prefix's tail is evicted before its head.

        `num_computed`: the tokens really written. Full blocks are hashed when they are
        allocated, i.e. before the step computes them; a request preempted in the step
        that scheduled it holds hashed blocks that were never written. Their hashes are
        dropped here, or a later request with that prefix would hit unwritten slots."""
        table = self.tables.pop(request_id, [])
        if num_computed is not None:
            hashes = self.hashes.get(request_id, [])
            for i in range(num_computed // self.block_size, len(hashes)):
                blk = self.blocks[table[i]]
                if blk.hash is not None and blk.hash == hashes[i]:
                    del self.cached[blk.hash]
                    blk.hash = None
        for b in reversed(table):
            blk = self.blocks[b]
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                self.free[b] = None
                if blk.hash is None:             # nothing to keep: reuse these first
                    self.free.move_to_end(b, last=False)
        self.hashes.pop(request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every hash (e.g. after a failed step left blocks half-written)."""
        for blk in self.blocks:
            blk.hash = None
        self.cached.clear()
        self.hashes.clear()

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
